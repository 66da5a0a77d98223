%% The cheapest possible EIR on Erlang/OTP's diameter stack: a performance baseline, not a server.
%%
%% A diameter service (Origin-Host eir.otp.test, Origin-Realm localdomain, S13 advertised as
%% Vendor-Specific-Application-Id {10415, 16777252}) listening on TCP; handle_request/3 answers
%% every ECR that OTP decoded without errors with Result-Code 2001 and Equipment-Status
%% WHITELISTED (a fixed answer: no policy, no store lookup, no metrics, no logging). OTP still
%% does its own work per request: decode into a record, spawn a handler process, encode the
%% answer, its traffic counters, one gen_tcp send per answer.
%%
%% Driven by benchmarks/bench_otp_baseline.py, which compiles the S13 dictionary of the interop
%% tests (tests/interop/erlang/s13.dia: module eir_interop_s13, records s13_ECR/s13_ECA) and
%% this module into a temporary directory (never commit generated .erl/.hrl/.beam) and runs
%%
%%   erl -noshell +S 1:1 -pa TMPDIR -run otp_eir_s13 main 127.0.0.1 PORT [nodelay|no_nodelay]
%%
%% On stdout: "listening PORT" once the transport is up. On stdin, one command a line:
%% "stats" prints "stats ECR_RECEIVED ECA_2001_SENT ECA_OTHER_SENT" (from OTP's own traffic
%% counters, summed over connections); "stop" or end of input halts the VM.

-module(otp_eir_s13).

-export([main/1]).

%% diameter application callbacks
-export([peer_up/3, peer_down/3, pick_peer/4, prepare_request/3, prepare_retransmit/3,
         handle_answer/4, handle_error/4, handle_request/3]).

-include_lib("diameter/include/diameter.hrl").
-include("eir_interop_s13.hrl").

-define(SVC, otp_eir).
-define(DICT, eir_interop_s13).
-define(S13, 16777252).
-define(TGPP, 10415).
-define(ORIGIN_HOST, <<"eir.otp.test">>).
-define(ORIGIN_REALM, <<"localdomain">>).
-define(WHITELISTED, 0).

main([Host, Port]) ->
    main([Host, Port, "nodelay"]);
main([Host, PortS, Delay]) ->
    %% Logger reports go to stderr; stdout carries only our protocol lines.
    ok = logger:remove_handler(default),
    ok = logger:add_handler(default, logger_std_h, #{config => #{type => standard_error}}),
    {ok, Addr} = inet:parse_address(Host),
    ok = diameter:start(),
    ok = diameter:start_service(?SVC, service_opts(Addr)),
    TConfig = [{reuseaddr, true}, {ip, Addr}, {port, list_to_integer(PortS)}]
        ++ [{nodelay, true} || Delay == "nodelay"],
    {ok, _} = diameter:add_transport(?SVC, {listen, [{transport_module, diameter_tcp},
                                                     {transport_config, TConfig}]}),
    io:format("listening ~s~n", [PortS]),
    commands().

service_opts(Addr) ->
    [{'Origin-Host', ?ORIGIN_HOST},
     {'Origin-Realm', ?ORIGIN_REALM},
     {'Host-IP-Address', [Addr]},
     {'Vendor-Id', ?TGPP},
     {'Product-Name', "OTP diameter baseline EIR"},
     {'Supported-Vendor-Id', [?TGPP]},
     {'Vendor-Specific-Application-Id',
      [[{'Vendor-Id', ?TGPP}, {'Auth-Application-Id', [?S13]}]]},
     {string_decode, false},
     {application, [{alias, s13},
                    {dictionary, ?DICT},
                    {module, ?MODULE}]}].

commands() ->
    case io:get_line("") of
        "stats\n" ->
            {Ecr, Ok, Other} = stats(),
            io:format("stats ~b ~b ~b~n", [Ecr, Ok, Other]),
            commands();
        "\n" ->
            commands();
        _ ->  % "stop", eof, error
            halt(0)
    end.

%% OTP's traffic counters, per transport (they outlive the connections):
%% {{App, Code, R}, send|recv} and {{App, Code, 0}, send, {'Result-Code', RC}}.
stats() ->
    Stats = case diameter:service_info(?SVC, statistics) of
                L when is_list(L) -> lists:append([S || {_Ref, S} <- L]);
                _ -> []
            end,
    Sum = fun(Pred) -> lists:sum([N || {K, N} <- Stats, Pred(K)]) end,
    {Sum(fun(K) -> K == {{?S13, 324, 1}, recv} end),
     Sum(fun(K) -> K == {{?S13, 324, 0}, send, {'Result-Code', 2001}} end),
     Sum(fun({{?S13, 324, 0}, send, {'Result-Code', RC}}) -> RC /= 2001;
            (_) -> false
         end)}.

%% -- diameter callbacks ------------------------------------------------------------------------

peer_up(_Svc, _Peer, State) -> State.
peer_down(_Svc, _Peer, State) -> State.
pick_peer(_, _, _Svc, _State) -> false.
prepare_request(#diameter_packet{msg = Msg}, _Svc, _Peer) -> {send, Msg}.
prepare_retransmit(_Pkt, _Svc, _Peer) -> discard.
handle_answer(#diameter_packet{msg = Msg}, _Req, _Svc, _Peer) -> {ok, Msg}.
handle_error(Reason, _Req, _Svc, _Peer) -> {error, Reason}.

handle_request(#diameter_packet{msg = #s13_ECR{'Session-Id' = SessionId,
                                               'Proxy-Info' = ProxyInfo},
                                errors = []}, _Svc, _Peer) ->
    {reply, #s13_ECA{'Session-Id' = SessionId,
                     'Auth-Session-State' = 1,  % NO_STATE_MAINTAINED
                     'Origin-Host' = ?ORIGIN_HOST,
                     'Origin-Realm' = ?ORIGIN_REALM,
                     'Result-Code' = [2001],
                     'Equipment-Status' = [?WHITELISTED],
                     'Proxy-Info' = ProxyInfo}};
handle_request(#diameter_packet{errors = [{RC, _} | _]}, _Svc, _Peer) when is_integer(RC) ->
    {answer_message, RC};
handle_request(#diameter_packet{errors = [RC | _]}, _Svc, _Peer) when is_integer(RC) ->
    {answer_message, RC};
handle_request(_Pkt, _Svc, _Peer) ->
    {answer_message, 3001}.  % DIAMETER_COMMAND_UNSUPPORTED

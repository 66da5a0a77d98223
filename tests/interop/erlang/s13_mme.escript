#!/usr/bin/env escript
%% -*- erlang -*-
%%
%% An MME that is not ours: Erlang/OTP's diameter application, driven from the command line.
%%
%%   escript s13_mme.escript EBIN HOST PORT STEP...
%%
%% EBIN holds the compiled S13 dictionary (module eir_interop_s13, from s13.dia). The script
%% starts an OTP diameter service (Origin-Host mme.erlang.test, realm erlang.test, S13 advertised
%% as Vendor-Specific-Application-Id {10415, 16777252}), connects over TCP, waits for OTP to
%% finish the capabilities exchange, then runs the steps in order:
%%
%%   ecr:LABEL:IMEI:SV[:IMSI]   send an ECR with diameter:call/4 and print the decoded ECA
%%   watchdog:TIMEOUT_MS:otp    stay idle until OTP's counters show it sent a DWR and received
%%                              a DWA (its own watchdog fired and was answered)
%%   watchdog:TIMEOUT_MS:server stay idle until OTP's counters show it received a DWR and
%%                              answered it with a DWA (the server's watchdog fired)
%%
%% and finally stops the service (OTP sends DPR) and reports how the peer process ended:
%% {shutdown, 'DPA'} is OTP having received a matching DPA.
%%
%% Environment: EIR_REALM (Destination-Realm of the ECRs, default interop.test),
%% MME_WATCHDOG_TIMER (the transport's watchdog_timer in ms, default 6000; OTP adds +-2 s).
%%
%% Everything is printed on stdout as one JSON object per line ("event" says what it is).
%% Decoded messages are printed as OTP decoded them (decode_format map), together with the
%% decoder's error list; the Python side judges them. Exit status 0 means the script ran to the
%% end, not that the answers were right.

-mode(compile).

%% diameter application callbacks (this script is its own callback module).
-export([peer_up/3, peer_down/3, pick_peer/4, prepare_request/3, prepare_retransmit/3,
         handle_answer/4, handle_error/4, handle_request/3]).

-include_lib("diameter/include/diameter.hrl").

-define(SVC, eir_interop_mme).
-define(DICT, eir_interop_s13).
-define(S13, 16777252).
-define(TGPP, 10415).
-define(ORIGIN_HOST, "mme.erlang.test").
-define(ORIGIN_REALM, "erlang.test").

main([Ebin, Host, Port | Steps]) ->
    try
        run(Ebin, Host, list_to_integer(Port), Steps),
        halt(0)
    catch
        throw:{fatal, What} ->
            emit(#{event => fatal, reason => fmt(What)}),
            halt(2);
        Class:Reason:Stack ->
            emit(#{event => crash, reason => fmt({Class, Reason, Stack})}),
            halt(3)
    end;
main(_) ->
    io:format(standard_error, "usage: s13_mme.escript EBIN HOST PORT STEP...~n", []),
    halt(64).

run(Ebin, Host, Port, Steps) ->
    %% OTP's logger writes reports to stdout by default: keep stdout for our JSON lines.
    ok = logger:remove_handler(default),
    ok = logger:add_handler(default, logger_std_h, #{config => #{type => standard_error}}),
    true = code:add_patha(Ebin),
    {module, ?DICT} = code:ensure_loaded(?DICT),
    ok = diameter:start(),
    {ok, Addr} = inet:parse_address(Host),
    ok = diameter:start_service(?SVC, service_opts(Addr)),
    true = diameter:subscribe(?SVC),
    TOpts = [{transport_module, diameter_tcp},
             {transport_config, [{raddr, Addr}, {rport, Port}, {ip, Addr}]},
             {capx_timeout, 5000},
             {watchdog_timer, list_to_integer(os:getenv("MME_WATCHDOG_TIMER", "6000"))},
             {connect_timer, 60000}],
    {ok, TRef} = diameter:add_transport(?SVC, {connect, TOpts}),
    Peer = wait_up(TRef),
    PeerMon = erlang:monitor(process, Peer),
    lists:foreach(fun(S) -> step(string:split(S, ":", all), Peer) end, Steps),
    emit(#{event => stats, counters => counters(Peer)}),
    ok = diameter:stop_service(?SVC),
    Exit = receive
               {'DOWN', PeerMon, process, Peer, R} -> fmt(R)
           after 10000 ->
               <<"peer process still alive 10 s after stop_service">>
           end,
    emit(#{event => stopped, peer_exit => Exit, service_events => drain_events()}),
    ok.

service_opts(Addr) ->
    [{'Origin-Host', ?ORIGIN_HOST},
     {'Origin-Realm', ?ORIGIN_REALM},
     {'Host-IP-Address', [Addr]},
     {'Vendor-Id', ?TGPP},
     {'Product-Name', "OTP diameter interop MME"},
     {'Supported-Vendor-Id', [?TGPP]},
     {'Vendor-Specific-Application-Id',
      [[{'Vendor-Id', ?TGPP}, {'Auth-Application-Id', [?S13]}]]},
     {decode_format, map},
     {string_decode, false},
     {restrict_connections, false},
     {application, [{alias, s13},
                    {dictionary, ?DICT},
                    {module, ?MODULE},
                    {answer_errors, callback},
                    {request_errors, answer_3xxx}]}].

%% The {up, ...} event carries the peer_fsm pid and the CEA OTP accepted; a {closed, ...}
%% event is a failed capabilities exchange (CEA refused, timeout, no common application).
wait_up(TRef) ->
    receive
        #diameter_event{info = {up, TRef, {Peer, Caps}, _Cfg, #diameter_packet{} = Pkt}} ->
            emit(#{event => up,
                   cea => msg_json(Pkt#diameter_packet.msg),
                   cea_errors => [fmt(E) || E <- Pkt#diameter_packet.errors],
                   remote_origin_host => json(element(2, Caps#diameter_caps.origin_host)),
                   remote_auth_application_id => json(element(2, Caps#diameter_caps.auth_application_id)),
                   remote_vsai => json(element(2,
                     Caps#diameter_caps.vendor_specific_application_id))}),
            Peer;
        #diameter_event{info = Info} when element(1, Info) == closed ->
            throw({fatal, {capabilities_exchange_failed, Info}});
        #diameter_event{info = Info} ->
            emit(#{event => service_event, info => fmt(Info)}),
            wait_up(TRef)
    after 15000 ->
        throw({fatal, {no_peer_up_within_15s, drain_events()}})
    end.

step(["ecr", Label, Imei, Sv | Rest], _Peer) ->
    SessionId = list_to_binary(diameter:session_id(?ORIGIN_HOST)),
    %% List-format message; an optional AVP's value is a list of zero or one values.
    Terminal = [{'IMEI', [list_to_binary(Imei)]}]
        ++ [{'Software-Version', [list_to_binary(Sv)]} || Sv /= ""],
    Req = ['ECR', {'Session-Id', SessionId},
           {'Auth-Session-State', 1},  % NO_STATE_MAINTAINED
           {'Origin-Host', ?ORIGIN_HOST},
           {'Origin-Realm', ?ORIGIN_REALM},
           {'Destination-Realm', os:getenv("EIR_REALM", "interop.test")},
           {'Terminal-Information', Terminal},
           {'Vendor-Specific-Application-Id',
            [[{'Vendor-Id', ?TGPP}, {'Auth-Application-Id', [?S13]}]]},
           {'User-Name', [list_to_binary(I) || [I] <- [Rest]]}],
    Base = #{event => answer, label => list_to_binary(Label), session_id_sent => SessionId},
    case diameter:call(?SVC, s13, Req, [{timeout, 5000}]) of
        {ok, ['ECA' | Avps] = Msg, Errors} when is_map(Avps) ->
            emit(Base#{name => 'ECA', msg => msg_json(Msg),
                       errors => [fmt(E) || E <- Errors]});
        {ok, Msg, Errors} ->
            emit(Base#{name => fmt(hd(Msg)), msg => msg_json(Msg),
                       errors => [fmt(E) || E <- Errors]});
        Other ->
            emit(Base#{name => call_error, reason => fmt(Other)})
    end;
step(["watchdog", Ms, Side], Peer) when Side == "otp"; Side == "server" ->
    Deadline = erlang:monotonic_time(millisecond) + list_to_integer(Ms),
    wait_watchdog(Peer, list_to_atom(Side), Deadline);
step(Other, _) ->
    throw({fatal, {bad_step, Other}}).

%% Idle until OTP's own counters show the watchdog exchange wanted. Polls OTP's statistics;
%% sends nothing. Gives up (and reports what it saw) at the deadline.
wait_watchdog(Peer, Side, Deadline) ->
    C = counters(Peer),
    {Req, Ans} = case Side of
                     otp -> {<<"dwr_sent">>, <<"dwa_received">>};
                     server -> {<<"dwr_received">>, <<"dwa_sent">>}
                 end,
    Done = maps:get(Req, C, 0) >= 1 andalso maps:get(Ans, C, 0) >= 1,
    Now = erlang:monotonic_time(millisecond),
    if
        Done; Now >= Deadline ->
            emit(#{event => watchdog, side => Side, counters => C, events => drain_events()});
        true ->
            timer:sleep(200),
            wait_watchdog(Peer, Side, Deadline)
    end.

%% OTP's per-peer message counters, e.g. {{0,280,1}, send} = DWR sent, and
%% {{0,280,0}, recv, {'Result-Code', 2001}} = DWA received with success.
counters(Peer) ->
    Stats = case diameter:service_info(?SVC, connections) of
                L when is_list(L) -> peer_stats(Peer, L);
                _ -> []
            end,
    Named = [{name(K), V} || {K, V} <- Stats],
    lists:foldl(fun({K, V}, M) -> maps:update_with(K, fun(X) -> X + V end, V, M) end,
                #{}, Named).

peer_stats(Peer, Conns) ->
    lists:append([proplists:get_value(statistics, C, [])
                  || C <- Conns, element(1, proplists:get_value(peer, C, {x})) == Peer]).

name({{0, 280, 1}, send}) -> <<"dwr_sent">>;
name({{0, 280, 1}, recv}) -> <<"dwr_received">>;
name({{0, 280, 0}, send}) -> <<"dwa_sent">>;
name({{0, 280, 0}, recv}) -> <<"dwa_received">>;
name({{0, 280, 0}, recv, {'Result-Code', RC}}) -> rc(<<"dwa_received_rc_">>, RC);
name({{0, 280, 0}, send, {'Result-Code', RC}}) -> rc(<<"dwa_sent_rc_">>, RC);
name({{0, 257, 0}, recv, {'Result-Code', RC}}) -> rc(<<"cea_received_rc_">>, RC);
name({{?S13, 324, 0}, recv, {'Result-Code', RC}}) -> rc(<<"eca_received_rc_">>, RC);
name({{?S13, 324, 1}, send}) -> <<"ecr_sent">>;
name({{?S13, 324, 0}, recv}) -> <<"eca_received">>;
name({{?S13, 324, 0}, recv, error}) -> <<"eca_received_with_errors">>;
name({{0, 257, 0}, recv, error}) -> <<"cea_received_with_errors">>;
name({{0, 280, 0}, recv, error}) -> <<"dwa_received_with_errors">>;
name({{0, 280, 1}, recv, error}) -> <<"dwr_received_with_errors">>;
name({_, recv, error}) -> <<"other_received_with_errors">>;
name(K) -> iolist_to_binary(io_lib:format("~0p", [K])).

rc(Prefix, RC) -> <<Prefix/binary, (integer_to_binary(RC))/binary>>.

drain_events() ->
    receive
        #diameter_event{info = Info} -> [fmt(Info) | drain_events()]
    after 0 ->
        []
    end.

%% -- diameter callbacks ------------------------------------------------------------------------

peer_up(_Svc, _Peer, State) -> State.
peer_down(_Svc, _Peer, State) -> State.
pick_peer([Peer | _], _, _Svc, _State) -> {ok, Peer};
pick_peer([], _, _Svc, _State) -> false.
prepare_request(#diameter_packet{msg = Msg}, _Svc, _Peer) -> {send, Msg}.
prepare_retransmit(_Pkt, _Svc, _Peer) -> discard.
handle_answer(#diameter_packet{msg = Msg, errors = Errors}, _Req, _Svc, _Peer) ->
    {ok, Msg, Errors}.
handle_error(Reason, _Req, _Svc, _Peer) -> {error, Reason}.
handle_request(_Pkt, _Svc, _Peer) -> {answer_message, 3001}.  % DIAMETER_COMMAND_UNSUPPORTED

%% -- JSON out ----------------------------------------------------------------------------------

msg_json([Name | Avps]) when is_map(Avps) -> #{name => Name, avps => json(Avps)};
msg_json(Other) -> #{unexpected => fmt(Other)}.

%% Decoded values: binaries (OctetString, UTF8String, DiameterIdentity), integers, maps (grouped
%% AVPs), lists (AVPs with arity > 1). Anything else (addresses, #diameter_avp{} in 'AVP')
%% is printed as an Erlang term.
json({str, B} = S) when is_binary(B) -> S;
json(B) when is_binary(B) -> {str, B};
json(I) when is_integer(I) -> I;
json(A) when is_atom(A) -> {str, atom_to_binary(A)};
json(M) when is_map(M) -> maps:from_list([{json_key(K), json(V)} || {K, V} <- maps:to_list(M)]);
json(L) when is_list(L) -> [json(X) || X <- L];
json(T) -> {str, fmt(T)}.

json_key(K) when is_atom(K) -> atom_to_binary(K);
json_key(K) when is_binary(K) -> K.

fmt(T) -> unicode:characters_to_binary(io_lib:format("~0tp", [T])).

emit(Map) ->
    io:put_chars([encode(json(Map)), $\n]).

encode({str, B}) -> [$", escape(B), $"];
encode(I) when is_integer(I) -> integer_to_list(I);
encode(M) when is_map(M) ->
    [${, lists:join($,, [[encode({str, K}), $:, encode(V)] || {K, V} <- lists:sort(maps:to_list(M))]), $}];
encode(L) when is_list(L) -> [$[, lists:join($,, [encode(X) || X <- L]), $]].

escape(B) ->
    [esc(C) || <<C>> <= B].

esc($") -> "\\\"";
esc($\\) -> "\\\\";
esc(C) when C < 16#20 -> io_lib:format("\\u~4.16.0b", [C]);
esc(C) -> C.

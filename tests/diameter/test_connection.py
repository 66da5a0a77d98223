"""The sans-I/O peer connection driven with bytes and a fake clock: no sockets, no sleeping."""

from __future__ import annotations

import random
import struct
from functools import partial

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eir_server.diameter import errors
from eir_server.diameter.answers import Identity
from eir_server.diameter.codec import (
    CHILDREN,
    CODE,
    FLAG_E,
    FLAG_P,
    FLAG_R,
    Message,
    decode,
    message,
    str_avp,
    u32_avp,
    validate,
)
from eir_server.diameter.connection import (
    TRANSITIONS,
    AppRequest,
    CerRejected,
    Closed,
    Connection,
    DisconnectRequested,
    ErrorAnswered,
    PeerConfig,
    PeerOpened,
    PeerState,
    Watchdog,
    WatchdogChanged,
)
from eir_server.diameter.dictionary import load_dictionary
from eir_server.diameter.shed import BusyAnswer
from eir_server.overload import OverloadConfig, OverloadSignal, Source
from tests.diameter.builders import cer, ecr, proxy_info

D = load_dictionary()
ME = Identity("eir.localdomain", "localdomain", 42)


def make(now: float = 0.0, address: str = "192.0.2.1", **kw: object) -> Connection:
    return Connection(PeerConfig(ME, **kw), D, now, address,  # type: ignore[arg-type]
                      rng=random.Random(1))


def answers(conn: Connection) -> list[Message]:
    data = conn.data_to_send()
    out = []
    while data:
        n = struct.unpack("!I", data[:4])[0] & 0xFFFFFF
        out.append(decode(data[:n], D))
        data = data[n:]
    return out


def result_code(m: Message) -> int:
    a = m.find(268)
    assert a is not None
    return m.u32(a)


def opened(now: float = 0.0, **kw: object) -> Connection:
    c = make(now, **kw)
    c.receive_data(cer(), now)
    (cea,) = answers(c)
    assert result_code(cea) == 2001
    assert [type(e) for e in c.events()] == [PeerOpened]
    return c


def test_cer_success_advertises_s13_and_answers_grammar() -> None:
    c = make()
    c.receive_data(cer(), 0.0)
    (cea,) = answers(c)
    assert cea.code == 257 and not cea.flags & (FLAG_R | FLAG_E)
    validate(cea, D.compiled.answer(0, 257))  # type: ignore[arg-type]
    assert cea.problems == []
    vsai = cea.find(260)
    assert vsai is not None
    assert [(x[CODE], cea.u32(x)) for x in vsai[CHILDREN]] == [(266, 10415), (258, 16777252)]
    assert c.state is PeerState.R_OPEN and c.watchdog is Watchdog.OKAY
    (ev,) = c.events()
    assert ev == PeerOpened("mme1.epc.test", "epc.test", (16777252,))


def test_cer_plain_auth_application_id_and_relay_are_accepted() -> None:
    for apps in ([u32_avp(258, 16777252)], [u32_avp(258, 0xFFFFFFFF)]):
        c = make()
        c.receive_data(cer(apps=apps), 0.0)
        assert result_code(answers(c)[0]) == 2001


def test_cer_without_common_application_is_5010_and_closes() -> None:
    c = make()
    c.receive_data(cer(apps=[u32_avp(258, 4)]), 0.0)
    (cea,) = answers(c)
    assert result_code(cea) == errors.NO_COMMON_APPLICATION and not cea.flags & FLAG_E
    assert [type(e) for e in c.events()] == [CerRejected, Closed]
    assert c.state is PeerState.DONE


def test_cer_asking_only_for_inband_tls_is_5017_and_closes() -> None:
    # RFC 6733 6.10, 7.1.5 (DIAMETER_NO_COMMON_SECURITY), 13: no in-band TLS here.
    c = make()
    c.receive_data(cer(extra=[u32_avp(299, 1)]), 0.0)
    (cea,) = answers(c)
    assert result_code(cea) == errors.NO_COMMON_SECURITY and not cea.flags & FLAG_E
    assert c.state is PeerState.DONE
    for offered in ([u32_avp(299, 0)], [u32_avp(299, 0), u32_avp(299, 1)]):
        c = make()
        c.receive_data(cer(extra=offered), 0.0)
        assert result_code(answers(c)[0]) == 2001
    # over TLS already (RFC 6733 13.1, TLS before CER): the legacy offer asks for nothing more
    c = Connection(PeerConfig(ME), D, 0.0, "192.0.2.1", rng=random.Random(1), tls=True)
    c.receive_data(cer(extra=[u32_avp(299, 1)]), 0.0)
    assert result_code(answers(c)[0]) == 2001 and c.state is PeerState.R_OPEN


def test_unknown_peer_host_or_network_is_3010_with_e_bit() -> None:
    for kw, addr in [({"allowed_hosts": ("*.other.test",)}, "192.0.2.1"),
                     ({"allowed_networks": ("10.0.0.0/8",)}, "192.0.2.1")]:
        c = make(address=addr, **kw)
        c.receive_data(cer(), 0.0)
        (cea,) = answers(c)
        assert result_code(cea) == errors.UNKNOWN_PEER and cea.flags & FLAG_E
        assert c.state is PeerState.DONE
    c = make(allowed_hosts=("MME*.epc.test",), allowed_networks=("192.0.2.0/24",))
    c.receive_data(cer(), 0.0)
    assert result_code(answers(c)[0]) == 2001


def test_message_before_cer_is_3010_then_closed() -> None:
    c = make()
    c.receive_data(ecr(), 0.0)
    (ans,) = answers(c)
    assert result_code(ans) == errors.UNKNOWN_PEER and ans.flags & FLAG_E
    assert isinstance(c.events()[-1], Closed)


def test_no_cer_within_timeout_closes() -> None:
    c = make(cer_timeout=10.0)
    assert c.next_deadline() == 10.0
    c.handle_timer(9.9)
    assert c.state is PeerState.CLOSED
    c.handle_timer(10.0)
    assert c.state is PeerState.DONE and isinstance(c.events()[-1], Closed)


def test_ecr_reaches_the_application_with_proxy_info_intact() -> None:
    c = opened()
    c.receive_data(ecr(proxies=[proxy_info("dra1", b"a"), proxy_info("dra2", b"b")]), 1.0)
    (ev,) = c.events()
    assert isinstance(ev, AppRequest) and ev.message.code == 324
    assert c.data_to_send() == b""


def test_routing_errors() -> None:
    c = opened()
    c.receive_data(ecr(realm="other.realm"), 1.0)
    c.receive_data(ecr(dest_host="eir2.localdomain"), 1.0)
    c.receive_data(ecr(dest_host="EIR.localdomain"), 1.0)  # case-insensitive match: ours
    a1, a2 = answers(c)
    assert (result_code(a1), result_code(a2)) == (errors.REALM_NOT_SERVED,
                                                  errors.UNABLE_TO_DELIVER)
    assert a1.flags & FLAG_E and a2.flags & FLAG_E
    assert [type(e) for e in c.events()] == [ErrorAnswered, ErrorAnswered, AppRequest]


def test_destination_host_ours_is_local_whatever_the_realm() -> None:
    # RFC 6733 6.1.4: Destination-Host naming this node means local consumption.
    c = opened()
    c.receive_data(ecr(realm="other.realm", dest_host="eir.localdomain"), 1.0)
    assert answers(c) == []
    assert [type(e) for e in c.events()] == [AppRequest]


def test_unknown_application_and_command() -> None:
    c = opened()
    c.receive_data(ecr(app=16777251), 1.0)
    c.receive_data(ecr(code=325), 1.0)
    c.receive_data(message(FLAG_R, 274, 0, 9, 9, [str_avp(263, "s")]), 1.0)  # ASR: base app
    codes = [result_code(a) for a in answers(c)]
    assert codes == [errors.APPLICATION_UNSUPPORTED, errors.COMMAND_UNSUPPORTED,
                     errors.COMMAND_UNSUPPORTED]


def test_ecr_error_answer_shape_5005() -> None:
    c = opened()
    c.receive_data(ecr(terminal=b"", proxies=[proxy_info("dra1", b"x")]), 1.0)
    (ans,) = answers(c)
    assert result_code(ans) == errors.MISSING_AVP
    assert not ans.flags & FLAG_E and ans.flags & FLAG_P
    assert ans.avps[0][CODE] == 263  # Session-Id first
    assert ans.find(277) is not None  # Auth-Session-State, required by the ECA grammar
    failed = ans.find(279)
    assert failed is not None and failed[CHILDREN][0][CODE] == 1401
    assert ans.find(284) is not None
    validate(ans, D.compiled.answer(16777252, 324))  # type: ignore[arg-type]
    assert ans.problems == []


def test_dwr_is_answered_and_resets_watchdog() -> None:
    c = opened(watchdog_interval=30.0, watchdog_jitter=0.0)
    c.receive_data(message(FLAG_R, 280, 0, 5, 5, [str_avp(264, "mme1.epc.test"),
                                                  str_avp(296, "epc.test")]), 20.0)
    (dwa,) = answers(c)
    assert dwa.code == 280 and result_code(dwa) == 2001
    c.handle_timer(30.0)  # the first deadline re-arms from the last message: no DWR yet
    assert c.data_to_send() == b""
    assert c.next_deadline() == 50.0


def test_watchdog_okay_suspect_down() -> None:
    c = opened(watchdog_interval=30.0, watchdog_jitter=0.0)
    c.handle_timer(30.0)  # idle for Tw: send DWR
    (dwr,) = answers(c)
    assert dwr.code == 280 and dwr.flags & FLAG_R
    assert c.watchdog is Watchdog.OKAY
    c.handle_timer(60.0)  # no DWA: SUSPECT
    assert c.watchdog is Watchdog.SUSPECT
    assert c.events() == [WatchdogChanged("OKAY", "SUSPECT")]
    c.handle_timer(90.0)  # still nothing: DOWN, close
    assert c.state is PeerState.DONE
    ev = c.events()
    assert ev[0] == WatchdogChanged("SUSPECT", "DOWN") and isinstance(ev[-1], Closed)


def test_watchdog_failback_on_dwa() -> None:
    c = opened(watchdog_interval=30.0, watchdog_jitter=0.0)
    c.handle_timer(30.0)
    (dwr,) = answers(c)
    c.handle_timer(60.0)
    assert c.watchdog is Watchdog.SUSPECT
    dwa = message(0, 280, 0, dwr.hop_by_hop, dwr.end_to_end,
                  [u32_avp(268, 2001), str_avp(264, "mme1.epc.test"), str_avp(296, "epc.test")])
    c.receive_data(dwa, 61.0)
    assert c.watchdog is Watchdog.OKAY
    assert c.next_deadline() == 91.0


def test_watchdog_jitter_and_floor() -> None:
    c = opened(watchdog_interval=6.0, watchdog_jitter=2.0)
    d = c.next_deadline()
    assert d is not None and 4.0 <= d <= 8.0
    for bad in ({"watchdog_interval": 5.0}, {"watchdog_jitter": 3.0}):
        try:
            PeerConfig(ME, **bad)  # type: ignore[arg-type]
        except ValueError:
            continue
        raise AssertionError(f"{bad} accepted")


def test_peer_dpr_gets_dpa_then_close() -> None:
    c = opened()
    c.receive_data(message(FLAG_R, 282, 0, 6, 6, [str_avp(264, "mme1.epc.test"),
                                                  str_avp(296, "epc.test"), u32_avp(273, 0)]),
                   1.0)
    (dpa,) = answers(c)
    assert dpa.code == 282 and result_code(dpa) == 2001
    ev = c.events()
    assert ev[0] == DisconnectRequested("REBOOTING") and isinstance(ev[1], Closed)


def test_our_dpr_waits_for_dpa_or_deadline() -> None:
    for answer in (True, False):
        c = opened(dpa_timeout=5.0)
        c.disconnect(10.0)
        (dpr,) = answers(c)
        assert dpr.code == 282 and dpr.flags & FLAG_R
        cause = dpr.find(273)
        assert cause is not None and dpr.u32(cause) == 0  # REBOOTING
        assert c.state is PeerState.CLOSING
        # A request that crossed our DPR is still handed to the application.
        c.receive_data(ecr(), 11.0)
        assert isinstance(c.events()[0], AppRequest)
        if answer:
            c.receive_data(message(0, 282, 0, dpr.hop_by_hop, dpr.end_to_end,
                                   [u32_avp(268, 2001), str_avp(264, "m"), str_avp(296, "r")]),
                           12.0)
        else:
            c.handle_timer(15.0)
        assert c.state is PeerState.DONE and isinstance(c.events()[-1], Closed)


def test_unframeable_stream_closes() -> None:
    c = opened()
    c.receive_data(b"\x01\x00\x00\x0c" + b"\0" * 16, 1.0)  # Message-Length 12
    assert c.state is PeerState.DONE
    assert c.events()[-1].reason.startswith("framing error")  # type: ignore[union-attr]


def test_other_version_is_answered_5011_and_the_stream_goes_on() -> None:
    # RFC 6733 7.1.5 DIAMETER_UNSUPPORTED_VERSION
    c = opened()
    c.receive_data(b"\x02" + _dwr()[1:] + _dwr(), 1.0)
    a1, a2 = answers(c)
    assert (result_code(a1), result_code(a2)) == (errors.UNSUPPORTED_VERSION, 2001)
    assert c.state is PeerState.R_OPEN


def test_byte_by_byte_delivery() -> None:
    c = make()
    stream = cer() + ecr()
    for i in range(len(stream)):
        c.receive_data(stream[i:i + 1], 0.0)
    assert [type(e) for e in c.events()] == [PeerOpened, AppRequest]


def _dwr() -> bytes:
    return message(FLAG_R, 280, 0, 5, 5, [str_avp(264, "m"), str_avp(296, "r")])


MESSAGES = {
    "cer": cer, "ecr": ecr, "dwr": _dwr,
    "dpr": lambda: message(FLAG_R, 282, 0, 6, 6, [str_avp(264, "m"), str_avp(296, "r"),
                                                  u32_avp(273, 1)]),
    "dwa": lambda: message(0, 280, 0, 1, 1, [u32_avp(268, 2001), str_avp(264, "m"),
                                             str_avp(296, "r")]),
    "dpa": lambda: message(0, 282, 0, 1, 1, [u32_avp(268, 2001), str_avp(264, "m"),
                                             str_avp(296, "r")]),
    "junk": lambda: message(FLAG_R, 1, 1, 1, 1, [b"\0\0\0\1\0\0\0\5xyz\0"]),
}
ACTIONS = st.one_of(
    st.sampled_from(sorted(MESSAGES)).map(lambda k: ("msg", k)),
    st.floats(0.0, 40.0).map(lambda dt: ("time", dt)),
    st.just(("stop", 0.0)),
    st.just(("lost", 0.0)),
)


def _reachable(state: PeerState) -> set[PeerState]:
    seen = {state}
    todo = [state]
    while todo:
        s = todo.pop()
        for (frm, _), nxt in TRANSITIONS.items():
            if frm is s and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_fast_path_row_keeps_r_open() -> None:
    """The fast path skips `_transition` for application requests in R-Open: the table must
    say that this changes nothing."""
    assert TRANSITIONS[(PeerState.R_OPEN, "rcv-message")] is PeerState.R_OPEN
    assert all(nxt is PeerState.DONE for (_, e), nxt in TRANSITIONS.items()
               if e in ("peer-disc", "framing-error"))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ACTIONS, max_size=30))
def test_any_sequence_of_events_keeps_the_machine_consistent(actions: list) -> None:
    """Every state x event pair is handled: no exception, and every transition is one the
    tables allow; once DONE the connection stays silent."""
    c = make(watchdog_interval=6.0)
    now = 0.0
    for kind, arg in actions:
        before = c.state
        was_done = before is PeerState.DONE
        if kind == "msg":
            c.receive_data(MESSAGES[arg](), now)  # type: ignore[operator]
        elif kind == "time":
            now += arg  # type: ignore[operator]
            c.handle_timer(now)
        elif kind == "lost":
            c.connection_lost()
        else:
            c.disconnect(now)
        out = c.data_to_send()
        if was_done:
            assert out == b"" and c.state is PeerState.DONE
        assert c.state in _reachable(before), (before, kind, arg, c.state)
        assert c.watchdog in Watchdog
        for e in c.events():
            if isinstance(e, Closed):
                assert c.state is PeerState.DONE


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.integers(0, 2))
def test_random_bytes_after_cer_give_answers_or_a_clean_close(junk: bytes, where: int) -> None:
    """Whatever follows the CER, the connection raises nothing, and what it sends is a
    sequence of well-formed answers (each decodes with no problems) or it closes."""
    c = opened()
    frame = ecr() if where else b""
    stream = frame + junk if where == 1 else junk + frame
    c.receive_data(stream, 1.0)
    out = c.data_to_send()
    pos = 0
    while pos < len(out):
        n = struct.unpack_from("!I", out, pos)[0] & 0xFFFFFF
        m = decode(out[pos:pos + n], D)
        assert m.problems == [] and not m.flags & FLAG_R
        assert m.find(268) is not None  # every answer carries a Result-Code
        pos += n
    assert pos == len(out)
    for e in c.events():
        assert isinstance(e, (AppRequest, ErrorAnswered, Closed, DisconnectRequested,
                              WatchdogChanged, PeerOpened, CerRejected))


def _shedding_connection(quota: int) -> tuple[Connection, OverloadSignal, Source]:
    """An open connection wired to an overload signal that is shedding, as the shell wires it
    (gate, quota, refuse_run answering from the 3004 template), its source left `quota`
    admissions."""
    c = opened()
    sig = OverloadSignal(OverloadConfig(target=0.05, min_budget=1))
    src = sig.source("mme")
    sig.shedding = True
    src.quota = quota
    busy = BusyAnswer(ME)

    def refuse_run(msgs: list[bytes], start: int, stop: int, out: list[bytes],
                   counted: int) -> int:
        end = busy.answer_run(msgs, start, stop, b"", out)
        sig.refused(src, end - start - counted)
        return end

    c.gate = partial(sig.admit, src)
    c.quota = partial(sig.left, src)
    c.refuse_run = refuse_run
    return c, sig, src


def _admitted(c: Connection) -> list[int]:
    return [e.message.hop_by_hop for e in c.events() if isinstance(e, AppRequest)]


def test_a_short_quota_admits_the_youngest_requests_of_a_read() -> None:
    """Shedding, the source's quota goes to the last requests of a read (they waited least),
    the older head gets 3004 first; every request is answered or handed on, and counted."""
    c, sig, src = _shedding_connection(quota=3)
    c.receive_data(b"".join(ecr(hbh=h) for h in range(1, 21)), 1.0)
    assert _admitted(c) == [18, 19, 20]
    refused = answers(c)
    assert [m.hop_by_hop for m in refused] == list(range(1, 18))
    assert {result_code(m) for m in refused} == {errors.TOO_BUSY}
    assert (c.shed, src.quota, src.arrivals, src.shed, sig.shed_total) == (17, 0, 20, 17, 17)
    # A quota that covers the read: nothing refused, all in order.
    c, sig, src = _shedding_connection(quota=30)
    c.receive_data(b"".join(ecr(hbh=h) for h in range(1, 21)), 1.0)
    assert _admitted(c) == list(range(1, 21)) and c.shed == 0 and src.quota == 10
    # Not shedding: the quota is not looked at.
    c, sig, src = _shedding_connection(quota=0)
    sig.shedding = False
    c.receive_data(b"".join(ecr(hbh=h) for h in range(1, 21)), 1.0)
    assert _admitted(c) == list(range(1, 21)) and c.shed == 0


def test_the_youngest_of_a_bounded_turn_and_the_rest_waits() -> None:
    """A call still looks at a bounded amount of work (a check costs REFUSALS_PER_CHECK
    refusals): the quota admits the last requests this call can take, what is beyond them
    waits for the next call, when a quota spent refuses it from the start."""
    c, sig, src = _shedding_connection(quota=2)
    c.max_messages = 4  # 64 refusals' worth of work: 30 for the two checks, 32 refusals
    c.receive_data(b"".join(ecr(hbh=h) for h in range(1, 51)), 1.0)
    assert _admitted(c) == [33, 34]
    assert [m.hop_by_hop for m in answers(c)] == list(range(1, 33))
    assert c.pending == 16
    c.receive_data(b"", 1.01)
    assert _admitted(c) == [] and [m.hop_by_hop for m in answers(c)] == list(range(35, 51))
    assert (src.arrivals, src.shed) == (50, 48)

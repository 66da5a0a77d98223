"""3004 answers built from a request's raw bytes (overload shedding): checked against an
independent rendering through the general codec, and never crashing on odd input."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from eir_server.diameter.answers import Identity
from eir_server.diameter.codec import FLAG_E, FLAG_P, FLAG_R, decode
from eir_server.diameter.dictionary import load_dictionary
from eir_server.diameter.shed import BusyAnswer
from tests.diameter.builders import ecr

D = load_dictionary()
ME = Identity("eir.test.example", "test.example", 1)
BUSY = BusyAnswer(ME)


def _proxy_info(host: bytes, state: bytes) -> bytes:
    from eir_server.diameter.codec import grouped_avp, str_avp
    return grouped_avp(284, [str_avp(280, host.decode()), str_avp(33, state.decode())])


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.booleans(),
       st.lists(st.tuples(st.from_regex(r"\A[a-z]{1,12}\Z"), st.from_regex(r"\A[a-z0-9]{0,9}\Z")),
                max_size=3))
def test_busy_answer_is_the_request_turned_around(hbh: int, e2e: int, proxiable: bool,
                                                  proxies: list[tuple[str, str]]) -> None:
    raw = bytearray(ecr(hbh=hbh, e2e=e2e) + b"".join(
        _proxy_info(h.encode(), s.encode()) for h, s in proxies))
    raw[1:4] = len(raw).to_bytes(3, "big")
    if not proxiable:
        raw[4] &= ~FLAG_P & 0xFF
    req = decode(bytes(raw), D)
    ans = decode(BUSY.answer(bytes(raw), b""), D)
    assert ans.flags == (FLAG_E | (req.flags & FLAG_P)) and not ans.flags & FLAG_R
    assert (ans.code, ans.application_id, ans.hop_by_hop, ans.end_to_end) == (
        req.code, req.application_id, req.hop_by_hop, req.end_to_end)
    sid_req, sid_ans = req.find(263), ans.find(263)
    assert sid_req is not None and sid_ans is not None
    assert ans.raw(sid_ans) == req.raw(sid_req)  # Session-Id, first
    assert ans.avps[0].code == 263
    rc, host = ans.find(268), ans.find(264)
    assert rc is not None and ans.u32(rc) == 3004
    assert host is not None and ans.text(host) == ME.origin_host
    # Every Proxy-Info, in order and byte for byte.
    assert [ans.raw(a) for a in ans.avps if a.code == 284] == [
        req.raw(a) for a in req.avps if a.code == 284]
    assert len([a for a in ans.avps if a.code == 284]) == len(proxies)


@given(st.binary(min_size=20, max_size=200))
def test_busy_answer_never_raises_on_framed_garbage(body: bytes) -> None:
    raw = bytes([1]) + (len(body)).to_bytes(3, "big") + body[4:] if len(body) >= 20 else b""
    if len(raw) >= 20:
        out = BUSY.answer(raw)
        assert out[0] == 1 and int.from_bytes(out[1:4], "big") == len(out)


_KINDS = st.sampled_from(["plain", "proxied", "unproxiable", "no_session", "odd_session",
                          "answer", "base_request"])


def _message(kind: str, i: int) -> bytes:
    from eir_server.diameter.codec import FLAG_R, message
    from tests.diameter.builders import ecr_avps, proxy_info
    if kind == "proxied":
        return ecr(hbh=i, proxies=[proxy_info("dra.test", b"s%d" % i)])
    if kind == "unproxiable":
        return ecr(hbh=i, flags=FLAG_R)
    if kind == "no_session":  # Session-Id not first: walked by answer()
        avps = ecr_avps()
        return message(FLAG_R | FLAG_P, 324, 16777252, i, i, avps[1:] + avps[:1])
    if kind == "odd_session":  # a Session-Id whose padding the request omits at its end
        sid = b"x;%d" % i
        sid += b"y" * (len(sid) % 4 == 0)  # never a multiple of 4: padding due, and missing
        unpadded = (263).to_bytes(4, "big") + (0x40000000 | 8 + len(sid)).to_bytes(4, "big")
        return message(FLAG_R | FLAG_P, 324, 16777252, i, i, [])[:20] + unpadded + sid
    if kind == "answer":
        return ecr(hbh=i, flags=FLAG_P)
    if kind == "base_request":
        return ecr(hbh=i, app=0, code=280)
    return ecr(hbh=i, session=f"mme1.epc.test;{i};{'x' * (i % 7)}")


@given(st.lists(_KINDS, min_size=1, max_size=12), st.integers(0, 11), st.booleans())
def test_a_run_of_refusals_is_each_request_refused_alone(kinds: list[str], start: int,
                                                         doic: bool) -> None:
    """`answer_run` (a shed run of requests, one pass) answers byte for byte what `answer`
    answers each request, and stops before the first message that is not an application
    request: the connection handles that one in order."""
    msgs = []
    for i, kind in enumerate(kinds):
        raw = bytearray(_message(kind, i + 1))
        raw[1:4] = len(raw).to_bytes(3, "big")
        msgs.append(bytes(raw))
    start = min(start, len(msgs) - 1)
    tail = b"\0\0\x02\x6d\0\0\0\x0c\0\0\0\x01" if doic else b""
    out: list[bytes] = []
    stop = BUSY.answer_run(msgs, start, len(msgs), tail, out)
    expected = start
    while expected < len(msgs) and kinds[expected] not in ("answer", "base_request"):
        expected += 1
    assert stop == expected
    assert b"".join(out) == b"".join(BUSY.answer(m, tail) for m in msgs[start:stop])
    # A bound below the run's end is respected.
    out2: list[bytes] = []
    assert BUSY.answer_run(msgs, start, start, tail, out2) == start and out2 == []

"""The sans-I/O HTTP/2 server connection against an independent client implementation (the
`h2` library) and against hand-built frames for what a well-behaved client never sends."""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eir_server.n5g_eir import h2conn
from eir_server.n5g_eir.h2conn import (
    PREFACE,
    H2Connection,
    Request,
    encode_head,
    frame,
    literal,
)

GET = [(":method", "GET"), (":scheme", "http"), (":authority", "eir"),
       (":path", "/n5g-eir-eic/v1/equipment-status?pei=imei-352099001761481")]


class Pair:
    """An h2 client wired to our server connection through byte strings."""

    def __init__(self, server: H2Connection | None = None,
                 initial_window: int | None = None) -> None:
        self.server = server or H2Connection()
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        values = {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100}
        if initial_window is not None:
            values[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] = initial_window
        self.client.local_settings = h2.settings.Settings(client=True, initial_values=values)
        self.client.initiate_connection()
        self.requests: list[Request] = []
        self.events: list[h2.events.Event] = []
        self.pump()

    def pump(self) -> None:
        """Move bytes both ways until neither side has anything to say."""
        while True:
            to_server = self.client.data_to_send()
            if to_server:
                self.requests += self.server.receive(to_server)
            to_client = bytes(self.server.out)
            self.server.out.clear()
            if to_client:
                self.events += self.client.receive_data(to_client)
            if not to_server and not to_client:
                return

    def get(self, headers: list[tuple[str, str]] = GET, end_stream: bool = True) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, headers, end_stream=end_stream)
        self.pump()
        return sid

    def of(self, kind: type, sid: int | None = None) -> list:
        return [e for e in self.events if isinstance(e, kind)
                and (sid is None or getattr(e, "stream_id", None) == sid)]

    def body(self, sid: int) -> bytes:
        return b"".join(e.data for e in self.of(h2.events.DataReceived, sid))


def answer(pair: Pair, sid: int, status: int = 200, body: bytes = b'{"status":"WHITELISTED"}',
           headers: list[tuple[str, str]] | None = None) -> bool:
    hs = headers if headers is not None else [("content-type", "application/json")]
    ok = pair.server.respond(sid, encode_head(status, hs, len(body)), body)
    pair.pump()
    return ok


def test_requests_and_answers_round_trip_with_an_independent_client() -> None:
    p = Pair()
    sids = [p.get() for _ in range(3)]
    assert [r[0] for r in p.requests] == sids
    r = p.requests[0]
    assert r[1:4] == (
        "GET", "/n5g-eir-eic/v1/equipment-status", "pei=imei-352099001761481")
    for status, sid in zip((200, 404, 405), sids, strict=True):
        assert answer(p, sid, status, headers=[("content-type", "application/problem+json"),
                                               ("allow", "GET"), ("x-odd", "v")])
    for status, sid in zip((200, 404, 405), sids, strict=True):
        (resp,) = p.of(h2.events.ResponseReceived, sid)
        hs = dict(resp.headers)
        assert hs[":status"] == str(status) and hs["content-length"] == "24"
        assert hs["allow"] == "GET" and hs["x-odd"] == "v"
        assert p.body(sid) == b'{"status":"WHITELISTED"}'
        assert p.of(h2.events.StreamEnded, sid)
    assert not p.server.busy and not p.server.closed


def test_date_literal_and_large_integers_decode() -> None:
    block = encode_head(500, [("content-type", "x" * 300)], 123456) + literal(
        "date", "Tue, 01 Dec 2026 00:00:00 GMT")
    decoded = hpack.Decoder().decode(block)
    assert decoded[0] == (":status", "500")
    assert ("content-type", "x" * 300) in decoded and ("content-length", "123456") in decoded
    assert decoded[-1] == ("date", "Tue, 01 Dec 2026 00:00:00 GMT")


def test_flow_control_holds_a_large_answer_until_the_client_opens_its_window() -> None:
    p = Pair(initial_window=100)
    sid = p.get()
    body = bytes(range(256)) * 400  # 100 KiB: above the stream and connection windows
    # the h2 client acknowledges nothing by itself: the answer stops at its 100-octet window
    assert answer(p, sid, body=body)
    assert len(p.body(sid)) == 100 and not p.of(h2.events.StreamEnded, sid)
    assert p.server.busy
    while not p.of(h2.events.StreamEnded, sid):
        got = len(p.body(sid))
        p.client.increment_flow_control_window(5000, sid)
        p.client.increment_flow_control_window(5000)
        p.pump()
        assert len(p.body(sid)) > got
    assert p.body(sid) == body and not p.server.busy


def test_a_larger_initial_window_releases_held_answers() -> None:
    p = Pair(initial_window=0)
    sid = p.get()
    assert answer(p, sid)
    assert p.body(sid) == b""
    p.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535})
    p.pump()
    assert p.body(sid) == b'{"status":"WHITELISTED"}' and p.of(h2.events.StreamEnded, sid)


def test_ping_is_acknowledged_and_settings_too() -> None:
    p = Pair()
    p.client.ping(b"12345678")
    p.pump()
    assert [e.ping_data for e in p.of(h2.events.PingAckReceived)] == [b"12345678"]
    assert p.of(h2.events.SettingsAcknowledged)
    remote = p.of(h2.events.RemoteSettingsChanged)[0].changed_settings
    assert remote[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS].new_value == 1000
    assert remote[h2.settings.SettingCodes.ENABLE_PUSH].new_value == 0


def test_reset_stream_drops_its_answer() -> None:
    p = Pair()
    sid = p.get()
    p.client.reset_stream(sid)
    p.pump()
    assert not answer(p, sid)
    assert not p.of(h2.events.ResponseReceived)


def test_request_with_a_body_and_continuation_frames() -> None:
    p = Pair(H2Connection(max_header_list_size=65536))
    big = [*GET, ("x-big", "v" * 20000)]  # above one frame: HEADERS + CONTINUATION
    sid = p.get(big, end_stream=False)
    assert not p.requests
    p.client.send_data(sid, b"x" * 15000)
    p.client.send_data(sid, b"x" * 15000, end_stream=True)
    p.pump()
    assert len(p.requests) == 1 and p.requests[0][4]["x-big"] == "v" * 20000
    # every DATA octet given back to the connection window
    assert p.client.outbound_flow_control_window == 65535
    assert answer(p, sid)


def test_a_header_list_over_the_limit_is_431_on_its_stream_and_the_connection_goes_on() -> None:
    # RFC 9113 10.5.1. The h2 client indexes both fields of the big request in its dynamic
    # table and names "x-tag" by index in the next one: that one decodes right only if the
    # big block was decoded in full.
    p = Pair()
    big = p.get([*GET, ("x-tag", "t1"), ("x-big", "v" * 20000)])
    assert not p.requests and not p.server.closed and p.server.too_large == [big]
    assert p.server.errors == [(None, "header list too large: answered 431")]
    assert answer(p, big, 431)
    small = p.get([*GET, ("x-tag", "t1")])
    assert [(r[0], r[4]) for r in p.requests] == [(small, {"x-tag": "t1"})]
    assert answer(p, small)
    assert dict(p.of(h2.events.ResponseReceived, big)[0].headers)[":status"] == "431"
    assert not p.of(h2.events.ConnectionTerminated)
    # with a body to follow, the stream is reset instead (nothing to answer it from yet)
    sid = p.get([*GET, ("x-big", "w" * 20000)], end_stream=False)
    assert p.of(h2.events.StreamReset, sid) and not p.server.closed


def test_malformed_requests_are_stream_errors_and_the_connection_lives_on() -> None:
    p = Pair()
    bad = [
        [*GET, ("Upper", "x")],
        [*GET, ("connection", "keep-alive")],
        [("x-first", "1"), *GET],
        [(":method", "GET"), (":scheme", "http"), (":authority", "eir")],
        [*GET, ("te", "gzip")],
        [*GET, (":status", "200")],
    ]
    client = p.client
    for hs in bad:
        sid = client.get_next_available_stream_id()
        # the h2 client refuses to send these itself: encode them by hand
        block = hpack.Encoder().encode(hs)
        p.requests += p.server.receive(
            frame(h2conn.HEADERS, h2conn.END_HEADERS | h2conn.END_STREAM, sid, block))
        out = bytes(p.server.out)
        p.server.out.clear()
        assert out[3] == h2conn.RST_STREAM and struct.unpack(">L", out[9:13])[0] == 1
        client.highest_outbound_stream_id = sid
    assert not p.requests and not p.server.closed


def raw_server(*frames_: bytes) -> H2Connection:
    s = H2Connection()
    s.out.clear()
    s.receive(PREFACE + frame(h2conn.SETTINGS, 0, 0) + b"".join(frames_))
    return s


def goaway_code(s: H2Connection) -> int:
    out = bytes(s.out)
    i = 0
    while i < len(out):
        n = int.from_bytes(out[i:i + 3], "big")
        if out[i + 3] == h2conn.GOAWAY:
            return int(struct.unpack(">L", out[i + 13:i + 17])[0])
        i += 9 + n
    raise AssertionError("no GOAWAY")


def _resets(s: H2Connection) -> list[tuple[int, int]]:
    out, i, found = bytes(s.out), 0, []
    while i < len(out):
        n = int.from_bytes(out[i:i + 3], "big")
        if out[i + 3] == h2conn.RST_STREAM:
            found.append((int.from_bytes(out[i + 5:i + 9], "big"),
                          int.from_bytes(out[i + 9:i + 13], "big")))
        i += 9 + n
    return found


HEADERS_BLOCK = hpack.Encoder().encode(GET)


@pytest.mark.parametrize("frames_, code", [
    ([frame(h2conn.HEADERS, 0x5, 1, b"\xff\xff\xff\xff")], h2conn.COMPRESSION_ERROR),
    ([frame(h2conn.PING, 0, 0, b"1234")], h2conn.FRAME_SIZE_ERROR),
    ([frame(h2conn.PING, 0, 1, b"12345678")], h2conn.PROTOCOL_ERROR),
    ([b"\x00\x40\x01" + bytes((h2conn.DATA, 0)) + b"\x00\x00\x00\x01"], h2conn.FRAME_SIZE_ERROR),
    ([frame(h2conn.HEADERS, 0x5, 2, HEADERS_BLOCK)], h2conn.PROTOCOL_ERROR),
    ([frame(h2conn.CONTINUATION, 0x4, 1, b"")], h2conn.PROTOCOL_ERROR),
    ([frame(h2conn.HEADERS, 0x1, 1, HEADERS_BLOCK), frame(h2conn.PING, 0, 0, b"12345678")],
     h2conn.PROTOCOL_ERROR),
    ([frame(h2conn.WINDOW_UPDATE, 0, 0, struct.pack(">L", 0x7FFFFFFF))],
     h2conn.FLOW_CONTROL_ERROR),
    ([frame(h2conn.WINDOW_UPDATE, 0, 0, struct.pack(">L", 0))], h2conn.PROTOCOL_ERROR),
    ([frame(h2conn.SETTINGS, 0, 0, struct.pack(">HL", 4, 0x80000000))],
     h2conn.FLOW_CONTROL_ERROR),
    ([frame(h2conn.SETTINGS, 0, 0, struct.pack(">HL", 5, 100))], h2conn.PROTOCOL_ERROR),
    ([frame(h2conn.SETTINGS, 0, 0, b"12345")], h2conn.FRAME_SIZE_ERROR),
    ([frame(h2conn.PUSH_PROMISE, 0x4, 1, b"\x00\x00\x00\x02")], h2conn.PROTOCOL_ERROR),
    ([frame(h2conn.DATA, 0, 3, b"x")], h2conn.PROTOCOL_ERROR),  # idle stream
    ([frame(h2conn.HEADERS, 0x5, 3, HEADERS_BLOCK), frame(h2conn.HEADERS, 0x5, 1, b"\x82")],
     h2conn.STREAM_CLOSED),  # lower id than one already opened
    ([frame(h2conn.HEADERS, 0xD, 1, b"\xff" + HEADERS_BLOCK)], h2conn.PROTOCOL_ERROR),  # pad
    ([frame(h2conn.HEADERS, 0x1, 1, b"\x82"), frame(h2conn.CONTINUATION, 0x0, 1, b"x" * 16384)
      * 5], h2conn.ENHANCE_YOUR_CALM),
])
def test_connection_errors_end_with_goaway(frames_: list[bytes], code: int) -> None:
    s = raw_server(*frames_)
    assert s.closed and goaway_code(s) == code and s.errors[-1][0] == code
    assert s.receive(frame(h2conn.PING, 0, 0, b"12345678")) == []  # nothing after


def test_first_frame_must_be_settings_and_preface_must_match() -> None:
    s = H2Connection()
    s.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.closed and goaway_code(s) == h2conn.PROTOCOL_ERROR
    s = H2Connection()
    s.receive(PREFACE + frame(h2conn.PING, 0, 0, b"12345678"))
    assert s.closed and goaway_code(s) == h2conn.PROTOCOL_ERROR


def test_stream_level_errors_reset_only_that_stream() -> None:
    s = raw_server(
        frame(h2conn.PRIORITY, 0, 1, b"\x00\x00\x00\x01\x10"),  # depends on itself
        frame(h2conn.PRIORITY, 0, 3, b"\x00\x00"),  # wrong length
        frame(h2conn.HEADERS, 0x4, 5, hpack.Encoder().encode([*GET, ("content-length", "5")])),
        frame(h2conn.DATA, 0x1, 5, b"abc"),  # 3 octets against content-length 5
    )
    assert not s.closed
    assert _resets(s) == [(1, h2conn.PROTOCOL_ERROR), (3, h2conn.FRAME_SIZE_ERROR),
                          (5, h2conn.PROTOCOL_ERROR)]
    assert [code for code, _ in s.errors] == [None, None, None]  # stream errors, all listed


def test_padded_priority_headers_and_concurrency_limit() -> None:
    s = H2Connection(max_concurrent_streams=2)
    s.out.clear()
    enc = hpack.Encoder()
    padded = b"\x03" + b"\x00\x00\x00\x00\x10" + enc.encode(GET) + b"\x00\x00\x00"
    got = s.receive(PREFACE + frame(h2conn.SETTINGS, 0, 0)
                    + frame(h2conn.HEADERS, 0x2D, 1, padded)
                    + frame(h2conn.HEADERS, 0x5, 3, enc.encode(GET))
                    + frame(h2conn.HEADERS, 0x5, 5, enc.encode(GET)))
    assert [r[0] for r in got] == [1, 3]
    assert bytes(s.out).endswith(frame(h2conn.RST_STREAM, 0, 5, struct.pack(">L", 7)))
    assert not s.closed


def test_graceful_goaway_answers_open_streams_and_ignores_new_ones() -> None:
    enc = hpack.Encoder()
    s = raw_server(frame(h2conn.HEADERS, 0x5, 1, enc.encode(GET)))
    s.goaway()
    assert goaway_code(s) == h2conn.NO_ERROR and bytes(s.out)[-8:-4] == b"\x00\x00\x00\x01"
    assert s.receive(frame(h2conn.HEADERS, 0x5, 3, enc.encode(GET))) == []
    assert s.busy
    assert s.respond(1, encode_head(200, [], 2), b"{}") and not s.busy and not s.closed
    assert not s.respond(3, encode_head(200, [], 2), b"{}")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), max_size=30))
def test_any_split_of_the_input_gives_the_same_requests(cuts: list[int]) -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    for i in range(5):
        client.send_headers(1 + 2 * i, [*GET[:3], (":path", f"/p{i}?q={i}")], end_stream=True)
    data = client.data_to_send()
    s = H2Connection()
    got: list[Request] = []
    pos = 0
    for c in cuts:
        got += s.receive(data[pos:pos + c])
        pos += c
    got += s.receive(data[pos:])
    assert [(r[0], r[2], r[3]) for r in got] == [
        (1 + 2 * i, f"/p{i}", f"q={i}") for i in range(5)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_frames_never_raise(junk: bytes) -> None:
    s = H2Connection()
    s.receive(PREFACE + frame(h2conn.SETTINGS, 0, 0) + junk)
    s.receive(junk)


def test_answers_held_by_flow_control_count_as_open_streams() -> None:
    """A consumer that never opens its window cannot make us hold unbounded answers."""
    s = H2Connection(max_concurrent_streams=2)
    enc = hpack.Encoder()
    s.receive(PREFACE + frame(h2conn.SETTINGS, 0, 0, struct.pack(">HL", 4, 0)))
    for sid in (1, 3):
        assert [r[0] for r in s.receive(
            frame(h2conn.HEADERS, 0x5, sid, enc.encode(GET)))] == [sid]
        assert s.respond(sid, encode_head(200, [], 2), b"{}")
    s.out.clear()
    assert s.busy
    assert s.receive(frame(h2conn.HEADERS, 0x5, 5, enc.encode(GET))) == []
    assert bytes(s.out) == frame(h2conn.RST_STREAM, 0, 5, struct.pack(">L", 7))
    s.out.clear()
    s.receive(frame(h2conn.WINDOW_UPDATE, 0, 1, struct.pack(">L", 2)))  # one answer goes out
    assert bytes(s.out) == frame(h2conn.DATA, h2conn.END_STREAM, 1, b"{}")
    assert [r[0] for r in s.receive(
        frame(h2conn.HEADERS, 0x5, 7, enc.encode(GET)))] == [7]


_BASE = [(":method", "GET"), (":scheme", "http"), (":path", "/x?q")]


@pytest.mark.parametrize("fields, reason", [
    ([*_BASE, ("", "v")], "bad header field ''"),
    ([*_BASE, ("a", "1"), (":authority", "h")], "bad header field ':authority'"),
    ([*_BASE, (":foo", "1")], "bad header field ':foo'"),
    ([*_BASE, (":method", "GET")], "bad pseudo-header ':method'"),
    ([*_BASE, ("Upper", "1")], "bad header field 'Upper'"),
    ([*_BASE, ("connection", "close")], "bad header field 'connection'"),
    ([*_BASE, ("te", "gzip")], "bad header field 'te'"),
    (_BASE[:2], "missing :method, :scheme or :path"),
    ([(":method", "GET"), (":path", "/")], "missing :method, :scheme or :path"),
])
def test_malformed_requests_are_stream_errors(fields: list[tuple[str, str]], reason: str) -> None:
    with pytest.raises(h2conn._StreamError) as e:
        h2conn._request(1, fields)
    assert e.value.reason == reason


def test_a_well_formed_request_keeps_its_fields() -> None:
    r = h2conn._request(3, [*_BASE, (":authority", "h"), ("a", "1"), ("te", "trailers"),
                            ("a", "2")])
    assert r == (3, "GET", "/x", "q", {"a": "1, 2", "te": "trailers"})


@pytest.mark.parametrize("noop", [
    frame(h2conn.PRIORITY, 0, 1, b"\0\0\0\0\x10"),
    frame(0x20, 0, 0, b""),  # an unknown (extension) frame type
    frame(h2conn.SETTINGS, 0, 0, b""),
])
def test_frames_without_requests_are_bounded(noop: bytes) -> None:
    s = raw_server()
    s.receive(noop * 900)
    assert not s.closed
    s.receive(frame(h2conn.HEADERS, 0x5, 1, HEADERS_BLOCK))  # a request earns some back
    s.receive(noop * 150)
    assert not s.closed
    s.receive(noop * 100)
    assert goaway_code(s) == h2conn.ENHANCE_YOUR_CALM


def test_empty_continuation_frames_are_bounded() -> None:
    s = raw_server(frame(h2conn.HEADERS, 0x1, 1, HEADERS_BLOCK[:2]))
    s.receive(frame(h2conn.CONTINUATION, 0, 1, b"") * 40)
    assert goaway_code(s) == h2conn.ENHANCE_YOUR_CALM


def _literal(name: bytes, value: bytes, indexing: bool) -> bytes:
    """A literal field with a new name (RFC 7541 6.2.1 / 6.2.2), no Huffman."""
    return (b"\x40" if indexing else b"\x00") + bytes([len(name)]) + name + \
        bytes([len(value)]) + value


def test_forbidden_field_values_are_malformed_requests() -> None:
    # RFC 9113 8.2.1: NUL, CR or LF anywhere, or SP/HTAB at either end
    bad = [b"a\nb", b"a\rb", b"a\0b", b" a", b"a ", b"\ta", b"a\t"]
    blocks = [HEADERS_BLOCK + _literal(b"x-v", v, False) for v in bad]
    s = raw_server(*(frame(h2conn.HEADERS, 0x5, 1 + 2 * k, b) for k, b in enumerate(blocks)))
    assert _resets(s) == [(1 + 2 * k, h2conn.PROTOCOL_ERROR) for k in range(len(bad))]
    assert not s.closed
    # allowed: HTAB and obs-text inside, an empty value; the next request is served
    ok = HEADERS_BLOCK + _literal(b"x-v", b"a\tb\xe9", False) + _literal(b"x-e", b"", False)
    (req,) = s.receive(frame(h2conn.HEADERS, 0x5, 21, ok))
    assert req[4] == {"x-v": "a\tb\xe9", "x-e": ""}
    # indexed, every later request naming it would be malformed: the connection ends
    s.receive(frame(h2conn.HEADERS, 0x5, 23, HEADERS_BLOCK + _literal(b"x-v", b"a\nb", True)))
    assert s.closed and goaway_code(s) == h2conn.PROTOCOL_ERROR

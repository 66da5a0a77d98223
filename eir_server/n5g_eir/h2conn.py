"""The server side of one HTTP/2 connection (RFC 9113), sans I/O: bytes in, requests out;
responses in, bytes out. The asyncio shell (`io/http_server.py`) only moves bytes.

Built for what SBI consumers send: many concurrent GETs without bodies on long-lived
connections. Everything a peer may send is handled as RFC 9113 says (flow control, padding,
CONTINUATION, PRIORITY, RST_STREAM, SETTINGS, PING, GOAWAY, unknown frames); request bodies are
accepted and discarded (N5g-eir has none). Responses use no HPACK dynamic table, so answer
header blocks are pre-encoded once per distinct answer and the encoder never holds state.

Errors: a connection error queues GOAWAY and sets `closed` (the shell closes after flushing);
a stream error queues RST_STREAM and forgets the stream. Each is listed in `errors`, for logs.
"""

from __future__ import annotations

import re
import struct

from .hpack import Decoder, HeaderListTooLarge, HpackError, MalformedValue, encode_integer

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT, STREAM_CLOSED, \
    FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, CONNECT_ERROR, \
    ENHANCE_YOUR_CALM = range(12)

MAX_WINDOW = 0x7FFFFFFF
DEFAULT_WINDOW = 65535
MIN_FRAME = 16384  # also the largest frame we accept (we never raise SETTINGS_MAX_FRAME_SIZE)
MAX_FRAME = 16777215

# SETTINGS identifiers (RFC 9113 6.5.2)
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, \
    MAX_HEADER_LIST_SIZE = range(1, 7)

_HEAD = struct.Struct(">BHBBL")  # 24-bit length as 8 + 16 bits, type, flags, stream id
_U32 = struct.Struct(">L")
_GOAWAY = struct.Struct(">LL")
_SETTING = struct.Struct(">HL")

# Frames that carry no request (PRIORITY, SETTINGS, unknown types, empty DATA or CONTINUATION)
# cost a worker as much as a request's frames and are not seen by the overload controls: a peer
# may send _NOOP_BUDGET of them, and each request it completes earns _NOOP_PER_REQUEST back (up to
# the budget); beyond, GOAWAY ENHANCE_YOUR_CALM (CVE-2019-9513/-9518, CVE-2024-27316 class).
_NOOP_BUDGET = 1000
_NOOP_PER_REQUEST = 100
# CONTINUATION frames one header block may take (clients fill frames: 4 carry _max_block)
_MAX_CONTINUATIONS = 32

# RFC 9113 8.2.2: fields that only mean something to HTTP/1.1 connections
_CONNECTION_SPECIFIC = frozenset(
    ("connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"))


# A complete request: (stream id, method, path without the query, query after "?" or "",
# regular fields with lower-case names, repeats joined by ", "). A plain tuple: one is built per
# request, and a NamedTuple subclass costs ~1.4k instructions more to build.
Request = tuple[int, str, str, str, dict[str, str]]


class _Receiving:
    """A request whose header block is complete but whose body (END_STREAM) has not come."""

    __slots__ = ("request", "window", "length", "expected")

    def __init__(self, request: Request, window: int, expected: int | None) -> None:
        self.request = request
        self.window = window  # our send window for the stream, for the answer to come
        self.length = 0  # body octets received
        self.expected = expected  # content-length, if sent


class _Held:
    """An answer's body held back by flow control."""

    __slots__ = ("window", "left")

    def __init__(self, window: int, left: memoryview) -> None:
        self.window = window  # our send window for the stream
        self.left = left


class _StreamError(Exception):
    def __init__(self, stream_id: int, code: int, reason: str) -> None:
        self.stream_id, self.code, self.reason = stream_id, code, reason


class _ConnectionError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        self.code, self.reason = code, reason


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HEAD.pack(n >> 16, n & 0xFFFF, ftype, flags, stream_id) + payload


class H2Connection:
    """One server connection. `receive(data)` returns the requests completed by `data`;
    `respond(...)` answers one; `out` holds the bytes to write (the shell empties it)."""

    __slots__ = ("out", "closed", "errors", "max_streams", "_buf", "_preface", "_settings",
                 "_decoder", "_last", "_open", "_receiving", "_pending", "_window",
                 "_initial", "_max_frame", "_cont", "_max_block", "_goaway", "_noop",
                 "_cont_frames", "too_large")

    def __init__(self, max_concurrent_streams: int = 1000,
                 max_header_list_size: int = 16384) -> None:
        self.max_streams = max_concurrent_streams
        settings = (_SETTING.pack(MAX_CONCURRENT_STREAMS, max_concurrent_streams)
                    + _SETTING.pack(MAX_HEADER_LIST_SIZE, max_header_list_size)
                    + _SETTING.pack(ENABLE_PUSH, 0))
        self.out = bytearray(frame(SETTINGS, 0, 0, settings))  # the server preface
        self.closed = False  # a GOAWAY for an error is queued: close once it is written
        # (GOAWAY code, or None for a stream reset; reason) per error, for the shell to count
        # and log; it empties the list
        self.errors: list[tuple[int | None, str]] = []
        # Streams whose header list was over the limit, open for the shell to answer 431 (it
        # empties the list); each also has its line in `errors`
        self.too_large: list[int] = []
        self._buf = b""
        self._preface = False
        self._settings = False  # the peer's first SETTINGS seen
        self._decoder = Decoder(4096, max_header_list_size, check_values=True)
        self._last = 0  # highest stream id the peer opened
        self._open: dict[int, int] = {}  # streams awaiting our answer -> our send window
        self._receiving: dict[int, _Receiving] = {}
        self._pending: dict[int, _Held] = {}  # answers held back by flow control
        self._window = DEFAULT_WINDOW  # connection send window
        self._initial = DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self._max_frame = MIN_FRAME  # the peer's SETTINGS_MAX_FRAME_SIZE
        self._cont: tuple[int, int, bytearray] | None = None  # header block awaiting CONTINUATION
        # A header block may not grow past this while CONTINUATION frames come (a block far
        # above the header list limit is an attack, not a request).
        self._max_block = 4 * max_header_list_size
        self._goaway = False  # we sent GOAWAY (graceful or not): new streams are ignored
        self._noop = _NOOP_BUDGET  # frames without a request the peer may still send
        self._cont_frames = 0  # CONTINUATION frames of the header block in _cont

    @property
    def established(self) -> bool:
        """The peer's preface and first SETTINGS came."""
        return self._settings

    @property
    def busy(self) -> bool:
        """Streams are open or answers wait for flow control."""
        return bool(self._open or self._receiving or self._pending)

    # --- input ---------------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Request]:
        if self.closed:
            return []
        buf = self._buf + data if self._buf else data
        pos = 0
        n = len(buf)
        requests: list[Request] = []
        try:
            if not self._preface:
                if n < 24:
                    if not PREFACE.startswith(buf):
                        raise _ConnectionError(PROTOCOL_ERROR, "not the HTTP/2 preface")
                    self._buf = buf
                    return requests
                if buf[:24] != PREFACE:
                    raise _ConnectionError(PROTOCOL_ERROR, "not the HTTP/2 preface")
                self._preface = True
                pos = 24
            unpack = _HEAD.unpack_from
            while n - pos >= 9:
                hi, lo, ftype, flags, sid = unpack(buf, pos)
                length = hi << 16 | lo
                if length > MIN_FRAME:
                    raise _ConnectionError(FRAME_SIZE_ERROR, "frame larger than 16384")
                end = pos + 9 + length
                if end > n:
                    break
                payload = buf[pos + 9:end]
                pos = end
                sid &= MAX_WINDOW
                try:
                    if self._cont is not None:
                        req = self._continuation(ftype, flags, sid, payload)
                    elif ftype == HEADERS:
                        req = self._headers(flags, sid, payload)
                    else:
                        req = self._other(ftype, flags, sid, payload)
                except _StreamError as se:  # not `e`: mypyc types one name per function
                    self._reset(se.stream_id, se.code)
                    self.errors.append((None, se.reason))
                    continue
                if req is not None:
                    requests.append(req)
                    noop = self._noop + _NOOP_PER_REQUEST
                    self._noop = noop if noop < _NOOP_BUDGET else _NOOP_BUDGET
        except _ConnectionError as e:
            self.fail(e.code, e.reason)
            return []
        self._buf = buf[pos:] if pos < n else b""
        return requests

    def _headers(self, flags: int, sid: int, payload: bytes) -> Request | None:
        if not self._settings:
            raise _ConnectionError(PROTOCOL_ERROR, "the first frame must be SETTINGS")
        if sid == 0 or not sid & 1:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on a stream a client cannot open")
        if flags & (PADDED | PRIORITY_FLAG):
            payload = _unpad(payload, flags)
            if flags & PRIORITY_FLAG:
                if len(payload) < 5:
                    raise _ConnectionError(FRAME_SIZE_ERROR, "HEADERS priority too short")
                if _U32.unpack_from(payload)[0] & MAX_WINDOW == sid:
                    # decode first: the HPACK state must stay in step with the peer's
                    self._block(flags, sid, payload[5:])
                    raise _StreamError(sid, PROTOCOL_ERROR, "stream depends on itself")
                payload = payload[5:]
        if not flags & END_HEADERS:
            self._cont = (sid, flags, bytearray(payload))
            self._cont_frames = 0
            return None
        return self._block(flags, sid, payload)

    def _continuation(self, ftype: int, flags: int, sid: int, payload: bytes) -> Request | None:
        assert self._cont is not None
        csid, cflags, block = self._cont
        if ftype != CONTINUATION or sid != csid:
            raise _ConnectionError(PROTOCOL_ERROR, "header block interrupted")
        block += payload
        if len(block) > self._max_block:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "header block too large")
        self._cont_frames += 1
        if self._cont_frames > _MAX_CONTINUATIONS:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "too many CONTINUATION frames")
        if not flags & END_HEADERS:
            return None
        self._cont = None
        return self._block(cflags, sid, bytes(block))

    def _block(self, flags: int, sid: int, block: bytes) -> Request | None:
        fields: list[tuple[str, str]] | None
        try:
            fields = self._decoder.decode(block)
        except HeaderListTooLarge:  # decoded in full all the same: the connection goes on
            fields = None
        except MalformedValue as bad:  # not `e` (below): mypyc types one name per function
            raise _ConnectionError(PROTOCOL_ERROR, str(bad)) from None
        except HpackError as e:
            raise _ConnectionError(COMPRESSION_ERROR, f"HPACK: {e}") from None
        receiving = self._receiving.get(sid)
        if receiving is not None:  # trailers
            if not flags & END_STREAM:
                del self._receiving[sid]
                raise _StreamError(sid, PROTOCOL_ERROR, "trailers without END_STREAM")
            return self._complete(sid, receiving)
        if sid <= self._last:
            if sid in self._open or sid in self._pending:
                raise _StreamError(sid, STREAM_CLOSED, "HEADERS on a half-closed stream")
            raise _ConnectionError(STREAM_CLOSED, "HEADERS on a closed stream")
        self._last = sid
        if self._goaway:
            return None  # RFC 9113 6.8: streams above our GOAWAY's last id are ignored
        # Streams whose answers wait for flow control are still open for the peer: they count,
        # so a peer that never opens its window cannot make us hold unbounded answers.
        if len(self._open) + len(self._receiving) + len(self._pending) >= self.max_streams:
            raise _StreamError(sid, REFUSED_STREAM, "too many concurrent streams")
        if fields is None:
            # RFC 9113 10.5.1: 431 on this stream alone, not the end of the connection (an SCP
            # carries other consumers' requests on it)
            if not flags & END_STREAM:
                raise _StreamError(sid, PROTOCOL_ERROR, "header list too large")
            self._open[sid] = self._initial
            self.too_large.append(sid)
            self.errors.append((None, "header list too large: answered 431"))
            return None
        if self._decoder.malformed:  # (of this block: decode() starts each with False)
            raise _StreamError(sid, PROTOCOL_ERROR,
                               "a field value with NUL, CR, LF or whitespace at an end")
        request = _request(sid, fields)
        if flags & END_STREAM:
            headers = request[4]
            if "content-length" in headers and headers["content-length"] != "0":
                raise _StreamError(sid, PROTOCOL_ERROR, "content-length without a body")
            self._open[sid] = self._initial
            return request
        expected: int | None = None
        cl = request[4].get("content-length")
        if cl is not None:
            if not (cl.isascii() and cl.isdigit()):
                raise _StreamError(sid, PROTOCOL_ERROR, "bad content-length")
            expected = int(cl)
        self._receiving[sid] = _Receiving(request, self._initial, expected)
        return None

    def _complete(self, sid: int, r: _Receiving) -> Request | None:
        del self._receiving[sid]
        if r.expected is not None and r.expected != r.length:
            raise _StreamError(sid, PROTOCOL_ERROR, "body length differs from content-length")
        self._open[sid] = r.window
        return r.request

    def _other(self, ftype: int, flags: int, sid: int, payload: bytes) -> Request | None:
        if not self._settings and ftype != SETTINGS:
            raise _ConnectionError(PROTOCOL_ERROR, "the first frame must be SETTINGS")
        if ftype == DATA:
            return self._data(flags, sid, payload)
        if ftype == WINDOW_UPDATE:
            self._window_update(sid, payload)
        elif ftype == SETTINGS:
            self._settings_frame(flags, sid, payload)
        elif ftype == PING:
            if sid:
                raise _ConnectionError(PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise _ConnectionError(FRAME_SIZE_ERROR, "PING not 8 octets")
            if not flags & ACK:
                self.out += frame(PING, ACK, 0, payload)
        elif ftype == RST_STREAM:
            if len(payload) != 4:
                raise _ConnectionError(FRAME_SIZE_ERROR, "RST_STREAM not 4 octets")
            if sid == 0 or sid > self._last:
                raise _ConnectionError(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            self._forget(sid)
        elif ftype == PRIORITY:
            self._idle_frame()
            if sid == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                raise _StreamError(sid, FRAME_SIZE_ERROR, "PRIORITY not 5 octets")
            if _U32.unpack_from(payload)[0] & MAX_WINDOW == sid:
                raise _StreamError(sid, PROTOCOL_ERROR, "stream depends on itself")
        elif ftype == GOAWAY:
            if sid:
                raise _ConnectionError(PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise _ConnectionError(FRAME_SIZE_ERROR, "GOAWAY too short")
            # The peer opens no more streams; those open are still answered.
        elif ftype == CONTINUATION:
            raise _ConnectionError(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        elif ftype == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        else:  # other types are extensions: ignored (RFC 9113 4.1)
            self._idle_frame()
        return None

    def _idle_frame(self) -> None:
        """A frame that carries no request: within the peer's budget, or the connection ends."""
        self._noop -= 1
        if self._noop < 0:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "too many frames that carry no request")

    def _data(self, flags: int, sid: int, payload: bytes) -> Request | None:
        if sid == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)
        body = len(_unpad(payload, flags)) if flags & PADDED else size
        # The whole frame counts against flow control; we consume it at once, so give the
        # connection's share back now (the stream's too, while it stays open).
        if size:
            self.out += frame(WINDOW_UPDATE, 0, 0, _U32.pack(size))
        r = self._receiving.get(sid)
        if r is None:
            if sid > self._last:
                raise _ConnectionError(PROTOCOL_ERROR, "DATA on an idle stream")
            raise _StreamError(sid, STREAM_CLOSED, "DATA on a closed stream")
        r.length += body
        if flags & END_STREAM:
            return self._complete(sid, r)
        if size:
            self.out += frame(WINDOW_UPDATE, 0, sid, _U32.pack(size))
        else:
            self._idle_frame()
        return None

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 octets")
        inc = _U32.unpack(payload)[0] & MAX_WINDOW
        if sid == 0:
            if inc == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._window += inc
            if self._window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
        else:
            if sid > self._last:
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            if inc == 0:
                self._forget(sid)
                raise _StreamError(sid, PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            window: int
            if sid in self._open:
                window = self._open[sid] = self._open[sid] + inc
            elif sid in self._pending:
                held = self._pending[sid]
                window = held.window = held.window + inc
            elif sid in self._receiving:
                r = self._receiving[sid]
                window = r.window = r.window + inc
            else:
                return  # a stream we closed: allowed to arrive late
            if window > MAX_WINDOW:
                self._forget(sid)
                raise _StreamError(sid, FLOW_CONTROL_ERROR, "stream window above 2^31-1")
        if self._pending:
            self._drain()

    def _settings_frame(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS not a multiple of 6 octets")
        if self._settings:
            self._idle_frame()
        self._settings = True
        for i in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, i)
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "initial window above 2^31-1")
                delta = value - self._initial
                self._initial = value
                if delta:
                    self._shift_windows(delta)
            elif key == MAX_FRAME_SIZE:
                if not MIN_FRAME <= value <= MAX_FRAME:
                    raise _ConnectionError(PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                self._max_frame = value
            elif key == ENABLE_PUSH and value > 1:
                raise _ConnectionError(PROTOCOL_ERROR, "bad SETTINGS_ENABLE_PUSH")
            # HEADER_TABLE_SIZE: our encoder uses no dynamic table, any size suits it.
        self.out += frame(SETTINGS, ACK, 0)
        if self._pending:
            self._drain()

    def _shift_windows(self, delta: int) -> None:
        """RFC 9113 6.9.2: a new initial window changes every open stream's window."""
        for sid in self._open:
            self._open[sid] += delta
            if self._open[sid] > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "stream window above 2^31-1")
        for held in self._pending.values():
            held.window += delta
            if held.window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "stream window above 2^31-1")
        for r in self._receiving.values():
            r.window += delta

    # --- output --------------------------------------------------------------------------

    def respond(self, sid: int, head: bytes, body: bytes) -> bool:
        """Answer stream `sid` with an HPACK-encoded header block and a body. False when the
        stream is gone (reset by the peer, or the connection failed): the answer is dropped."""
        window = self._open.pop(sid, None)
        if window is None or self.closed:
            return False
        out = self.out
        n = len(head)
        if n <= self._max_frame:
            out += _HEAD.pack(n >> 16, n & 0xFFFF, HEADERS,
                              END_HEADERS if body else END_HEADERS | END_STREAM, sid)
            out += head
        else:
            self._split_head(sid, head, not body)
        if not body:
            return True
        n = len(body)
        if n <= window and n <= self._window and n <= self._max_frame and not self._pending:
            self._window -= n
            out += _HEAD.pack(n >> 16, n & 0xFFFF, DATA, END_STREAM, sid)
            out += body
        else:
            self._pending[sid] = _Held(window, memoryview(body))
            self._drain()
        return True

    def _split_head(self, sid: int, head: bytes, end_stream: bool) -> None:
        size = self._max_frame
        chunks = [head[i:i + size] for i in range(0, len(head), size)]
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            if i == 0:
                flags = (END_STREAM if end_stream else 0) | (END_HEADERS if last else 0)
                self.out += frame(HEADERS, flags, sid, chunk)
            else:
                self.out += frame(CONTINUATION, END_HEADERS if last else 0, sid, chunk)

    def _drain(self) -> None:
        """Send what flow control now allows of held-back answers, oldest stream first."""
        if self._window <= 0:
            return
        for sid in list(self._pending):
            if self._window <= 0:
                return
            held = self._pending[sid]
            window, left = held.window, held.left
            while left and window > 0 and self._window > 0:
                n = min(len(left), window, self._window, self._max_frame)
                chunk, left = left[:n], left[n:]
                window -= n
                self._window -= n
                self.out += frame(DATA, 0 if left else END_STREAM, sid, bytes(chunk))
            if left:
                held.window, held.left = window, left
            else:
                del self._pending[sid]

    def _reset(self, sid: int, code: int) -> None:
        self._forget(sid)
        self.out += frame(RST_STREAM, 0, sid, _U32.pack(code))

    def _forget(self, sid: int) -> None:
        self._open.pop(sid, None)
        self._receiving.pop(sid, None)
        self._pending.pop(sid, None)

    def goaway(self, code: int = NO_ERROR, reason: str = "") -> None:
        """Stop taking new streams; open ones are still answered (graceful when NO_ERROR)."""
        if self._goaway:
            return
        self._goaway = True
        self.out += frame(GOAWAY, 0, 0, _GOAWAY.pack(self._last, code) + reason.encode()[:256])

    def fail(self, code: int, reason: str) -> None:
        """A connection error: GOAWAY, then the shell closes once it is written."""
        self.errors.append((code, reason))
        self._goaway = False  # a graceful GOAWAY may precede the error one
        self.goaway(code, reason)
        self.closed = True
        self._open.clear()
        self._receiving.clear()
        self._pending.clear()


def _unpad(payload: bytes, flags: int) -> bytes:
    if not flags & PADDED:
        return payload
    if not payload:
        raise _ConnectionError(FRAME_SIZE_ERROR, "PADDED frame without a pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise _ConnectionError(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1:len(payload) - pad]


def _request(sid: int, fields: list[tuple[str, str]]) -> Request:
    """RFC 9113 8.3.1: the pseudo-header fields first, each once; lower-case token names; no
    connection-specific fields. A malformed request is a stream error."""
    got: list[str | None] = [None, None, None, None]  # by _PSEUDO: :path :method :scheme ...
    it = iter(fields)
    for name, value in it:
        k = _PSEUDO.get(name)
        if k is None:
            break  # the first regular field (or a bad pseudo-header: not a token, see below)
        if got[k] is not None:
            raise _StreamError(sid, PROTOCOL_ERROR, f"bad pseudo-header {name[:32]!r}")
        got[k] = value
    else:
        k = 0  # no regular field
    headers: dict[str, str] = {}
    if k is None:
        # ":" is no token character: a pseudo-header here (unknown, or after a regular
        # field) fails the name check
        while True:
            if name not in _VALID_NAMES:
                if _TOKEN.fullmatch(name) is None or name in _CONNECTION_SPECIFIC or (
                        name == "te" and value != "trailers"):
                    raise _StreamError(sid, PROTOCOL_ERROR, f"bad header field {name[:32]!r}")
                if len(_VALID_NAMES) < 1024 and name != "te":
                    _VALID_NAMES.add(name)
            old = headers.get(name)
            headers[name] = value if old is None else f"{old}, {value}"
            nxt = next(it, None)
            if nxt is None:
                break
            name, value = nxt
    path, method, scheme, _ = got
    if not method or not scheme or not path:
        raise _StreamError(sid, PROTOCOL_ERROR, "missing :method, :scheme or :path")
    p, _, q = path.partition("?")
    return sid, method, p, q, headers


_PSEUDO = {":path": 0, ":method": 1, ":scheme": 2, ":authority": 3}
# RFC 9110 5.6.2 token, lower case only (RFC 9113 8.2.1)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
_VALID_NAMES: set[str] = set()  # names that passed the checks (bounded; not "te")


# --- answer header blocks (RFC 7541, no dynamic table, no Huffman) ---------------------------

# RFC 7541 Appendix A: the static table's :status entries, and the names we send
_STATUS_INDEX = {200: 8, 204: 9, 206: 10, 304: 11, 400: 12, 404: 13, 500: 14}
_NAME_INDEX = {"content-length": 28, "content-type": 31, "date": 33, "retry-after": 53,
               "allow": 22, "www-authenticate": 61}


def _string(s: bytes) -> bytes:
    return encode_integer(len(s), 7, 0) + s


def literal(name: str, value: str) -> bytes:
    """A field as a literal without indexing (RFC 7541 6.2.2): never touches the peer's
    decoder table, so answers can be shared between connections."""
    v = _string(value.encode("latin-1"))
    index = _NAME_INDEX.get(name)
    if index is not None:
        return encode_integer(index, 4, 0) + v
    return b"\x00" + _string(name.encode("latin-1")) + v


def encode_status(status: int) -> bytes:
    """:status, first in every answer's header block."""
    index = _STATUS_INDEX.get(status)
    if index:
        return bytes((0x80 | index,))
    return encode_integer(8, 4, 0) + _string(str(status).encode())  # the name of static entry 8


def encode_fields(headers: list[tuple[str, str]], content_length: int) -> bytes:
    """An answer's header fields after :status (the shell puts the Date field between)."""
    return b"".join([*[literal(n, v) for n, v in headers],
                     literal("content-length", str(content_length))])


def encode_head(status: int, headers: list[tuple[str, str]], content_length: int) -> bytes:
    """The header block of an answer, without a Date field."""
    return encode_status(status) + encode_fields(headers, content_length)

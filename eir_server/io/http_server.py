"""asyncio shell of N5g-eir, on the worker's own event loop.

HTTP/2 is the sans-I/O `n5g_eir.h2conn.H2Connection` (prior knowledge on the cleartext port,
ALPN h2 over TLS, optional client certificates); HTTP/1.1 is tolerated through h11. This module
moves bytes, hands (method, path, query, headers) to the sans-I/O `N5gEirApp`, asks the shared
checker and writes the answer, counting it in the worker's `Metrics`. Chosen with numbers
(README "Performance"): granian's embedded server, the previous shell, cost a thread hand-off
and a task per request, and topped out below our own loop.

Connections are never cut by count or idle time: an SBI consumer keeps its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import functools
import http
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import h11

from ..config import ServeConfig, parse_hostport
from ..n5g_eir.app import (
    EQUIPMENT_STATUS_PATH,
    INTERNAL_ERROR,
    Check,
    N5gEirApp,
    Response,
    overloaded,
    problem,
)
from ..n5g_eir.h2conn import PREFACE, H2Connection, encode_fields, encode_status, literal
from ..n5g_eir.nrf import NF_TYPE, load_nf_instance_id
from ..n5g_eir.oauth import BearerAuthorizer
from ..obs.logging import get_logger
from ..obs.metrics import Metrics
from ..obs.ratelimit import LogLimiter
from ..overload import OverloadSignal, Source
from ..policy.types import CheckRequest, Verdict
from ..service import STORE_ERROR, CheckService
from .nrf_client import NrfAgent
from .tls import TlsListener, server_context

log = get_logger("eir_server.n5g_eir")

INTERFACE = "n5g_eir"  # the label value the metrics, audit trail and export already use
RETRY_AFTER = 1  # seconds: requests waiting for the store drain within that in practice
MAX_SOURCES = 256  # consumer addresses tracked for fair shedding before idle ones are dropped
_SHED_OVERLOAD = (INTERFACE, "overload")  # eir_requests_shed_total{interface, reason}
# RFC 9113 10.5.1 / RFC 6585: a header list over SETTINGS_MAX_HEADER_LIST_SIZE, on its stream
_TOO_LARGE = problem(431, "Request Header Fields Too Large",
                     detail="the header list is larger than SETTINGS_MAX_HEADER_LIST_SIZE")
# eir_requests_total{command}: the method, from a bounded set (any token is a method, and
# the label must not grow with what consumers send)
_COMMANDS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


class ConsumerShare:
    """The 429 half of the overload gate (the worker-wide 503 half is `CheckService.admit`):
    one consumer connection may hold at most half of the worker's store-waiting budget, so one
    AMF flooding misses cannot take every slot from the others."""

    __slots__ = ("service", "by_client")

    def __init__(self, service: CheckService) -> None:
        self.service = service
        self.by_client: dict[str, int] = {}

    def admit(self, client: str) -> int:
        """0 (go on), 503 (the worker's budget is used up) or 429 (this consumer's share is)."""
        service = self.service
        if not service.admit(client):
            return 503
        if self.by_client.get(client, 0) >= max(1, service.max_in_flight // 2):
            return 429
        return 0

    def enter(self, client: str) -> None:
        self.service.started()
        self.by_client[client] = self.by_client.get(client, 0) + 1

    def leave(self, client: str) -> None:
        self.service.finished()
        n = self.by_client[client] - 1
        if n:
            self.by_client[client] = n
        else:
            del self.by_client[client]


class N5gEirService:
    """What one worker's N5g-eir connections call: one per worker, on the same `CheckService`
    (checker, in-flight budget, verdict counters, audit) as the worker's S13 connections."""

    def __init__(self, app: N5gEirApp, service: CheckService, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 overload: OverloadSignal | None = None) -> None:
        self.app = app
        # The worker's overload signal (S13 sheds from the same one); None: never shed.
        self.overload = overload
        self._sources: dict[str, Source] = {}  # overload sources by consumer IP address
        self._by_client: dict[str, Source] = {}  # the same by connection ("ip:port")
        self._busy: dict[int, Response] = {}  # 503 answers by Retry-After
        self.service = service
        self._checker = service.checker.check  # as S13 binds it: one call less per request
        self.share = ConsumerShare(service)
        self.metrics = metrics
        self.clock = clock
        self.wall = wall
        self._requests = metrics.requests
        self._latency = metrics.latency_n5g
        self.answered_now = 0  # answers given since the shell last timed them
        self._last_error_log = float("-inf")

    def request(self, method: str, path: str, query: str,
                header: Callable[[str], str | None], client: str,
                later: Callable[[int, Response], None], token: int,
                t0: float) -> Response | None:
        """The answer now, or None when it waits for the store: then `later(token, answer)`
        is called once the verdict is in (no task per request: a callback on the lookup).
        `t0` is when the request was read; answers given now are timed together by the
        shell's `observe_latency` once their read is done."""
        r: Response | CheckRequest | Check | None
        try:
            if self.overload is not None and not self._admit(client):
                r = self._overloaded()
                self.metrics.shed[_SHED_OVERLOAD] += 1
            else:
                r = self.app.handle(method, path, query, header,
                                    self.wall() if self.app.authorizer is not None else 0.0)
                if type(r) is CheckRequest:
                    r = self._check(r, r, client, method, t0, later, token)
                elif type(r) is Check:
                    r = self._check(r.request, r.audit, client, method, t0, later, token)
                if r is None:  # waits for the store
                    return None
        except Exception:
            r = self._internal_error(path)
        assert type(r) is Response
        command = method if r.status != 405 and method in _COMMANDS else "other"
        self._requests[(INTERFACE, command, r.result)] += 1
        self.answered_now += 1
        return r

    def observe_latency(self, seconds: float) -> None:
        """The shell queued the answers `request` gave now, `seconds` after reading them."""
        if self.answered_now:
            self._latency.observe_many(seconds, self.answered_now)
            self.answered_now = 0

    def _internal_error(self, path: str) -> Response:
        """The consumer learns only that it failed; the log says why, at most once a second."""
        now = self.clock()
        if now - self._last_error_log >= 1.0:
            self._last_error_log = now
            log.exception("n5g_eir_internal_error", path=path[:256])
        return INTERNAL_ERROR

    def _admit(self, client: str) -> bool:
        """The overload signal's per-consumer fair share (by IP address: an AMF may open
        several connections)."""
        src = self._by_client.get(client)
        if src is None:
            src = self._source(client)
        return self.overload.admit(src)  # type: ignore[union-attr]

    def _source(self, client: str) -> Source:
        """The overload source of a connection ("ip:port"): its IP address's."""
        if len(self._by_client) >= 4 * MAX_SOURCES:
            self._by_client.clear()
        ip = client.rpartition(":")[0]
        src = self._sources.get(ip)
        if src is None:
            if len(self._sources) >= MAX_SOURCES:
                self._prune()
            src = self._sources[ip] = self.overload.source(("http", ip))  # type: ignore[union-attr]
        self._by_client[client] = src
        return src

    def _prune(self) -> None:
        """Forget consumers that sent nothing lately (their shares go to the others)."""
        for ip, src in list(self._sources.items()):
            if src.demand < 1 and src.arrivals == 0:
                del self._sources[ip]
                self.overload.forget(("http", ip))  # type: ignore[union-attr]
        self._by_client.clear()

    def _overloaded(self) -> Response:
        """503 NF_CONGESTION with the signal's Retry-After (TS 29.500 6.4)."""
        retry = max(1, self.overload.retry_after)  # type: ignore[union-attr]
        r = self._busy.get(retry)
        if r is None:
            r = self._busy[retry] = overloaded(503, retry, "this NF is overloaded")
        return r

    def _check(self, req: CheckRequest, audit: CheckRequest, client: str, method: str,
               t0: float, later: Callable[[int, Response], None],
               token: int) -> Response | None:
        verdict = self._checker(req)
        if type(verdict) is Verdict:
            return self._answer(audit, verdict, client)
        # Only a lookup that must wait for the store takes a slot of the budget: answers
        # from the embedded store or the local cache are never refused.
        pending: asyncio.Future[Verdict] = verdict  # type: ignore[assignment]
        refused = self.share.admit(client)
        if refused:
            pending.cancel()
            return overloaded(refused, RETRY_AFTER)
        self.share.enter(client)
        pending.add_done_callback(
            functools.partial(self._checked, audit, client, method, t0, later, token))
        return None

    def _checked(self, audit: CheckRequest, client: str, method: str, t0: float,
                 later: Callable[[int, Response], None], token: int,
                 pending: asyncio.Future[Verdict]) -> None:
        self.share.leave(client)
        try:
            r = self._answer(audit, pending.result(), client)
        except Exception:  # CancelledError included: the worker is stopping
            r = self._internal_error(EQUIPMENT_STATUS_PATH)
        self._requests[(INTERFACE, method, r.result)] += 1
        self._latency.observe(self.clock() - t0)
        later(token, r)

    def _answer(self, audit: CheckRequest, v: Verdict, client: str) -> Response:
        if v.status is None and v.rule == STORE_ERROR:  # counted as S13 counts it
            self.service.counters.verdicts[(v.reasons[0], v.rule)] += 1
        else:
            self.service.record(audit, v, client, INTERFACE)
        return self.app.answer(v)


# --- wire -------------------------------------------------------------------------------------

WRITE_HIGH_WATER = 256 * 1024  # answers a consumer leaves unread before we stop reading it
_HEADS: dict[int, tuple[Response, bytes, bytes, bytes, bytes]] = {}
_MAX_HEADS = 512
_date_now: tuple[int, str, bytes] = (0, "", b"")  # unix second, Date value, its HPACK field


def _date() -> tuple[int, str, bytes]:
    """RFC 9110 6.6.1: an origin server with a clock sends Date; formatted once a second."""
    global _date_now
    now = int(time.time())
    if now != _date_now[0]:
        text = email.utils.formatdate(now, usegmt=True)
        _date_now = (now, text, literal("date", text))
    return _date_now


def _date_field() -> bytes:
    return _date()[2]


def _head(r: Response, date: bytes) -> bytes:
    """The answer's HPACK header block, with `date` (`_date_field()`). Answers are mostly
    shared objects (pre-rendered verdicts and problems), so their block is kept by identity
    for the current second; the entry holds the answer, so its id cannot be reused while
    cached."""
    hit = _HEADS.get(id(r))
    if hit is not None and hit[0] is r:
        if hit[1] is date:
            return hit[4]
        status, rest = hit[2], hit[3]
    else:
        if len(_HEADS) >= _MAX_HEADS:
            _HEADS.clear()
        status, rest = encode_status(r.status), encode_fields(r.headers, len(r.body))
    head = status + date + rest
    _HEADS[id(r)] = (r, date, status, rest, head)
    return head


class Limits(NamedTuple):
    """Per worker, for each listener (the Diameter side has its own)."""

    max_connections: int = 1024
    max_per_source: int = 64  # per consumer IP address
    # seconds a new connection has to send its HTTP/2 preface and SETTINGS, or its first
    # HTTP/1.1 request; then it is closed (after that, idle connections stay)
    first_request_timeout: float = 10.0


DEFAULT_LIMITS = Limits()


class Listener:
    """What a listener's connections share."""

    def __init__(self, service: N5gEirService, limits: Limits = DEFAULT_LIMITS) -> None:
        self.service = service
        self.limits = limits
        self.metrics = service.metrics
        self.connections: set[HttpConnection] = set()
        self.by_source: dict[str, int] = {}
        self.closing = False
        self.limiter = LogLimiter()

    def admit(self, conn: HttpConnection, ip: str) -> bool:
        """Connection limits, checked before any work for the consumer is done."""
        n = self.by_source.get(ip, 0)
        lim = self.limits
        if len(self.connections) >= lim.max_connections or n >= lim.max_per_source:
            self.protocol_error("connection_refused", f"{ip}:0",
                                f"connection limit reached ({n} open from this address)")
            return False
        self.connections.add(conn)
        self.by_source[ip] = n + 1
        return True

    def release(self, conn: HttpConnection, ip: str) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            n = self.by_source.get(ip, 1) - 1
            if n > 0:
                self.by_source[ip] = n
            else:
                self.by_source.pop(ip, None)

    def protocol_error(self, kind: str, client: str, reason: str) -> None:
        """Counted always; logged once per consumer address and kind per minute."""
        self.metrics.http_errors[kind] += 1
        ip = client.rpartition(":")[0]
        ok, suppressed = self.limiter.hit((ip, kind), time.monotonic())
        if ok:
            extra = {"suppressed_since_last": suppressed} if suppressed else {}
            log.warning("n5g_eir_protocol_error", peer=client, error=kind, reason=reason[:200],
                        **extra)

    def tls_failed(self, address: str, error: BaseException, reason: str) -> None:
        self.metrics.http_errors["tls_handshake_failed"] += 1
        ok, suppressed = self.limiter.hit((address, type(error).__name__), time.monotonic())
        if ok:
            extra = {"suppressed_since_last": suppressed} if suppressed else {}
            log.warning("n5g_eir_tls_handshake_failed", peer=address, reason=reason[:200],
                        **extra)

    def accept_failed(self, error: OSError) -> None:
        ok, _ = self.limiter.hit(("*", "accept", error.errno), time.monotonic())
        if ok:
            log.warning("n5g_eir_accept_failed", reason=str(error))


_ERROR_NAMES = ("no_error", "protocol_error", "internal_error", "flow_control_error",
                "settings_timeout", "stream_closed", "frame_size_error", "refused_stream",
                "cancel", "compression_error", "connect_error", "enhance_your_calm")


class HttpConnection(asyncio.Protocol):
    """One consumer connection: HTTP/2 (prior knowledge, or ALPN h2 over TLS) on the sans-I/O
    `H2Connection`, else HTTP/1.1 on h11. Answers that wait for the store go out together
    once per loop turn."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.service = listener.service
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self.ip = ""
        self.h2: H2Connection | None = None
        self.h1: _Http1 | None = None
        self._later = self._answer_later
        self._flush_due = False
        self._paused = False
        self._first: asyncio.TimerHandle | None = None  # the first request's deadline
        self._prelude = b""  # the first bytes, while they may begin either protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but are ones
        transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]) if peer else "?"
        self.client = f"{peer[0]}:{peer[1]}" if peer else "?"
        if not self.listener.admit(self, self.ip):
            transport.abort()
            return
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._first = asyncio.get_running_loop().call_later(
            self.listener.limits.first_request_timeout, self._no_first_request)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            if ssl_object.selected_alpn_protocol() == "h2":
                self._start_h2()
            else:
                self.h1 = _Http1(self)
        if self.listener.closing:
            self.shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.release(self, self.ip)
        self.transport = None
        if self._first is not None:
            self._first.cancel()
            self._first = None

    def _no_first_request(self) -> None:
        self._first = None
        h2, h1 = self.h2, self.h1
        if (h2 is not None and h2.established) or (h1 is not None and h1.served):
            return
        self.listener.protocol_error("first_request_timeout", self.client,
                                     "no HTTP/2 preface and SETTINGS, or HTTP/1.1 request, "
                                     f"within {self.listener.limits.first_request_timeout:g} s")
        if self.transport is not None:
            self.transport.abort()

    def _start_h2(self) -> None:
        self.h2 = H2Connection()
        self._flush()

    def data_received(self, data: bytes) -> None:
        h2 = self.h2
        if h2 is None:
            if self.h1 is not None:
                self.h1.receive(data)
                return
            if self._prelude:
                data = self._prelude + data
                self._prelude = b""
            if len(data) < 4 and PREFACE.startswith(data):
                self._prelude = data  # "P" or "PR" may begin POST or PROPFIND too: wait for "PRI"
                return
            if PREFACE.startswith(data[:24]):  # h2c with prior knowledge
                self._start_h2()
                h2 = self.h2
                assert h2 is not None
            else:
                self.h1 = _Http1(self)
                self.h1.receive(data)
                return
        requests = h2.receive(data)
        if requests:
            service = self.service
            request = service.request
            respond = h2.respond
            client = self.client
            later = self._later
            t0 = service.clock()
            date = _date_field()
            for sid, method, path, query, headers in requests:
                a = request(method, path, query, headers.get, client, later, sid, t0)
                if a is not None:
                    # RFC 9110 9.3.2: no content in an answer to HEAD (its fields stay)
                    respond(sid, _head(a, date), a.body if method != "HEAD" else b"")
            service.observe_latency(service.clock() - t0)
        if h2.errors:
            self._h2_errors(h2)
        self._flush()

    def _h2_errors(self, h2: H2Connection) -> None:
        for code, reason in h2.errors:
            if code is None:
                kind = "stream_error"
            else:
                kind = _ERROR_NAMES[code] if code < len(_ERROR_NAMES) else str(code)
            self.listener.protocol_error(f"h2_{kind}", self.client, reason)
        h2.errors.clear()
        if h2.too_large:
            date = _date_field()
            for sid in h2.too_large:
                h2.respond(sid, _head(_TOO_LARGE, date), _TOO_LARGE.body)
            h2.too_large.clear()

    def _answer_later(self, sid: int, r: Response) -> None:
        h2 = self.h2
        if h2 is None:
            if self.h1 is not None:
                self.h1.respond(r)
            return
        if h2.respond(sid, _head(r, _date_field()), r.body) and not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        h2 = self.h2
        t = self.transport
        if h2 is None or t is None:
            return
        if h2.out:
            out, h2.out = h2.out, bytearray()
            t.write(out)
        if h2.closed or (self.listener.closing and not h2.busy):
            t.close()

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def shutdown(self) -> None:
        """Graceful stop: HTTP/2 says GOAWAY and closes once its open streams are answered;
        an idle HTTP/1.1 connection closes now, a busy one after its answer."""
        if self.h2 is not None:
            self.h2.goaway()
            self._flush()
        elif self.h1 is None or not self.h1.busy:
            self.close()

    def pause_writing(self) -> None:
        # The consumer does not read its answers: stop reading its requests until it does.
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self._paused:
            self._paused = False
            self.transport.resume_reading()


class _Http1:
    """HTTP/1.1, tolerated (TS 29.500 mandates HTTP/2): h11, one request at a time."""

    def __init__(self, conn: HttpConnection) -> None:
        self.conn = conn
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
        self.request: h11.Request | None = None
        self.busy = False
        self.served = False  # a whole request came

    def receive(self, data: bytes) -> None:
        self.h11.receive_data(data)
        self._next()

    def _next(self) -> None:
        while not self.busy:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as e:
                self.conn.listener.protocol_error("http1_bad_request", self.conn.client, str(e))
                self._send_error(e.error_status_hint)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.request = event
                if self.h11.they_are_waiting_for_100_continue:
                    # RFC 9110 10.1.1: answer the expectation at once (the body is ignored
                    # anyway; the final answer follows once it has come)
                    self.conn.write(self.h11.send(
                        h11.InformationalResponse(status_code=100, headers=[])) or b"")
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch()
            elif isinstance(event, h11.ConnectionClosed):
                self.conn.close()
                return

    def _dispatch(self) -> None:
        req = self.request
        assert req is not None
        self.busy = True
        self.served = True
        target = req.target.decode("latin-1")
        if target[:1] != "/" and "://" in target:  # RFC 9112 3.2.2: absolute-form, accepted
            parts = urllib.parse.urlsplit(target)
            target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        path, _, query = target.partition("?")
        fields: dict[str, str] = {}
        for name, value in req.headers:
            k = name.decode("latin-1")
            v = value.decode("latin-1")
            fields[k] = f"{fields[k]}, {v}" if k in fields else v
        service = self.conn.service
        t0 = service.clock()
        a = service.request(req.method.decode("latin-1"), path, query, fields.get,
                            self.conn.client, self.conn._later, 0, t0)
        if a is not None:
            self.respond(a)
            service.observe_latency(service.clock() - t0)

    def _wire(self, r: Response, *extra: tuple[str, str]) -> bytes:
        """The answer's bytes (h11 raises LocalProtocolError when none may be sent)."""
        headers = [*r.headers, ("content-length", str(len(r.body))), ("date", _date()[1]),
                   *extra]
        head = h11.Response(status_code=r.status, headers=headers, reason=_reason(r.status))
        if self.request is not None and self.request.method == b"HEAD":
            # RFC 9110 9.3.2: no content (h11 refuses to send any after HEAD)
            return b"".join(self.h11.send(e) or b"" for e in (head, h11.EndOfMessage()))
        return b"".join(self.h11.send(e) or b"" for e in (
            head, h11.Data(data=r.body), h11.EndOfMessage()))

    def respond(self, r: Response) -> None:
        try:
            out = self._wire(r)
        except h11.LocalProtocolError:  # the consumer went away meanwhile
            self.conn.close()
            return
        self.conn.write(out)
        if self.h11.our_state is h11.MUST_CLOSE or self.conn.listener.closing:
            self.conn.close()
            return
        try:
            self.h11.start_next_cycle()
        except h11.LocalProtocolError:
            self.conn.close()
            return
        self.request = None
        self.busy = False
        self._next()

    def _send_error(self, status: int) -> None:
        r = problem(status, "Bad Request" if status == 400 else "Error",
                    detail="the HTTP/1.1 request could not be parsed")
        if self.h11.our_state is h11.SEND_RESPONSE or self.h11.our_state is h11.IDLE:
            with contextlib.suppress(h11.LocalProtocolError):
                self.conn.write(self._wire(r, ("connection", "close")))
        self.conn.close()


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class HttpListener:
    """One N5g-eir listener (h2c + HTTP/1.1 on one port, or TLS) on the worker's loop."""

    def __init__(self, service: N5gEirService, host: str, port: int, *,
                 cert: str = "", key: str = "", ca: str = "", backlog: int = 1024,
                 reuse_port: bool = False, handshake_timeout: float = 10.0,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        self.address = f"{host}:{port}"
        self.host, self.port = host, port
        self.backlog = backlog
        self.reuse_port = reuse_port
        self.handshake_timeout = handshake_timeout
        self.context = server_context(cert, key, ca, ["h2", "http/1.1"]) if cert else None
        self.shared = Listener(service, limits)
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        shared = self.shared
        try:
            if self.context is not None:  # our accept loop: failed handshakes are logged
                self.server = TlsListener(  # type: ignore[assignment]
                    self.context, self.host, self.port, self.reuse_port, None,
                    lambda: HttpConnection(shared), self.handshake_timeout, shared.tls_failed,
                    shared.accept_failed, self.backlog)
            else:
                self.server = await loop.create_server(
                    lambda: HttpConnection(shared), self.host or None, self.port,
                    backlog=self.backlog, reuse_port=self.reuse_port or None)
        except OSError as e:
            raise OSError(f"N5g-eir listen {self.address}: {e.strerror or e}") from None

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting; let open streams be answered (GOAWAY) for up to `timeout`."""
        if self.server is None:
            return
        self.server.close()
        self.server = None
        shared = self.shared
        shared.closing = True
        for c in list(shared.connections):
            c.shutdown()
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while shared.connections and loop.time() < end:
            await asyncio.sleep(0.02)
        for c in list(shared.connections):
            if c.transport is not None:
                c.transport.abort()


def resolve_nf_instance_id(cfg: ServeConfig) -> ServeConfig:
    """Fix the NF instance id (NRF registration, token audience) once per node."""
    if cfg.nf_instance_id or not (cfg.nrf_url or cfg.oauth2_public_key or cfg.oauth2_jwks):
        return cfg
    nf_id, stored = load_nf_instance_id(cfg.nf_instance_file)
    if not stored:
        log.error("nf_instance_id_not_kept", file=cfg.nf_instance_file, nf_instance_id=nf_id,
                  consequence="a restart registers as a new NF instance; set --nf-instance-id "
                              "or a writable --nf-instance-file")
    return dataclasses.replace(cfg, nf_instance_id=nf_id)


class N5gEir:
    """What a worker runs for N5g-eir: listeners and, in worker 0, the NRF agent."""

    def __init__(self, listeners: list[HttpListener], nrf: NrfAgent | None = None) -> None:
        self.listeners = listeners
        self.nrf = nrf

    async def stop(self, timeout: float) -> None:
        if self.nrf is not None:  # deregister first: the NRF stops handing us out
            await self.nrf.stop()
        for listener in self.listeners:
            await listener.stop(timeout)


async def start_n5g_eir(cfg: ServeConfig, metrics: Metrics, node: Any, index: int) -> N5gEir:
    """The worker's N5g-eir listeners (none unless --http-listen / --http-tls-listen), sharing
    the Diameter node's CheckService (checker, audit, overload budget) and metrics; in worker 0
    only (the
    workers are one NF instance behind one port) the NRF registration."""
    if not (cfg.http_listen or cfg.http_tls_listen):
        return N5gEir([])
    cfg = resolve_nf_instance_id(cfg)
    authorizer = None
    if cfg.oauth2_public_key or cfg.oauth2_jwks:
        authorizer = BearerAuthorizer.from_files(cfg.oauth2_public_key, cfg.oauth2_jwks,
                                                 (cfg.nf_instance_id, NF_TYPE))
    service = N5gEirService(N5gEirApp(authorizer), node.service, metrics,
                            overload=node.overload if node.limits.overload_target > 0 else None)
    listeners = []
    for addr, tls in ((cfg.http_listen, False), (cfg.http_tls_listen, True)):
        if not addr:
            continue
        host, port = parse_hostport(addr, "http_tls_listen" if tls else "http_listen")
        listener = HttpListener(
            service, host, port, reuse_port=cfg.workers > 1,
            handshake_timeout=node.limits.tls_handshake_timeout,
            limits=Limits(cfg.max_connections, cfg.max_connections_per_source,
                          cfg.tls_handshake_timeout),
            cert=cfg.http_tls_cert_file if tls else "", key=cfg.http_tls_key_file if tls else "",
            ca=cfg.http_tls_ca_file if tls else "")
        await listener.start()
        listeners.append(listener)
        log.info("n5g_eir_listening", worker=index, address=addr,
                 transport="tls" if tls else "h2c+http/1.1",
                 client_certificates="required" if tls and cfg.http_tls_ca_file else "no",
                 oauth2=authorizer is not None)
    nrf = None
    if cfg.nrf_url and index == 0:
        nrf = NrfAgent(cfg, cfg.nf_instance_id)
        nrf.start()
    return N5gEir(listeners, nrf)

"""asyncio shell around the sans-I/O Diameter connection: sockets, timers, logs and counters.

One `DiameterProtocol` per TCP connection, no task per message: bytes in -> `Connection` ->
events -> S13 handler -> answers batched into one `transport.write` per read. A verdict that
needs Redis comes back as a Future; a done-callback writes its answer.
"""

from __future__ import annotations

import asyncio
import socket
import ssl as ssl_module
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from ..checker import STORE_ERROR, EquipmentChecker
from ..diameter import errors
from ..diameter.codec import FLAG_T, Message
from ..diameter.connection import (
    DISCONNECT_CAUSES,
    REBOOTING,
    AppRequest,
    CerRejected,
    Closed,
    Connection,
    DisconnectRequested,
    ErrorAnswered,
    PeerConfig,
    PeerOpened,
    PeerState,
    WatchdogChanged,
)
from ..diameter.dedup import DuplicateCache
from ..diameter.dictionary import Dictionary
from ..obs.logging import get_logger
from ..obs.metrics import Metrics
from ..policy.types import CheckRequest, Verdict
from ..s13.app import COMMAND_CODE, EcaBuilder

log = get_logger("eir_server.diameter")

COMMAND_NAMES = {257: "CER", 280: "DWR", 282: "DPR", 324: "ECR"}
WRITE_HIGH_WATER = 512 * 1024  # then stop reading from that peer until it drains
# --store-fallback error answers (and our own overload) -> Result-Code
STORE_ERROR_CODES = {"too_busy": errors.TOO_BUSY, "unable_to_comply": errors.UNABLE_TO_COMPLY}


@dataclass
class NodeStats:
    connections_accepted: int = 0
    framing_errors: int = 0


class DiameterNode:
    """Everything the connections of one worker share."""

    def __init__(self, peer_config: PeerConfig, dictionary: Dictionary, checker: EquipmentChecker,
                 metrics: Metrics | None = None, dedup: DuplicateCache[int] | None = None,
                 audit: Callable[[float, CheckRequest, Verdict, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 max_in_flight: int = 10_000) -> None:
        self.peer_config = peer_config
        self.dictionary = dictionary
        self.checker = checker
        self.metrics = metrics or Metrics()
        self.dedup = dedup if dedup is not None else DuplicateCache()
        self.eca = EcaBuilder(peer_config.identity, dictionary)
        self.audit = audit
        self.protocols: set[DiameterProtocol] = set()
        self.in_flight = 0
        self.stats = NodeStats()
        self.clock = clock
        self.server: asyncio.Server | None = None  # the first listener
        self.servers: list[asyncio.Server] = []
        self.max_in_flight = max_in_flight
        m = self.metrics
        m.set_gauge_callback("peers", self.peers_by_state)
        m.set_gauge_callback("in_flight", lambda: self.in_flight)

    def peers_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {s.name.lower(): 0 for s in PeerState}
        for p in self.protocols:
            counts[p.conn.state.name.lower()] += 1
        return counts

    def peers_open(self) -> int:
        return sum(1 for p in self.protocols if p.conn.state is PeerState.R_OPEN)

    async def start(self, host: str, port: int, reuse_port: bool = False,
                    sock: socket.socket | None = None,
                    ssl: ssl_module.SSLContext | None = None) -> asyncio.Server:
        """Listen (TCP, or TLS with `ssl`); may be called once per listener."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            server = await loop.create_server(lambda: DiameterProtocol(self), sock=sock, ssl=ssl)
        else:
            server = await loop.create_server(
                lambda: DiameterProtocol(self), host or None, port, reuse_port=reuse_port,
                backlog=1024, ssl=ssl)
        self.servers.append(server)
        if self.server is None:
            self.server = server
        return server

    async def shutdown(self, deadline: float = 10.0) -> None:
        """SIGTERM: stop accepting, send DPR(REBOOTING) to every peer, let in-flight answers
        drain, close. Whatever is still open at the deadline is closed hard."""
        for server in self.servers:
            server.close()
        now = self.clock()
        for p in list(self.protocols):
            p.disconnect(now, REBOOTING)
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while self.protocols and loop.time() < end:
            await asyncio.sleep(0.02)
        for p in list(self.protocols):
            p.abort("shutdown deadline reached")
        for server in self.servers:
            await server.wait_closed()


class DiameterProtocol(asyncio.Protocol):
    __slots__ = ("node", "conn", "transport", "peer", "log", "_timer", "_timer_at", "_paused",
                 "_in_flight", "_closing", "_eca", "_checker", "_metrics", "_requests",
                 "_latency")

    def __init__(self, node: DiameterNode) -> None:
        self.node = node
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._paused = False
        self._in_flight = 0
        self._closing = False
        self._eca = node.eca
        self._checker = node.checker
        self._metrics = node.metrics
        self._requests = node.metrics.requests
        self._latency = node.metrics.latency_s13
        self.peer = "?"

    # -- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peername = transport.get_extra_info("peername")
        address = peername[0] if peername else None
        self.peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        node = self.node
        node.protocols.add(self)
        node.stats.connections_accepted += 1
        self.log = log.bind(peer=self.peer)
        self.conn = Connection(node.peer_config, node.dictionary, node.clock(), address)
        self._arm()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        now = self.node.clock()
        conn.receive_data(data, now)
        for ev in conn.events():
            if type(ev) is AppRequest:
                self._request(ev.message, now)
            else:
                self._event(ev)
        out = conn.data_to_send(self._in_flight == 0)
        if out and self.transport is not None:
            self.transport.write(out)
        if self._closing:
            self._maybe_close()
        else:
            deadline = conn.next_deadline()
            if deadline is not None and (self._timer is None or deadline < self._timer_at):
                self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.connection_lost()
        self.node.protocols.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.conn.origin_host:
            self.log.info("peer_disconnected", reason=str(exc) if exc else "closed")

    def pause_writing(self) -> None:
        # Backpressure: a peer that does not read its answers stops being read from.
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self._paused:
            self._paused = False
            self.transport.resume_reading()

    # -- requests -----------------------------------------------------------------------------

    def _request(self, msg: Message, now: float) -> None:
        if msg.code != COMMAND_CODE:  # the dictionary knows no other S13 request
            self.conn.send(self._eca.failure(msg, errors.COMMAND_UNSUPPORTED, "not supported"))
            return
        parsed = self._eca.parse(msg)
        if type(parsed) is bytes:
            self.conn.send(parsed)
            self._count_error(msg, errors.MISSING_AVP, "Terminal-Information without IMEI")
            return
        req, prefix, suffix, origin = parsed  # type: ignore[misc]
        node = self.node
        if msg.flags & FLAG_T:
            cached = node.dedup.get((origin, msg.end_to_end), now)
            if cached is not None:
                self.conn.send(self._eca.answer(msg, prefix, suffix,
                                                None if cached < 0 else cached))
                self._requests[("s13", "ECR", "duplicate")] += 1
                return
        if node.in_flight >= node.max_in_flight:
            # Overload is answered, not left to time out at the MME (DESIGN habit 11): 3004
            # tells it to try another EIR now.
            self.conn.send(self._eca.failure(msg, errors.TOO_BUSY, "too many requests waiting "
                                                                   "for the store"))
            self._requests[("s13", "ECR", str(errors.TOO_BUSY))] += 1
            self._metrics.protocol_errors[errors.TOO_BUSY] += 1
            return
        verdict = self._checker.check(req)
        if type(verdict) is Verdict:
            self._answered(msg, req, prefix, suffix, origin, verdict, now)
            return
        self._in_flight += 1
        node.in_flight += 1
        verdict.add_done_callback(  # type: ignore[union-attr]
            partial(self._deferred, msg, req, prefix, suffix, origin, now))

    def _answered(self, msg: Message, req: CheckRequest, prefix: bytes, suffix: bytes,
                  origin: bytes, verdict: Verdict, t0: float) -> None:
        status = verdict.status
        if status is None and verdict.rule == STORE_ERROR:
            self._store_error(msg, verdict)
            return
        self.conn.send(self._eca.answer(msg, prefix, suffix, status))
        node = self.node
        # The cache keeps a plain int, not the Verdict: (float, int) tuples are untracked by the
        # cyclic GC, so a cache of millions of entries does not lengthen collections.
        node.dedup.put((origin, msg.end_to_end), -1 if status is None else int(status), t0)
        m = self._metrics
        self._requests[("s13", "ECR", "2001" if status is not None else "5422")] += 1
        m.verdicts[(status, verdict.rule)] += 1
        self._latency.observe(node.clock() - t0)
        if node.audit is not None:
            node.audit(time.time(), req, verdict, self.conn.origin_host or self.peer)

    def _store_error(self, msg: Message, verdict: Verdict) -> None:
        """The store could not answer and the configured fallback is an error answer (or our
        loop was overloaded): 3004 makes the MME try another EIR; never cached as a duplicate."""
        code = STORE_ERROR_CODES[verdict.reasons[0]]
        self.conn.send(self._eca.failure(msg, code, "register store unavailable"))
        self._requests[("s13", "ECR", str(code))] += 1
        self._metrics.protocol_errors[code] += 1
        self._metrics.verdicts[(verdict.reasons[0], verdict.rule)] += 1

    def _deferred(self, msg: Message, req: CheckRequest, prefix: bytes, suffix: bytes,
                  origin: bytes, t0: float, fut: asyncio.Future[Verdict]) -> None:
        self._in_flight -= 1
        self.node.in_flight -= 1
        if fut.cancelled() or self.conn.state is PeerState.DONE and not self._closing:
            return
        self._answered(msg, req, prefix, suffix, origin, fut.result(), t0)
        out = self.conn.data_to_send(self._in_flight == 0)
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)
        if self._closing:
            self._maybe_close()

    # -- connection events --------------------------------------------------------------------

    def _event(self, ev: object) -> None:
        m = self._metrics
        t = type(ev)
        if t is ErrorAnswered:
            self._count_error_event(ev)  # type: ignore[arg-type]
        elif t is PeerOpened:
            m.cer["success"] += 1
            self.log = self.log.bind(origin_host=ev.origin_host)  # type: ignore[attr-defined]
            self.log.info("peer_opened", origin_realm=ev.origin_realm,  # type: ignore[attr-defined]
                          applications=list(ev.applications))  # type: ignore[attr-defined]
        elif t is CerRejected:
            name = errors.NAMES.get(ev.result_code, str(ev.result_code))  # type: ignore[attr-defined]
            m.cer[name.removeprefix("DIAMETER_").lower()] += 1
            m.protocol_errors[ev.result_code] += 1  # type: ignore[attr-defined]
            self.log.warning("cer_rejected", result_code=ev.result_code,  # type: ignore[attr-defined]
                             reason=ev.reason, origin_host=ev.origin_host)  # type: ignore[attr-defined]
        elif t is WatchdogChanged:
            if ev.new in ("SUSPECT", "DOWN"):  # type: ignore[attr-defined]
                m.watchdog_failures += 1
            self.log.warning("watchdog_state", old=ev.old, new=ev.new)  # type: ignore[attr-defined]
        elif t is DisconnectRequested:
            m.dpr[("received", ev.cause)] += 1  # type: ignore[attr-defined]
            self.log.info("peer_sent_dpr", cause=ev.cause)  # type: ignore[attr-defined]
        elif t is Closed:
            if ev.reason.startswith("framing error"):  # type: ignore[attr-defined]
                self.node.stats.framing_errors += 1
                m.framing_errors += 1
                self.log.warning("connection_closed", reason=ev.reason)  # type: ignore[attr-defined]
            else:
                self.log.info("connection_closed", reason=ev.reason)  # type: ignore[attr-defined]
            self._closing = True

    def _count_error_event(self, ev: ErrorAnswered) -> None:
        command = COMMAND_NAMES.get(ev.command, str(ev.command))
        self._requests[("s13", command, str(ev.result_code))] += 1
        self._metrics.protocol_errors[ev.result_code] += 1
        self.log.warning("error_answer", command=command, hop_by_hop=f"0x{ev.hop_by_hop:08x}",
                         result_code=ev.result_code, reason=ev.reason)

    def _count_error(self, msg: Message, code: int, reason: str) -> None:
        self._count_error_event(ErrorAnswered(code, msg.code, msg.hop_by_hop, reason))

    # -- closing and timers -------------------------------------------------------------------

    def disconnect(self, now: float, cause: int) -> None:
        if self.conn.state is PeerState.R_OPEN:
            self._metrics.dpr[("sent", DISCONNECT_CAUSES[cause])] += 1
        self.conn.disconnect(now, cause)
        self._after_core_call()

    def _after_core_call(self) -> None:
        """After a call into the core outside data_received: handle its events, write what
        it queued, then close or re-arm the timer."""
        for ev in self.conn.events():
            self._event(ev)
        out = self.conn.data_to_send(self._in_flight == 0)
        if out and self.transport is not None:
            self.transport.write(out)
        if self._closing:
            self._maybe_close()
        else:
            self._arm()

    def abort(self, reason: str) -> None:
        self.log.warning("connection_aborted", reason=reason)
        if self.transport is not None:
            self.transport.abort()

    def _maybe_close(self) -> None:
        # Answers still waiting for the store are written before the transport closes.
        if self._in_flight == 0 and self.transport is not None:
            self.transport.close()

    def _arm(self) -> None:
        deadline = self.conn.next_deadline()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is None:
            return
        loop = asyncio.get_running_loop()
        # Connection deadlines are on node.clock (monotonic); translate to loop time.
        delay = max(0.0, deadline - self.node.clock())
        self._timer_at = deadline
        self._timer = loop.call_at(loop.time() + delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self.node.clock()
        self.conn.handle_timer(now)
        self._after_core_call()

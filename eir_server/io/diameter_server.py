"""asyncio shell around the sans-I/O Diameter core: sockets, timers, futures, logs.

One `DiameterProtocol` per TCP or TLS connection, no task per message: bytes in -> `Connection`
-> events -> `S13Handler` -> answers batched into one `transport.write` per read. A verdict that
needs Redis comes back as a pending lookup; a done-callback hands its result to the handler and
flushes. Every path that may have produced bytes or moved a deadline ends in `_flush()`.
"""

from __future__ import annotations

import asyncio
import socket
import ssl as ssl_module
import time
from collections.abc import Callable
from functools import partial
from typing import cast

from ..checker import EquipmentChecker
from ..diameter import errors
from ..diameter.connection import (
    DISCONNECT_CAUSES,
    REBOOTING,
    AppRequest,
    CerRejected,
    Closed,
    Connection,
    DisconnectRequested,
    ErrorAnswered,
    Event,
    PeerConfig,
    PeerOpened,
    PeerState,
    WatchdogChanged,
)
from ..diameter.dedup import DuplicateCache
from ..diameter.dictionary import Dictionary
from ..obs.logging import connection_logger, get_logger, log_protocol_error
from ..obs.metrics import MAX_PEER_LABELS, OTHER_PEER, Metrics
from ..policy.types import CheckRequest, Verdict
from ..s13.handler import PendingLookup, Rejected, S13Handler
from ..service import CheckService

log = get_logger("eir_server.diameter")

COMMAND_NAMES = {257: "CER", 280: "DWR", 282: "DPR", 324: "ECR"}
WRITE_HIGH_WATER = 512 * 1024  # then stop reading from that peer until it drains


class DiameterNode:
    """Everything the connections of one worker share."""

    def __init__(self, peer_config: PeerConfig, dictionary: Dictionary, checker: EquipmentChecker,
                 metrics: Metrics | None = None, dedup: DuplicateCache[int] | None = None,
                 audit: Callable[[float, CheckRequest, Verdict, str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 max_in_flight: int = 10_000) -> None:
        self.peer_config = peer_config
        self.dictionary = dictionary
        self.checker = checker
        self.metrics = metrics or Metrics()
        self.dedup = dedup if dedup is not None else DuplicateCache()
        # The core is clock-free; the audit stamps its records with the wall-clock time here.
        stamped = None if audit is None else (
            lambda req, verdict, peer, interface: audit(time.time(), req, verdict, peer,
                                                        interface))
        self.service = CheckService(checker, self.metrics, stamped, max_in_flight)
        self.s13 = S13Handler(peer_config.identity, dictionary, self.service, self.dedup,
                              self.metrics)
        self.protocols: set[DiameterProtocol] = set()
        self.clock = clock
        self.server: asyncio.Server | None = None  # the first listener
        self.servers: list[asyncio.Server] = []
        m = self.metrics
        m.set_gauge_callback("peers", self.peers_by_state)
        m.set_gauge_callback("in_flight", lambda: self.service.in_flight)
        m.set_gauge_callback("peer_table", self.peer_table)
        # requests of closed connections per Origin-Host, so per-peer counters never go back
        self.closed_peer_requests: dict[str, int] = {}
        m.set_gauge_callback("layouts", dictionary.compiled.layout_stats)

    @property
    def in_flight(self) -> int:
        return self.service.in_flight

    @property
    def max_in_flight(self) -> int:
        return self.service.max_in_flight

    @max_in_flight.setter
    def max_in_flight(self, value: int) -> None:
        self.service.max_in_flight = value

    def peer_table(self) -> dict[str, tuple[dict[str, int], int]]:
        """Per Origin-Host: connections by state and requests received (on scrape only).
        Bounded: Origin-Hosts beyond MAX_PEER_LABELS are folded into OTHER_PEER."""
        table: dict[str, tuple[dict[str, int], int]] = {}

        def slot(host: str) -> str:
            if host in table or len(table) < MAX_PEER_LABELS:
                return host
            return OTHER_PEER

        for host, n in self.closed_peer_requests.items():
            key = slot(host)
            states, reqs = table.get(key, ({}, 0))
            table[key] = (states, reqs + n)
        for p in self.protocols:
            host = p.conn.origin_host
            if not host:
                continue  # no CER yet: counted in eir_diameter_peers only
            key = slot(host)
            states, reqs = table.get(key, ({}, 0))
            state = p.conn.state.name.lower()
            states[state] = states.get(state, 0) + 1
            table[key] = (states, reqs + p.requests_seen)
        return table

    def _connection_closed(self, p: DiameterProtocol) -> None:
        host = p.conn.origin_host
        if host and p.requests_seen:
            if host not in self.closed_peer_requests and \
                    len(self.closed_peer_requests) >= MAX_PEER_LABELS:
                host = OTHER_PEER
            self.closed_peer_requests[host] = (self.closed_peer_requests.get(host, 0)
                                               + p.requests_seen)

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
                 "_in_flight", "_closing", "_handler", "_clock", "_metrics", "requests_seen")

    def __init__(self, node: DiameterNode) -> None:
        self.node = node
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None  # the core deadline the timer is armed for
        self._paused = False
        self._in_flight = 0  # this connection's pending lookups
        self._closing = False
        self._handler = node.s13
        self._clock = node.clock
        self._metrics = node.metrics
        self.requests_seen = 0  # per-peer request counter (eir_diameter_peer_requests_total)
        self.peer = "?"

    # -- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peername = transport.get_extra_info("peername")
        address = peername[0] if peername else None
        self.peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        node = self.node
        node.protocols.add(self)
        self._metrics.connections_accepted += 1
        tls = transport.get_extra_info("sslcontext") is not None
        self.log = connection_logger(self.peer, transport="tls" if tls else "tcp")
        self.conn = Connection(node.peer_config, node.dictionary, self._clock(), address)
        self._flush()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        now = self._clock()
        conn.receive_data(data, now)
        handler = self._handler
        peer = conn.origin_host or self.peer
        for ev in conn.events():
            if type(ev) is AppRequest:
                self.requests_seen += 1
                out = handler.handle(ev.message, now, peer)
                if type(out) is bytes:
                    conn.send(out)
                else:
                    self._outcome(out)
            else:
                self._event(ev)
        if handler.answered_now:
            handler.observe_latency(self._clock() - now)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.connection_lost()
        self.node.protocols.discard(self)
        self.node._connection_closed(self)
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

    def _outcome(self, out: PendingLookup | Rejected | bytes) -> None:
        match out:
            case PendingLookup():
                self._in_flight += 1
                lookup = cast("asyncio.Future[Verdict]", out.lookup)
                lookup.add_done_callback(partial(self._looked_up, out))
            case Rejected():
                self.conn.send(out.answer)
                self._error_answered(out.event)
            case bytes():
                self.conn.send(out)

    def _looked_up(self, pending: PendingLookup, fut: asyncio.Future[Verdict]) -> None:
        self._in_flight -= 1
        if fut.cancelled() or self.conn.state is PeerState.DONE and not self._closing:
            self._handler.abandon(pending)
            return
        self.conn.send(self._handler.complete(pending, fut.result(), self._clock()))
        self._flush()

    # -- connection events --------------------------------------------------------------------

    def _event(self, ev: Event) -> None:
        m = self._metrics
        match ev:
            case ErrorAnswered():
                self._error_answered(ev)
            case PeerOpened(origin_host=host, origin_realm=realm, applications=apps):
                m.cer["success"] += 1
                self.log = self.log.bind(origin_host=host)
                self.log.info("peer_opened", origin_realm=realm, applications=list(apps))
            case CerRejected(result_code=code, reason=reason, origin_host=host):
                name = errors.NAMES.get(code, str(code))
                m.cer[name.removeprefix("DIAMETER_").lower()] += 1
                m.protocol_errors[code] += 1
                self.log.warning("cer_rejected", result_code=code, reason=reason,
                                 origin_host=host)
            case WatchdogChanged(old=old, new=new):
                if new in ("SUSPECT", "DOWN"):
                    m.watchdog_failures += 1
                self.log.warning("watchdog_state", old=old, new=new)
            case DisconnectRequested(cause=cause):
                m.dpr[("received", cause)] += 1
                self.log.info("peer_sent_dpr", cause=cause)
            case Closed(reason=reason):
                if reason.startswith("framing error"):
                    m.framing_errors += 1
                    self.log.warning("connection_closed", reason=reason)
                else:
                    self.log.info("connection_closed", reason=reason)
                self._closing = True
            case AppRequest():  # only outside data_received, where no request arrives
                raise AssertionError("application request outside data_received")

    def _error_answered(self, ev: ErrorAnswered) -> None:
        command = COMMAND_NAMES.get(ev.command, str(ev.command))
        self._metrics.requests[("s13", command, str(ev.result_code))] += 1
        self._metrics.protocol_errors[ev.result_code] += 1
        log_protocol_error(self.log, "error_answer", command=command, hop_by_hop=ev.hop_by_hop,
                           result_code=ev.result_code, reason=ev.reason)

    # -- the one way out: bytes, close, timer --------------------------------------------------

    def _flush(self) -> None:
        """After any call into the core: write what it queued (a DPA we owe only once no
        earlier answer waits for the store), then close or re-arm the timer for its deadline."""
        conn = self.conn
        out = conn.data_to_send(self._in_flight == 0)
        transport = self.transport
        if out and transport is not None and not transport.is_closing():
            transport.write(out)
        if self._closing and self._in_flight == 0 and transport is not None:
            transport.close()  # after the answers above: close() flushes the write buffer
        deadline = conn.next_deadline()
        if deadline != self._timer_at or (self._timer is None and deadline is not None):
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_at = deadline
            if deadline is not None:
                # The core's deadlines are on node.clock; the loop timer takes a delay.
                delay = max(0.0, deadline - self._clock())
                self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.conn.handle_timer(self._clock())
        for ev in self.conn.events():
            self._event(ev)
        self._flush()

    # -- commands from the node -----------------------------------------------------------------

    def disconnect(self, now: float, cause: int) -> None:
        if self.conn.state is PeerState.R_OPEN:
            self._metrics.dpr[("sent", DISCONNECT_CAUSES[cause])] += 1
        self.conn.disconnect(now, cause)
        for ev in self.conn.events():
            self._event(ev)
        self._flush()

    def abort(self, reason: str) -> None:
        self.log.warning("connection_aborted", reason=reason)
        if self.transport is not None:
            self.transport.abort()

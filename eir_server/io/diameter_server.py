"""asyncio shell around the sans-I/O Diameter core: sockets, timers, futures, logs.

One `DiameterProtocol` per TCP or TLS connection, no task per message: bytes in -> `Connection`
-> events -> `S13Handler` -> answers batched into one `transport.write` per read. A verdict that
needs Redis comes back as a pending lookup; a done-callback hands its result to the handler and
flushes. Every path that may have produced bytes or moved a deadline ends in `_flush()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import ssl as ssl_module
import struct
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

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
from ..diameter.doic import OlrBytes
from ..diameter.shed import BusyAnswer
from ..obs.logging import connection_logger, get_logger, log_protocol_error
from ..obs.metrics import MAX_PEER_LABELS, OTHER_PEER, Metrics
from ..obs.ratelimit import LogLimiter
from ..overload import OverloadConfig, OverloadSignal, Source
from ..policy.types import Verdict
from ..s13.handler import PendingLookup, Rejected, S13Handler
from ..service import Audit, CheckService
from .tls import TlsListener

log = get_logger("eir_server.diameter")

COMMAND_NAMES = {257: "CER", 280: "DWR", 282: "DPR", 324: "ECR"}
WRITE_HIGH_WATER = 512 * 1024  # then stop reading from that peer until it drains
BIG_READ = 64 * 1024  # a read this large suggests more waits in the kernel: ask how much
# A peer that leaves this many bytes of answers unacknowledged in our socket (TIOCOUTQ: it does
# not read, or its window is shut) is no longer read from until they drop below UNREAD_LOW, and
# loses its connection after --write-stall-timeout. Waiting for our user-space buffer would let
# each such peer take MBs of answers (kernel buffers autotune) of the worker's time first; a
# reading peer 20 ms away at 50k answers/s has ~150 KB in flight.
UNREAD_HIGH = 192 * 1024
UNREAD_LOW = 64 * 1024
# Of those, bytes not even sent (SIOCOUTQNSD): the peer's receive window is shut, so it has not
# read what it was sent. A reading peer's answers leave at once whatever its distance (they
# wait in flight, not here), so this holds a non-reading peer after a few hundred answers
# instead of the ~1,300 that UNREAD_HIGH takes, each of them a full check other peers wait for.
UNSENT_HIGH = 32 * 1024
UNREAD_CHECK = 16 * 1024  # bytes written between two looks
SIOCOUTQNSD = 0x894B  # Linux; elsewhere the ioctl fails and only UNREAD_HIGH holds
UNREAD_POLL = 0.02  # seconds between looks while a peer is held
_INT = struct.Struct("i")
_BUSY = ("s13", "ECR", str(errors.TOO_BUSY))
_SHED_OVERLOAD = ("s13", "overload")  # eir_requests_shed_total{interface, reason}
_OC_SUPPORTED_CODE = (621).to_bytes(4, "big")  # OC-Supported-Features


@dataclass(frozen=True)
class NodeLimits:
    """What one worker grants its peers, and the security checks it applies."""

    max_connections: int = 1024  # per worker; more are closed at accept
    max_connections_per_source: int = 64  # per peer IP address
    tls_handshake_timeout: float = 10.0  # seconds; then the connection is dropped
    tls_peer_identity: bool = False  # CER Origin-Host must be a name of the TLS certificate
    origin_host_check: str = "log"  # ECR Origin-Host vs CER Origin-Host: off | log | refuse
    write_stall_timeout: float = 10.0  # seconds a full write buffer may stay full
    # Seconds of queueing delay before shedding; 0: never shed (--overload-target-delay).
    overload_target: float = 0.0


def certificate_names(cert: dict[str, Any] | None) -> tuple[str, ...]:
    """DNS names of a peer certificate (as ssl's getpeercert() gives it): subjectAltName DNS
    entries, else the subject CN (RFC 6125 6.4.4); lower case."""
    if not cert:
        return ()
    names = tuple(v.lower() for k, v in cert.get("subjectAltName", ()) if k == "DNS")
    if names:
        return names
    return tuple(v.lower() for rdn in cert.get("subject", ()) for k, v in rdn
                 if k == "commonName")


def _socket_count(fd: int, request: int) -> int:
    """One int-valued socket ioctl (FIONREAD, TIOCOUTQ); 0 where it fails (a closed socket)."""
    with contextlib.suppress(OSError):
        return int(_INT.unpack(fcntl.ioctl(fd, request, b"\0\0\0\0"))[0])
    return 0


def _cgroup_cpu_stat() -> tuple[str, bytes, float] | None:
    """This process's cgroup `cpu.stat` file, the throttled-time key in it and the key's unit
    in seconds (v2 throttled_usec, v1 throttled_time); None without a CPU controller."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
        for line in lines:
            _, controllers, path = line.split(":", 2)
            names = controllers.split(",")
            if controllers == "":
                stat, key, scale = f"/sys/fs/cgroup{path}/cpu.stat", b"throttled_usec", 1e-6
            elif "cpu" in names:
                base = "/sys/fs/cgroup/" + controllers
                if not os.path.isdir(base):
                    base = "/sys/fs/cgroup/cpu"
                stat, key, scale = f"{base}{path}/cpu.stat", b"throttled_time", 1e-9
            else:
                continue
            if os.path.exists(stat):  # hybrid hierarchies: the unified one may lack cpu.stat
                return stat, key, scale
    return None


def _quota_share(base: str, v2: bool) -> float:
    """The CPU quota of the cgroup directory `base` as a share of one CPU (v2 `cpu.max`, v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`); inf: none, or unreadable."""
    with contextlib.suppress(OSError, ValueError):
        if v2:
            with open(f"{base}/cpu.max") as f:
                quota, period = f.read().split()[:2]
        else:
            with open(f"{base}/cpu.cfs_quota_us") as f:
                quota = f.read().strip()
            with open(f"{base}/cpu.cfs_period_us") as f:
                period = f.read().strip()
        if quota not in ("max", "-1") and int(period) > 0:
            return int(quota) / int(period)
    return float("inf")


class CgroupThrottle:
    """Seconds this process's cgroup was held back by its CPU quota; 0 without a quota or
    where unreadable. Read every overload tick, so the file stays open and is read with
    pread; which file is looked up again every RESOLVE_EVERY seconds (the process may be
    moved to another cgroup while it runs).

    `share`: the quota as a share of one CPU (inf: none), read when the file is looked up.
    The overload tick uses it as well as the counter because the counter falls short: a
    worker held to a quarter of a CPU (10 ms periods, cgroup v1, a 2-CPU VM) ran 22 % of
    10.2 s of a storm and was counted 4.6 s throttled of the 7.9 s it did not run, so half of
    its ticks looked idle (busy < 0.5) and their delay was thrown away."""

    RESOLVE_EVERY = 5.0

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 locate: Callable[[], tuple[str, bytes, float] | None] = _cgroup_cpu_stat
                 ) -> None:
        self.clock = clock
        self.locate = locate
        self._fd = -1
        self._key = b""
        self._scale = 0.0
        self._resolve_at = float("-inf")
        self.share = float("inf")

    def seconds(self) -> float:
        now = self.clock()
        if now >= self._resolve_at:
            self._resolve_at = now + self.RESOLVE_EVERY
            self.close()
            found = self.locate()
            self.share = float("inf")
            if found is not None:
                self.share = _quota_share(os.path.dirname(found[0]),
                                          v2=found[1] == b"throttled_usec")
                with contextlib.suppress(OSError):
                    self._fd = os.open(found[0], os.O_RDONLY | os.O_CLOEXEC)
                    self._key, self._scale = b"\n" + found[1] + b" ", found[2]
        if self._fd < 0:
            return 0.0
        with contextlib.suppress(OSError, ValueError):
            data = b"\n" + os.pread(self._fd, 4096, 0)
            i = data.find(self._key)  # the key with a newline before it and a space after
            if i >= 0:
                start = i + len(self._key)
                return int(data[start:data.index(b"\n", start)]) * self._scale
        return 0.0

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


class DiameterNode:
    """Everything the connections of one worker share."""

    def __init__(self, peer_config: PeerConfig, dictionary: Dictionary, checker: EquipmentChecker,
                 metrics: Metrics | None = None, dedup: DuplicateCache | None = None,
                 audit: Audit | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 max_in_flight: int = 10_000, limits: NodeLimits | None = None) -> None:
        self.peer_config = peer_config
        self.limits = limits or NodeLimits()
        self.by_source: dict[str, int] = {}  # open connections per peer IP address
        # Lines a peer can cause are rate-limited per (line, source, detail): first line, then
        # a summary count per period.
        self.log_limiter = LogLimiter(overflow=("*", "*", "*"))
        self._summary_timer: asyncio.TimerHandle | None = None
        # Overload: measured once per tick, acted on per request (see eir_server.overload).
        self.overload = OverloadSignal(
            OverloadConfig(target=self.limits.overload_target or float("inf"), slices=5),
            epoch=int(time.time()))
        self.busy = BusyAnswer(peer_config.identity)
        self._olr = OlrBytes()
        self.bytes_read = 0
        self.waiting: dict[int, float] = {}  # id(pending lookup) -> when its request came
        self._tick: asyncio.TimerHandle | None = None
        self._slice: asyncio.TimerHandle | None = None
        self._slice_due = 0.0
        self._tick_due = 0.0
        self._tick_last = 0.0
        self._tick_cpu = 0.0  # the loop thread's CPU time at the last tick
        self._tick_throttled = 0.0  # the cgroup's throttled time at the last tick
        self._throttle = CgroupThrottle()
        self.dictionary = dictionary
        self.checker = checker
        self.metrics = metrics or Metrics()
        self.dedup = dedup if dedup is not None else DuplicateCache()
        # The core is clock-free; the audit (AuditRecorder.record_now) stamps its records.
        self.service = CheckService(checker, self.metrics, audit, max_in_flight)
        self.s13 = S13Handler(peer_config.identity, dictionary, self.service, self.dedup,
                              self.metrics)
        if self.limits.origin_host_check != "off":
            self.s13.check_origin(self.limits.origin_host_check == "refuse",
                                  self._origin_mismatch)
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
        m.set_gauge_callback("overload", self.overload_stats)

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

    def should_log(self, line: str, source: str, detail: object) -> dict[str, Any] | None:
        """Rate limit for lines a peer can cause: None to skip this one (it is counted and
        summarised later), else extra fields for the line."""
        ok, suppressed = self.log_limiter.hit((line, source, detail), self.clock())
        if self._summary_timer is None:
            self._arm_summaries()
        if not ok:
            return None
        return {"suppressed_since_last": suppressed} if suppressed else {}

    def log_limited(self, logger: object, line: str, source: str, detail: object,
                    **fields: object) -> None:
        """A warning `line`, unless the same (line, source, detail) was logged within the
        limiter's period."""
        extra = self.should_log(line, source, detail)
        if extra is not None:
            logger.warning(line, **fields, **extra)  # type: ignore[attr-defined]

    def _arm_summaries(self) -> None:
        with contextlib.suppress(RuntimeError):  # no loop: nothing to summarise from
            self._summary_timer = asyncio.get_running_loop().call_later(
                self.log_limiter.period / 4, self._summaries)

    def _summaries(self, final: bool = False) -> None:
        self._summary_timer = None
        lim = self.log_limiter
        for key, count in lim.flush() if final else lim.due(self.clock()):
            line, source, detail = cast("tuple[str, str, object]", key)
            log.warning("lines_suppressed", line=line, peer=source, detail=detail, count=count,
                        period_s=lim.period)
        if len(lim) and not final:
            self._arm_summaries()

    def _origin_mismatch(self, peer: str, origin: bytes, refused: bool) -> None:
        self.metrics.requests[("s13", "ECR", "origin_host_mismatch")] += 1
        self.log_limited(log, "origin_host_mismatch", peer, "ECR", cer_origin_host=peer,
                         ecr_origin_host=origin.decode("ascii", "replace"), refused=refused)

    def admit_connection(self, transport: asyncio.BaseTransport, address: str) -> bool:
        """Connection limits, checked at accept before any work for the peer is done."""
        lim = self.limits
        n = self.by_source.get(address, 0)
        if len(self.protocols) >= lim.max_connections or n >= lim.max_connections_per_source:
            self.metrics.cer["connection_refused"] += 1
            self.log_limited(log, "connection_refused", address, "limit", peer=address,
                             reason="connection limit reached", open_from_source=n)
            cast(asyncio.Transport, transport).abort()
            return False
        return True

    def overload_stats(self) -> dict[str, float]:
        sig = self.overload
        return {"delay": sig.delay, "reduction": sig.reduction, "active": float(sig.shedding)}

    def _start_ticks(self) -> None:
        if self._tick is None:
            loop = asyncio.get_running_loop()
            self._tick_last = loop.time()
            self._tick_cpu = time.thread_time()
            self._tick_throttled = self._throttle.seconds()
            self._tick_due = self._tick_last + self.overload.config.tick
            self._tick = loop.call_at(self._tick_due, self._on_tick)

    def _on_tick(self) -> None:
        """Measure how far behind the worker is and let the overload signal decide."""
        loop = asyncio.get_running_loop()
        t = loop.time()
        lag = max(0.0, t - self._tick_due)
        rate = self.bytes_read / max(t - self._tick_last, 1e-3)
        self.bytes_read = 0
        pending = 0
        for p in self.protocols:
            if p.held:  # a peer that does not read its answers waits by its own doing
                continue
            if p.kernel_pending or p._backlogged or p._src.arrivals:
                # Bytes may wait in the kernel: after a big read, and as well while its reads
                # are paused for messages framed but not handled yet (`_backlogged`) or after a
                # small read (the bytes that came since). Looking at the big reads alone missed
                # backlogs of 70-140 ms in a storm (the budget grew on a delay read as 7-15 ms,
                # and verdicts waited 150 ms). One ioctl per connection with traffic per tick.
                p.kernel_pending = p.queued()
            pending += p.kernel_pending + p.conn.pending * 200
        pending_delay = pending / rate if rate > 0 else (1.0 if pending else 0.0)
        now = self.clock()
        oldest = now - min(self.waiting.values()) if self.waiting else 0.0
        cpu = time.thread_time()
        throttled = self._throttle.seconds()
        # Time a CPU quota held us back is time we could not have run: not idleness. As the
        # throttle counter says, or as the quota's share of the wall time if that is less (the
        # counter falls short, see CgroupThrottle).
        wall = t - self._tick_last
        ran_for = min(wall - max(0.0, throttled - self._tick_throttled),
                      wall * self._throttle.share)
        busy = (cpu - self._tick_cpu) / max(ran_for, 1e-3)
        self._tick_cpu = cpu
        self._tick_throttled = throttled
        sig = self.overload
        sig.tick(now, lag, pending_delay, oldest, busy)
        self.s13.eca.doic = self._olr.get(sig.report)
        self._tick_last = t
        self._tick_due = t + sig.config.tick
        self._tick = loop.call_at(self._tick_due, self._on_tick)
        if sig.shedding and sig.config.slices > 1 and self._slice is None:
            self._slice_due = t + sig.config.tick / sig.config.slices
            self._slice = loop.call_at(self._slice_due, self._on_slice)

    def _on_slice(self) -> None:
        """The next slice of the shares of the tick (see OverloadConfig.slices). Due at fixed
        times from the tick: one that fires late (a throttled CPU, a long turn) does not push
        the later ones past the next tick; they follow at once, up to the cap of `refill`."""
        self._slice = None
        sig = self.overload
        sig.refill()
        step = sig.config.tick / sig.config.slices
        self._slice_due += step
        if sig.shedding and self._slice_due < self._tick_due - step / 2:
            self._slice = asyncio.get_running_loop().call_at(self._slice_due, self._on_slice)

    def doic_bytes(self) -> bytes:
        return self.s13.eca.doic

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
        server: asyncio.Server
        if ssl is not None:
            server = TlsListener(  # type: ignore[assignment]
                ssl, host, port, reuse_port, sock, lambda: DiameterProtocol(self),
                self.limits.tls_handshake_timeout, self._tls_failed, self._accept_failed)
        elif sock is not None:
            server = await loop.create_server(lambda: DiameterProtocol(self), sock=sock)
        else:
            server = await loop.create_server(
                lambda: DiameterProtocol(self), host or None, port, reuse_port=reuse_port,
                backlog=1024)
        self.servers.append(server)
        self._start_ticks()
        if self.server is None:
            self.server = server
        return server

    def _tls_failed(self, address: str, error: BaseException, reason: str) -> None:
        self.metrics.cer["tls_handshake_failed"] += 1
        self.log_limited(log, "tls_handshake_failed", address, type(error).__name__,
                         peer=address, reason=reason)

    def _accept_failed(self, error: OSError) -> None:
        self.log_limited(log, "accept_failed", "*", error.errno, reason=str(error))

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
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        self._throttle.close()
        if self._slice is not None:
            self._slice.cancel()
            self._slice = None
        if self._summary_timer is not None:
            self._summary_timer.cancel()
        self._summaries(final=True)


class DiameterProtocol(asyncio.Protocol):
    __slots__ = ("node", "conn", "transport", "peer", "log", "_timer", "_timer_at", "_paused",
                 "_in_flight", "_closing", "_handler", "_clock", "_metrics", "requests_seen",
                 "address", "_backlogged", "_stall", "kernel_pending", "_fd", "_src", "_held",
                 "_unchecked", "_hold_timer", "_flush_due")

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
        self.address = "?"
        self._backlogged = False  # reading paused until our pending messages had their turn
        self._stall: asyncio.TimerHandle | None = None
        self.kernel_pending = 0  # bytes the kernel held for us after our last big read
        self._fd = -1
        self._src: Source = node.overload.source(self)
        self._held = False  # reading paused: too many of our answers unread in the kernel
        self._unchecked = 0  # bytes written since the last TIOCOUTQ look
        self._hold_timer: asyncio.TimerHandle | None = None
        self._flush_due = False  # a _deferred_flush is scheduled

    # -- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._fd = sock.fileno()
        peername = transport.get_extra_info("peername")
        address = peername[0] if peername else None
        self.peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        self.address = address or "?"
        node = self.node
        tls = transport.get_extra_info("sslcontext") is not None
        self.log = connection_logger(self.peer, transport="tls" if tls else "tcp")
        if not node.admit_connection(transport, self.address):
            self.conn = Connection(node.peer_config, node.dictionary, self._clock(), address)
            self.conn.connection_lost()
            return
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        node.protocols.add(self)
        node.by_source[self.address] = node.by_source.get(self.address, 0) + 1
        self._metrics.connections_accepted += 1
        identities = None
        if tls and node.limits.tls_peer_identity:
            identities = certificate_names(transport.get_extra_info("peercert"))
        self.conn = Connection(node.peer_config, node.dictionary, self._clock(), address,
                               tls_identities=identities, tls=tls)
        self.conn.doic = node.doic_bytes
        if node.limits.overload_target > 0:
            self.conn.gate = partial(node.overload.admit, self._src)
            self.conn.refuse_run = self._refuse_run
            self.conn.quota = partial(node.overload.left, self._src)
        self._flush()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        now = self._clock()
        node = self.node
        n = len(data)
        node.bytes_read += n
        if n >= BIG_READ and self._fd >= 0:
            # What the kernel still holds for us is queueing delay no counter of ours sees.
            self.kernel_pending = self.queued()
        elif n:
            self.kernel_pending = 0
        conn.receive_data(data, now)
        if conn.shed:
            m = self._metrics
            m.requests[_BUSY] += conn.shed
            m.protocol_errors[errors.TOO_BUSY] += conn.shed
            m.shed[_SHED_OVERLOAD] += conn.shed
            self.requests_seen += conn.shed  # received from this peer, answered 3004
            conn.shed = 0
        handler = self._handler
        peer = conn.origin_host or self.peer
        src = self._src
        for ev in conn.events():
            if type(ev) is AppRequest:
                self.requests_seen += 1
                if src.reacting is None:  # its first request says whether it speaks DOIC
                    src.reacting = handler.eca.wants_doic(ev.message)
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
        if conn.pending and not self._backlogged and not self._closing:
            # More framed messages than one turn handles: stop reading, let the other peers'
            # reads run, continue with ours on the next loop iteration (or, if the peer does
            # not read its answers, once it does: resume_writing).
            self._backlogged = True
            if self.transport is not None:
                self.transport.pause_reading()
            if not (self._paused or self._held):
                asyncio.get_running_loop().call_soon(self._continue)

    def _refuse_run(self, msgs: list[bytes], start: int, stop: int, out: list[bytes],
                    counted: int) -> int:
        """Overloaded: 3004 from a template and each request's raw bytes, nothing decoded, for
        the run of requests from msgs[start] (`counted`: the gate refused msgs[start] already,
        and refuses the rest of this tick's; else they are the older head of a read, refused
        so that the quota admits the younger tail); the MME retries on another EIR at once (a
        DOIC peer also reads the OC-OLR)."""
        src = self._src
        if src.reacting is None:  # shed before any request was decoded: look at the bytes
            src.reacting = msgs[start].find(_OC_SUPPORTED_CODE, 20) >= 0
        end = self.node.busy.answer_run(
            msgs, start, stop, self._handler.eca.doic if src.reacting else b"", out)
        self.node.overload.refused(src, end - start - counted)
        return end

    def _continue(self) -> None:
        t = self.transport
        if t is None or t.is_closing() or self._paused or self._held:
            return
        self._backlogged = False
        self.data_received(b"")
        if not (self._backlogged or self._paused or self._held):
            t.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.connection_lost()
        node = self.node
        node.overload.forget(self)
        if self in node.protocols:
            node._connection_closed(self)
            node.protocols.discard(self)
            n = node.by_source.get(self.address, 1) - 1
            if n > 0:
                node.by_source[self.address] = n
            else:
                node.by_source.pop(self.address, None)
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if self.conn.origin_host:
            self.log.info("peer_disconnected", reason=str(exc) if exc else "closed")

    def pause_writing(self) -> None:
        # Backpressure: a peer that does not read its answers stops being read from, and loses
        # its connection if it still has not read them after the grace time.
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()
            self._arm_stall()

    def resume_writing(self) -> None:
        if self.transport is not None and self._paused:
            self._paused = False
            if self._held:  # the kernel still holds too much: _check_hold resumes
                return
            self._resume()

    def _resume(self) -> None:
        """Neither our buffer nor the kernel's holds too much any more: read again."""
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        if self._backlogged:
            asyncio.get_running_loop().call_soon(self._continue)
        elif self.transport is not None:
            self.transport.resume_reading()

    @property
    def held(self) -> bool:
        """Not read from because the peer leaves its answers unread."""
        return self._held or self._paused

    def queued(self) -> int:
        """Bytes the kernel holds for us to read (FIONREAD)."""
        return _socket_count(self._fd, termios.FIONREAD)

    def _unread(self) -> int:
        """Bytes of our answers the peer has not acknowledged (TIOCOUTQ)."""
        return _socket_count(self._fd, termios.TIOCOUTQ)

    def _hold(self) -> None:
        """Too many answers unread (UNREAD_HIGH, or UNSENT_HIGH not even sent): stop reading
        this peer, look again soon."""
        t = self.transport
        if t is None or self._held:
            return
        self._held = True
        self._metrics.cer["read_held"] += 1
        t.pause_reading()
        self._arm_stall()
        self._hold_timer = asyncio.get_running_loop().call_later(UNREAD_POLL, self._check_hold)

    def _check_hold(self) -> None:
        self._hold_timer = None
        t = self.transport
        if t is None or t.is_closing() or not self._held:
            return
        if self._unread() > UNREAD_LOW or \
                _socket_count(self._fd, SIOCOUTQNSD) > UNSENT_HIGH // 4:
            self._hold_timer = asyncio.get_running_loop().call_later(
                UNREAD_POLL, self._check_hold)
            return
        self._held = False
        if not self._paused:  # else our own buffer is still full: resume_writing takes over
            self._resume()

    def _arm_stall(self) -> None:
        if self._stall is None:
            self._stall = asyncio.get_running_loop().call_later(
                self.node.limits.write_stall_timeout, self._stalled)

    def _stalled(self) -> None:
        """The peer has not read its answers (or our last answers before a close) for the
        grace time: drop the connection and what it has not read."""
        self._stall = None
        t = self.transport
        if t is None or (t.get_write_buffer_size() == 0 and not self._paused
                         and not self._held):
            return
        self._metrics.cer["write_stalled"] += 1
        self.node.log_limited(self.log, "connection_aborted", self.address, "write_stalled",
                              reason="peer does not read its answers",
                              unread_bytes=t.get_write_buffer_size())
        t.abort()

    # -- requests -----------------------------------------------------------------------------

    def _outcome(self, out: PendingLookup | Rejected | bytes) -> None:
        match out:
            case PendingLookup():
                self._in_flight += 1
                self.node.waiting[id(out)] = out.received
                lookup = cast("asyncio.Future[Verdict]", out.lookup)
                lookup.add_done_callback(partial(self._looked_up, out))
            case Rejected():
                self.conn.send(out.answer)
                self._error_answered(out.event)
            case bytes():
                self.conn.send(out)

    def _looked_up(self, pending: PendingLookup, fut: asyncio.Future[Verdict]) -> None:
        self._in_flight -= 1
        self.node.waiting.pop(id(pending), None)
        if fut.cancelled() or self.conn.state is PeerState.DONE and not self._closing:
            self._handler.abandon(pending)
            return
        self.conn.send(self._handler.complete(pending, fut.result(), self._clock()))
        # The other lookups of the same round trip complete in this same loop turn: one write
        # for all of their answers, after them (a write per answer was a syscall each).
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._deferred_flush)

    def _deferred_flush(self) -> None:
        self._flush_due = False
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
                self.node.log_limited(self.log, "cer_rejected", self.address, code,
                                      result_code=code, reason=reason, origin_host=host)
            case WatchdogChanged(old=old, new=new):
                if new in ("SUSPECT", "DOWN"):
                    m.watchdog_failures += 1
                self.log.warning("watchdog_state", old=old, new=new)
            case DisconnectRequested(cause=cause):
                m.dpr[("received", cause)] += 1
                self.log.info("peer_sent_dpr", cause=cause)
            case Closed(reason=reason, peer_caused=peer_caused):
                if reason.startswith("framing error"):
                    m.framing_errors += 1
                    self.node.log_limited(self.log, "connection_closed", self.address,
                                          "framing", reason=reason)
                elif peer_caused:
                    # A peer can cause these on every connection (connect, send a request or
                    # a bad CER, close, repeat): rate-limited like the lines that go with them.
                    self.node.log_limited(self.log, "connection_closed", self.address,
                                          reason, reason=reason)
                else:
                    self.log.info("connection_closed", reason=reason)
                self._closing = True
            case AppRequest():  # only outside data_received, where no request arrives
                raise AssertionError("application request outside data_received")

    def _error_answered(self, ev: ErrorAnswered) -> None:
        command = COMMAND_NAMES.get(ev.command, str(ev.command))
        self._metrics.requests[("s13", command, str(ev.result_code))] += 1
        self._metrics.protocol_errors[ev.result_code] += 1
        extra = self.node.should_log("error_answer", self.conn.origin_host or self.address,
                                     ev.result_code)
        if extra is not None:
            log_protocol_error(self.log, "error_answer", command=command,
                               hop_by_hop=ev.hop_by_hop, result_code=ev.result_code,
                               reason=ev.reason, **extra)

    # -- the one way out: bytes, close, timer --------------------------------------------------

    def _flush(self) -> None:
        """After any call into the core: write what it queued (a DPA we owe only once no
        earlier answer waits for the store), then close or re-arm the timer for its deadline."""
        conn = self.conn
        out = conn.data_to_send(self._in_flight == 0)
        transport = self.transport
        if out and transport is not None and not transport.is_closing():
            transport.write(out)
            self._unchecked += len(out)
            if self._unchecked >= UNREAD_CHECK and self._fd >= 0:
                self._unchecked = 0
                if _socket_count(self._fd, SIOCOUTQNSD) >= UNSENT_HIGH or \
                        self._unread() >= UNREAD_HIGH:
                    self._hold()
        if self._closing and self._in_flight == 0 and transport is not None:
            transport.close()  # after the answers above: close() flushes the write buffer
            if transport.get_write_buffer_size():
                # ...unless the peer stopped reading (e.g. the watchdog declared it down):
                # then the buffer never drains, and the connection is aborted after the grace.
                self._arm_stall()
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

"""The asyncio shell of `eir-server load`: N Diameter connections driven closed or open loop.

Closed loop: each connection keeps `inflight` ECRs outstanding; whatever one read completes is
replaced in one write. Open loop: a 1 ms timer sends what the schedule says is due (constant
rate or a linear ramp), or with `pacing="exact"` each request when it is due (the loop spins:
the event loop's timers have a 1 ms resolution, and a tick's requests arriving in one write are
answered as one batch, so the last of them waits for the others: a burst no network of many
devices sends), each request stamped with its *scheduled* send time, and latency is
measured from that stamp: a server that stalls cannot hide its queue by slowing the generator
down (no coordinated omission). A request unanswered `timeout` seconds after that stamp is a
timeout; its late answer is counted as such, never as a latency.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import math
import os
import random
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..diameter.dictionary import Dictionary
from . import hist
from .imeis import NOT_CHECKED, ImeiEntry
from .s13 import (
    CER,
    DPR,
    DWR,
    ECR,
    HDR,
    S13_APP,
    U32,
    AnswerChecker,
    EcrTemplates,
    Identity,
    dpa,
    dpr,
    dwa,
    walk,
)

HDR4 = HDR.__class__("!IIII")
MASK32 = 0xFFFFFFFF
TICK = 0.001  # open-loop send timer
SCAN = 0.05  # timeout scan period


@dataclass
class LoadConfig:
    host: str
    port: int
    me: Identity
    entries: list[ImeiEntry]
    connections: int = 4
    inflight: int = 64
    rate: tuple[float, float] | None = None  # (start, end) per second: open loop
    pacing: str = "tick"  # open loop: "tick" (what is due each 1 ms) or "exact" (spin)
    duration: float = 10.0
    warmup: float = 1.0
    timeout: float = 2.0
    connect_timeout: float = 5.0
    progress: Callable[[str], None] | None = None


@dataclass
class Second:
    """One second of the run (the plot's x axis)."""

    t: float
    sent: int = 0
    answers: int = 0
    errors: int = 0  # answers that are not 2001 (any Result-Code or Experimental-Result)
    timeouts: int = 0
    hist: hist.Histogram = field(default_factory=hist.Histogram)


@dataclass
class Stats:
    sent: int = 0
    answers: int = 0
    warmup_answers: int = 0
    late: int = 0  # answers after their timeout, or to nothing we sent
    timeouts: int = 0
    mismatches: int = 0
    mismatch_examples: list[dict[str, object]] = field(default_factory=list)
    classes: dict[tuple[int, int, int, str], int] = field(default_factory=dict)
    total: hist.Histogram = field(default_factory=hist.Histogram)
    timeline: list[Second] = field(default_factory=list)
    conn_up: int = 0
    conn_failures: list[str] = field(default_factory=list)
    conn_lost: int = 0
    dwr_answered: int = 0
    dpa_received: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0
    busy_cpus: float = 0.0
    open_loop_late_ms: float = 0.0  # worst lag of the send timer behind its schedule
    t0_unix: float = 0.0  # wall clock at the start of the run (timeline t = 0)
    stopped_early: bool = False  # SIGINT/SIGTERM ended the run before --duration


class Generator:
    def __init__(self, cfg: LoadConfig, dictionary: Dictionary) -> None:
        self.cfg = cfg
        self.checker = AnswerChecker(dictionary)
        from .s13 import entry_block
        self.blocks = [entry_block(e) for e in cfg.entries]
        self.expected = [e.expected for e in cfg.entries]
        self.imeis = [e.imei for e in cfg.entries]
        self.cursor = 0
        self.turn = 0
        self.stats = Stats()
        self.conns: list[Conn] = []
        self.running = False
        self.t0 = 0.0
        self.measure_from = math.inf
        self.stop_at = math.inf
        self.cur = Second(0.0)
        self.interval_counts = self.cur.hist.counts

    # -- the schedule -----------------------------------------------------------------------
    def due(self, t: float) -> float:
        """Requests the open-loop schedule has due `t` seconds into the run."""
        r0, r1 = self.cfg.rate or (0.0, 0.0)
        span = self.cfg.warmup + self.cfg.duration
        t = min(t, span)
        return r0 * t + (r1 - r0) * t * t / (2 * span)

    def sched_time(self, i: int) -> float:
        """Inverse of `due`: when request i is scheduled, seconds into the run."""
        r0, r1 = self.cfg.rate or (1.0, 1.0)
        if r0 == r1:
            return i / r0
        a = (r1 - r0) / (self.cfg.warmup + self.cfg.duration)
        return (-r0 + math.sqrt(r0 * r0 + 2 * a * i)) / a

    def next_index(self) -> int:
        i = self.cursor
        self.cursor = i + 1 if i + 1 < len(self.blocks) else 0
        return i

    # -- per second -----------------------------------------------------------------------------
    def roll_second(self, now: float) -> Second:
        done = self.cur
        done.hist.settle()
        if now >= self.measure_from:
            self.stats.total.add(done.hist)
        self.stats.timeline.append(done)
        self.cur = Second(now - self.t0)
        self.interval_counts = self.cur.hist.counts
        return done

    def progress_line(self, s: Second) -> str:
        h = s.hist
        phase = "warmup " if s.t < self.cfg.warmup else ""
        return (f"\r{phase}t={s.t + 1:4.0f}s  {s.answers:>8,} answers/s  p99 "
                f"{h.percentile(99) / 1000:7.2f} ms  errors {s.errors:,}  timeouts "
                f"{s.timeouts:,}  mismatches {self.stats.mismatches:,}  "
                f"in flight {sum(len(c.pending) for c in self.conns):,}   ")

    async def run(self) -> Stats:
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        st = self.stats
        # Connect and exchange capabilities first; the clock starts when every peer is up.
        for i in range(cfg.connections):
            c = Conn(self, i, self.blocks)
            self.conns.append(c)
            try:
                await asyncio.wait_for(loop.create_connection(functools.partial(_same, c),
                                                              cfg.host, cfg.port),
                                       cfg.connect_timeout)
            except (OSError, TimeoutError) as e:
                st.conn_failures.append(f"connection {i}: {e or type(e).__name__}")
        try:
            if not st.conn_failures:
                await asyncio.wait_for(asyncio.gather(*(c.up for c in self.conns)),
                                       cfg.connect_timeout)
        except TimeoutError:
            st.conn_failures.append("capabilities exchange: no CEA in time")
        except ConnectionError as e:
            st.conn_failures.append(str(e))
        live = [c for c in self.conns if c.is_up]
        st.conn_up = len(live)
        if not live or st.conn_failures:
            for c in self.conns:
                c.close()
            return st
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        busy0 = _cpu_sample()
        for sig in (signal.SIGINT, signal.SIGTERM):  # end early, still with a report
            loop.add_signal_handler(sig, self.stop_now)
        st.t0_unix = time.time()
        self.t0 = now = time.perf_counter()
        self.measure_from = now + cfg.warmup
        self.stop_at = now + cfg.warmup + cfg.duration
        self.running = True
        next_second = now + 1.0
        if cfg.rate is None:
            for c in live:
                c.fill()
        else:
            loop.call_soon(self.tick)
        cpu_at_measure = None
        while True:
            await asyncio.sleep(min(SCAN, max(0.0, next_second - time.perf_counter())))
            now = time.perf_counter()
            for c in self.conns:
                c.expire(now)
            if cpu_at_measure is None and now >= self.measure_from:
                cpu_at_measure = resource.getrusage(resource.RUSAGE_SELF)
                busy0 = _cpu_sample()
            if now >= next_second:
                s = self.roll_second(next_second)
                next_second += 1.0
                if cfg.progress:
                    cfg.progress(self.progress_line(s))
            if now >= self.stop_at:
                self.running = False
                if not any(c.pending for c in self.conns) or now >= self.stop_at + cfg.timeout:
                    break
            if not any(c.is_up for c in self.conns):
                break
        for c in self.conns:
            c.expire(math.inf if now >= self.stop_at + cfg.timeout else now)
        self.roll_second(time.perf_counter())
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        ru0 = cpu_at_measure or ru0
        st.cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        st.busy_cpus = _busy_since(busy0)
        st.elapsed = max(0.0, min(time.perf_counter(), self.stop_at) - self.measure_from)
        # Goodbye: DPR on each connection, DPA awaited briefly.
        for c in self.conns:
            c.disconnect()
        try:
            await asyncio.wait_for(asyncio.gather(*(c.closed for c in self.conns),
                                                  return_exceptions=True), 2.0)
        except TimeoutError:
            pass
        for c in self.conns:
            c.close()
        return st

    def stop_now(self) -> None:
        now = time.perf_counter()
        if now < self.stop_at:
            self.stop_at = now
            self.stats.stopped_early = True

    def tick(self) -> None:
        """Open loop: send what is due now, spread over the connections, one write each."""
        if not self.running:
            return
        now = time.perf_counter()
        t = now - self.t0
        due = int(self.due(t))
        live = [c for c in self.conns if c.is_up]
        if live and due > self.stats.sent:
            first = self.stats.sent
            # Request i becomes due when due(t) passes i + 1 (due(t) counts the requests due
            # by t): its scheduled time is sched_time(i + 1), not sched_time(i), which would add
            # one inter-arrival interval (1/rate: 5 ms at 200/s) to every latency.
            lag = t - self.sched_time(first + 1)
            if lag * 1000 > self.stats.open_loop_late_ms and now >= self.measure_from:
                self.stats.open_loop_late_ms = lag * 1000
            # One connection per tick, in turn: one write (one syscall) per tick instead of one
            # per connection, and the connections still share the load evenly.
            self.turn += 1
            live[self.turn % len(live)].send([self.t0 + self.sched_time(i + 1)
                                              for i in range(first, due)])
        loop = asyncio.get_running_loop()
        if self.cfg.pacing == "exact":
            loop.call_soon(self.tick)  # a turn of the loop (its reads too) per check, no sleep
        else:
            loop.call_at(loop.time() + TICK, self.tick)


class Conn(asyncio.Protocol):
    def __init__(self, g: Generator, idx: int, blocks: list[bytes]) -> None:
        self.g = g
        self.idx = idx
        h = g.cfg.me.origin_host
        me = g.cfg.me
        self.me = Identity(h.format(n=idx) if "{n}" in h else h, me.origin_realm,
                           me.destination_realm, me.destination_host, me.host_ip)
        self.tpl = EcrTemplates(self.me, idx, blocks)
        self.lens = [len(b) for b in blocks]
        self.base_word = self.tpl.words[0] - self.lens[0] if blocks else 0
        self.pending: dict[int, tuple[float, int]] = {}
        self.hbh = random.Random(idx).randrange(1 << 20)
        self.e2e_base = (int(time.time()) & 0xFFF) << 20 | random.Random(~idx).randrange(1 << 20)
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_event_loop()
        self.up: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.is_up = False
        self.bye = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        from .s13 import cer
        transport.write(cer(self.me))  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        was_up = self.is_up
        self.is_up = False
        if not self.up.done():
            self.up.set_exception(ConnectionError(
                f"connection {self.idx}: closed before CEA ({exc or 'by peer'})"))
        elif was_up and not self.bye:
            self.g.stats.conn_lost += 1
            self.g.stats.conn_failures.append(
                f"connection {self.idx} ({self.me.origin_host}): lost during the run "
                f"({exc or 'closed by peer'})")
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def disconnect(self) -> None:
        if self.is_up and self.transport is not None:
            self.bye = True
            self.transport.write(dpr(self.me, self._next_hbh()))

    def _next_hbh(self) -> int:
        self.hbh = (self.hbh + 1) & MASK32
        return self.hbh

    # -- sending -------------------------------------------------------------------------------
    def fill(self) -> None:
        """Closed loop: top up to `inflight` outstanding in one write."""
        n = self.g.cfg.inflight - len(self.pending)
        if n > 0 and self.g.running:
            now = time.perf_counter()
            self.send([now] * n)

    def send(self, times: list[float]) -> None:
        g = self.g
        tpl = self.tpl
        pack = HDR.pack
        lens = self.lens
        base = self.base_word
        fc = tpl.flags_code
        sid_head, fixed, blocks = tpl.sid_head, tpl.fixed, tpl.blocks
        pending = self.pending
        out = []
        hbh = self.hbh
        e2e_base = self.e2e_base
        nxt = g.next_index
        for t in times:
            hbh = (hbh + 1) & MASK32
            i = nxt()
            out.append(pack(base + lens[i], fc, S13_APP, hbh, (e2e_base + hbh) & MASK32))
            out.append(sid_head)
            out.append(b"%010d" % hbh)
            out.append(fixed)
            out.append(blocks[i])
            pending[hbh] = (t, i)
        self.hbh = hbh
        g.stats.sent += len(times)
        g.cur.sent += len(times)
        assert self.transport is not None
        self.transport.write(b"".join(out))

    def expire(self, now: float) -> None:
        """Count requests older than the timeout (oldest first: dicts keep insertion order)."""
        if not self.pending:
            return
        limit = now - self.g.cfg.timeout
        dead = []
        for hbh, (t, _i) in self.pending.items():
            if t > limit:
                break
            dead.append(hbh)
        if dead:
            for hbh in dead:
                del self.pending[hbh]
            self.g.stats.timeouts += len(dead)
            self.g.cur.timeouts += len(dead)
            if self.g.cfg.rate is None:
                self.fill()

    # -- receiving -----------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        n = len(buf)
        pos = 0
        now = time.perf_counter()
        g = self.g
        st = g.stats
        pending = self.pending
        unpack = U32.unpack_from
        unpack4 = HDR4.unpack_from
        sid_total = self.tpl.sid_total
        body = g.checker.body
        counts = g.interval_counts
        classes = st.classes
        expected = g.expected
        measure_from = g.measure_from
        cur = g.cur
        answered = 0
        while n - pos >= 20:
            vl = unpack(buf, pos)[0]
            length = vl & 0xFFFFFF
            if vl >> 24 != 1 or length < 20 or length % 4:
                self._fatal(f"unframeable answer (version {vl >> 24}, length {length})")
                return
            if n - pos < length:
                break
            fc, app, hbh, e2e = unpack4(buf, pos + 4)
            end = pos + length
            if fc & 0xFFFFFF == ECR and not fc & 0x80000000:
                p = pending.pop(hbh, None)
                if p is None:
                    st.late += 1
                    pos = end
                    continue
                t, i = p
                msg = buf[pos:end]
                if (app != S13_APP or e2e != (self.e2e_base + hbh) & MASK32
                        or fc >> 24 & 0x0F):
                    r = (-2, -1, -1, "header: Application-Id, end-to-end or reserved bits")
                elif msg[20:20 + sid_total] == self.tpl.sid(hbh):
                    r = body(msg, sid_total)
                else:
                    r = self._sid_elsewhere(msg, hbh)
                answered += 1
                v = int((now - t) * 1e6)
                s = v.bit_length() - 8
                counts[(s << 7) + (v >> s) if s > 0 else v] += 1
                if r[1] != 2001:
                    cur.errors += 1
                if t >= measure_from:
                    c = classes.get(r)
                    classes[r] = 1 if c is None else c + 1
                    want = expected[i]
                    if want != NOT_CHECKED and want != r[0]:
                        self._mismatch(i, r)
                else:
                    st.warmup_answers += 1
            else:
                self._other(buf[pos:end], fc, hbh, e2e)
            pos = end
        self.buf = buf[pos:] if pos < n else b""
        if answered:
            st.answers += answered
            cur.answers += answered
            if g.cfg.rate is None:
                self.fill()

    def _sid_elsewhere(self, msg: bytes, hbh: int) -> tuple[int, int, int, str]:
        """Slow path: Session-Id not first (RFC 6733 8.8 says SHOULD): find it, then classify."""
        want = self.tpl.sid(hbh)
        want_value = want[8:8 + len(want) - 8 - len(self.tpl.sid_pad)]
        try:
            avps = walk(msg, 20, len(msg))
        except ValueError as e:
            return (-2, -1, -1, str(e))
        if not any(c == 263 and v == 0 and msg[s:e] == want_value for c, v, s, e in avps):
            return (-2, -1, -1, "Session-Id not echoed")
        return self.g.checker.classify(msg)

    def _mismatch(self, i: int, r: tuple[int, int, int, str]) -> None:
        st = self.g.stats
        st.mismatches += 1
        if len(st.mismatch_examples) < 20:
            st.mismatch_examples.append({"imei": self.g.imeis[i], "expected": self.g.expected[i],
                                         "got": r[0], "problem": r[3]})

    def _other(self, msg: bytes, fc: int, hbh: int, e2e: int) -> None:
        code = fc & 0xFFFFFF
        request = bool(fc & 0x80000000)
        assert self.transport is not None
        if code == CER and not request:
            rc = _result_code(msg)
            if rc == 2001:
                self.is_up = True
                if not self.up.done():
                    self.up.set_result(None)
            elif not self.up.done():
                self.up.set_exception(ConnectionError(
                    f"connection {self.idx} ({self.me.origin_host}): CEA Result-Code {rc}"))
        elif code == DWR and request:
            self.transport.write(dwa(self.me, hbh, e2e))
            self.g.stats.dwr_answered += 1
        elif code == DPR and request:
            self.bye = True  # the peer ends the connection: not a failure of ours to report
            self.transport.write(dpa(self.me, hbh, e2e))
            self.g.stats.conn_failures.append(
                f"connection {self.idx}: the peer sent DPR during the run")
            self.transport.close()
        elif code == DPR:
            self.g.stats.dpa_received += 1
            self.transport.close()

    def _fatal(self, why: str) -> None:
        self.g.stats.conn_failures.append(f"connection {self.idx}: {why}")
        self.buf = b""
        if self.transport is not None:
            self.transport.abort()


def _same(c: Conn) -> Conn:
    return c


def _result_code(msg: bytes) -> int:
    try:
        for code, vendor, s, e in walk(msg, 20, len(msg)):
            if code == 268 and vendor == 0 and e - s == 4:
                return int(U32.unpack_from(msg, s)[0])
    except ValueError:
        pass
    return -1


def _cpu_sample() -> tuple[int, int]:
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0, 0
    return sum(f), f[3] + f[4]


def _busy_since(t0: tuple[int, int]) -> float:
    """CPUs' worth of non-idle time on the whole machine since the sample."""
    t1 = _cpu_sample()
    total, idle = t1[0] - t0[0], t1[1] - t0[1]
    return (1 - idle / total) * (os.cpu_count() or 1) if total > 0 else 0.0


def run(cfg: LoadConfig, dictionary: Dictionary, use_uvloop: bool = True) -> Stats:
    try:
        if not use_uvloop:
            raise ImportError
        import uvloop
        runner: Callable[..., Stats] = uvloop.run
    except ImportError:
        runner = asyncio.run
    g = Generator(cfg, dictionary)
    # The IMEI entries and pre-encoded requests live for the whole run: out of the collector's
    # reach, or each full collection walks them (40-100 ms with 100k entries: the generator's
    # own lag, which an open-loop run would report as the server's latency).
    gc.collect()
    gc.freeze()
    try:
        return runner(g.run())
    finally:
        gc.unfreeze()


def _stderr_progress(line: str) -> None:
    sys.stderr.write(line)
    sys.stderr.flush()

"""Overload and hostile peers against a real `eir-server serve` (one worker): what the healthy
peers get while the worker is pushed past what it can do. Not a test: numbers go in the README.

    # open-loop storm at 3x capacity for 30 s, the worker held to 25 % of a core by a cgroup
    .venv/bin/python benchmarks/bench_overload.py storm --cpu 0.25 --factor 3 --seconds 30
    # 50 peers that send ECRs and never read their answers, beside one healthy peer
    .venv/bin/python benchmarks/bench_overload.py nonreading --peers 50
    # 10k distinct message shapes (unknown non-M AVPs of distinct codes) beside a healthy peer
    .venv/bin/python benchmarks/bench_overload.py shapes --shapes 10000 --avps 16

The CPU quota uses cgroup v2 (`cpu.max`) where /sys/fs/cgroup is a writable v2 hierarchy, else
the v1 `cpu` controller (`cpu.cfs_quota_us`), with a 10 ms period (`--cpu-period`); both need
root. Without either, `--cpu` fails and
the storm has to be run with a generator that outruns the worker on its own (more client
processes than server cores).

storm: capacity C is measured first (closed loop under the same quota), then requests are sent
open loop at factor x C: a timer writes what is due every 2 ms, whatever the answers do. Every
request counts as a verdict, a 3004, another answer, or a timeout (no answer within --timeout,
default 5 s, as an MME's Tx timer). Then a closed loop measures, second by second, how fast
throughput is back to 90 % of C. RSS of the worker is sampled throughout.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eir_server.diameter.codec import (  # noqa: E402
    FLAG_P,
    FLAG_R,
    avp,
    grouped_avp,
    message,
    str_avp,
    u32_avp,
)
from eir_server.load.s13 import Identity, cer  # noqa: E402

U32 = struct.Struct("!I")
RESULT_CODE_HEAD = b"\x00\x00\x01\x0c"  # AVP code 268
OC_OLR_HEAD = b"\x00\x00\x02\x6f"  # AVP code 623
EXE = ROOT / ".venv/bin/eir-server"
REALM = "localdomain"
DOIC = grouped_avp(621, [avp(622, (1).to_bytes(8, "big"), mandatory=False)], mandatory=False)


# ---------------------------------------------------------------------------------------------
# The worker process, its CPU quota and its memory


def start_server(extra: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(EXE), "serve", "--diameter-listen", f"127.0.0.1:{port}", "--metrics-listen", "",
           "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("eir-server did not start")


@contextlib.contextmanager
def cpu_quota(pid: int, fraction: float, period: int = 10_000) -> Iterator[str]:
    """Hold `pid` to `fraction` of one core with a cgroup (v2 cpu.max, else v1 cpu).
    `period` (µs): the kernel's default 100 ms lets the worker run 25 ms and then stops it for
    75 ms, a stall no real machine has; 10 ms makes it a uniformly slower core."""
    quota = int(period * fraction)
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.controllers").exists():
        base, limit = v2, lambda g: (g / "cpu.max").write_text(f"{quota} {period}")
        kind = "cgroup v2 cpu.max"
        with contextlib.suppress(OSError):
            (v2 / "cgroup.subtree_control").write_text("+cpu")
    elif (Path("/sys/fs/cgroup/cpu") / "cpu.cfs_quota_us").exists():
        base = Path("/sys/fs/cgroup/cpu")

        def limit(g: Path) -> None:
            (g / "cpu.cfs_period_us").write_text(str(period))
            (g / "cpu.cfs_quota_us").write_text(str(quota))
        kind = "cgroup v1 cpu.cfs_quota_us"
    else:
        raise SystemExit("no writable cgroup cpu controller: run as root, or without --cpu")
    group = base / f"eir-bench-{pid}"
    group.mkdir(exist_ok=True)
    try:
        limit(group)
        (group / "cgroup.procs").write_text(str(pid))
        yield f"{kind} {quota}/{period}"
    finally:
        with contextlib.suppress(OSError):
            (base / "cgroup.procs").write_text(str(pid))
        with contextlib.suppress(OSError):
            group.rmdir()


def rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mib(self.pid))
            await asyncio.sleep(0.25)

    def __enter__(self) -> RssSampler:
        self.task = asyncio.ensure_future(self.run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()


# ---------------------------------------------------------------------------------------------
# Requests and the client


def ecr_template(conn: int, i: int, doic: bool) -> bytes:
    imei = f"{35209900000000 + (i * 7919) % 10_000_000:014d}"
    avps = [str_avp(263, f"mme{conn}.bench;{i:09d};1"), u32_avp(277, 1),
            str_avp(264, f"mme{conn}.bench"), str_avp(296, "bench"), str_avp(283, REALM),
            grouped_avp(1401, [str_avp(1402, imei, 10415), str_avp(1403, "01", 10415)], 10415),
            str_avp(1, "00101" + imei[4:])]
    if doic:
        avps.append(DOIC)
    return message(FLAG_R | FLAG_P, 324, 16777252, 0, 0, avps)


class Stats:
    """Per request: when it was sent (by sequence number = hop-by-hop id) and what came back."""

    def __init__(self, capacity: int, timeout: float) -> None:
        self.sent_at = array.array("d", bytes(8 * capacity))
        self.seq = 0
        self.timeout = timeout
        self.codes: Counter[int] = Counter()
        self.lat: list[float] = []
        self.at: list[float] = []  # when each verdict in `lat` came (perf_counter)
        self.late = 0
        self.olr: list[tuple[float, int]] = []  # (time, reduction %) seen in answers

    def next_ids(self, n: int, now: float) -> range:
        r = range(self.seq + 1, self.seq + n + 1)
        for i in r:
            self.sent_at[i % len(self.sent_at)] = now
        self.seq += n
        return r

    def answered(self, hbh: int, code: int, now: float) -> None:
        lat = now - self.sent_at[hbh % len(self.sent_at)]
        if lat > self.timeout:
            self.late += 1
            self.codes[-1] += 1  # the MME gave up on it before it came
            return
        self.codes[code] += 1
        if code == 2001:
            self.lat.append(lat)
            self.at.append(now)


class Client(asyncio.Protocol):
    """One MME connection. Open loop: `send(n)` writes n ECRs. Closed loop (`depth` > 0): keeps
    `depth` requests outstanding. Answers are classified by Result-Code."""

    def __init__(self, idx: int, stats: Stats, depth: int = 0, doic: bool = False,
                 reading: bool = True) -> None:
        self.idx = idx
        self.stats = stats
        self.depth = depth
        self.templates = [bytearray(ecr_template(idx, i, doic)) for i in range(64)]
        self.size = len(self.templates[0])
        self.buf = b""
        self.open: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.reading = reading
        self.stop = False
        self.answers = 0
        self.olr_seen: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.t.write(cer(Identity(f"mme{self.idx}.bench", "bench", "localdomain")))

    def send(self, n: int) -> None:
        if self.closed or n <= 0:
            return
        ids = self.stats.next_ids(n, time.perf_counter())
        parts = []
        tpl = self.templates
        for k, hbh in enumerate(ids):
            m = tpl[(hbh + k) & 63]
            U32.pack_into(m, 12, hbh & 0xFFFFFFFF)
            U32.pack_into(m, 16, hbh & 0xFFFFFFFF)
            parts.append(bytes(m))
        self.t.write(b"".join(parts))

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        now = time.perf_counter()
        pos = 0
        n = len(buf)
        unpack = U32.unpack_from
        got = 0
        stats = self.stats
        while n - pos >= 20:
            length = unpack(buf, pos)[0] & 0xFFFFFF
            if n - pos < length:
                break
            code = unpack(buf, pos + 4)[0] & 0xFFFFFF
            if code == 324:
                rc = buf.find(RESULT_CODE_HEAD, pos + 20, pos + length)
                result = unpack(buf, rc + 8)[0] if rc >= 0 else 5422
                stats.answered(unpack(buf, pos + 12)[0], result, now)
                got += 1
                olr = buf.find(OC_OLR_HEAD, pos + 20, pos + length)
                if olr >= 0:
                    self.olr_seen = _reduction(buf, olr)
            elif code == 257 and not self.open.done():
                self.open.set_result(None)
            pos += length
        self.buf = buf[pos:]
        self.answers += got
        if self.depth and got and not self.stop:
            self.send(got)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.open.done():
            self.open.set_exception(ConnectionError("closed before CEA"))


def _reduction(buf: bytes, pos: int) -> int | None:
    """OC-Reduction-Percentage (627) inside the OC-OLR at `pos`, if any."""
    end = pos + (U32.unpack_from(buf, pos + 4)[0] & 0xFFFFFF)
    i = buf.find(b"\x00\x00\x02\x73", pos + 8, end)
    return U32.unpack_from(buf, i + 8)[0] if i >= 0 else 0


async def connect(port: int, idx: int, stats: Stats, timeout: float = 30.0,
                  **kw: object) -> Client:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: Client(idx, stats, **kw),  # type: ignore[arg-type]
                                             "127.0.0.1", port)
    await asyncio.wait_for(client.open, timeout)
    return client


async def closed_loop(port: int, conns: int, depth: int, seconds: float,
                      buckets: list[int] | None = None) -> tuple[float, Stats]:
    stats = Stats(1 << 22, 1e9)
    clients = [await connect(port, 100 + c, stats, depth=depth) for c in range(conns)]
    t0 = time.perf_counter()
    for c in clients:
        c.send(depth)
    last = 0
    while (el := time.perf_counter() - t0) < seconds:
        await asyncio.sleep(min(1.0, seconds - el))
        total = sum(c.answers for c in clients)
        if buckets is not None:
            buckets.append(total - last)
        last = total
    for c in clients:
        c.stop = True
    elapsed = time.perf_counter() - t0
    total = sum(c.answers for c in clients)
    for c in clients:
        c.t.abort()
    return total / elapsed, stats


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] * 1e3


def per_second_p99(st: Stats) -> str:
    if not st.at:
        return "-"
    t0 = st.at[0]
    by: dict[int, list[float]] = {}
    for t, lat in zip(st.at, st.lat, strict=True):
        by.setdefault(int(t - t0), []).append(lat)
    return " ".join(f"{pct(v, 99):.1f}" for _, v in sorted(by.items()))


# ---------------------------------------------------------------------------------------------
# Scenarios


async def storm(args: argparse.Namespace, pid: int, port: int) -> None:
    rss0 = rss_mib(pid)
    cap = args.capacity
    if not cap:
        cap, st = await closed_loop(port, 4, 64, args.calibrate)
        print(f"capacity (closed loop, 4 x 64 in flight)  {cap:,.0f} answers/s, "
              f"p99 {pct(st.lat, 99):.1f} ms")
    rate = cap * args.factor
    stats = Stats(1 << 24, args.timeout)
    cap_proc = pcap = None
    if args.capture:
        from benchmarks.bench_tail import capture
        pcap = Path(tempfile.mkdtemp(prefix="storm-")) / "storm.pcap"
        cap_proc = capture(port, pcap)
    clients = [await connect(port, c, stats, doic=args.doic) for c in range(args.connections)]
    cpu0 = cpu_seconds(pid)
    with RssSampler(pid) as rss:
        t0 = time.perf_counter()
        turn = 0
        while (el := time.perf_counter() - t0) < args.seconds:
            due = int(rate * el) - stats.seq
            live = [c for c in clients if not c.closed]
            if not live:
                break
            if args.doic:
                # A reacting client (RFC 7683 loss algorithm): drop the share it was told to.
                red = max((c.olr_seen or 0) for c in live)
                due -= int(due * red / 100)
            for k in range(len(live)):
                share = due // len(live) + (1 if k < due % len(live) else 0)
                live[(turn + k) % len(live)].send(share)
            if args.doic and due < int(rate * el) - stats.seq:
                stats.seq = int(rate * el)  # what the client chose not to send
            turn += 1
            await asyncio.sleep(0.002)
        sent_s = time.perf_counter() - t0
        storm_cpu = cpu_seconds(pid) - cpu0
        offered = stats.seq
        # Everything sent gets --timeout seconds to be answered.
        await asyncio.sleep(args.timeout + 0.5)
        rss_end = rss_mib(pid)
        got = sum(stats.codes.values())
        refused_by_client = offered - sum(c.answers for c in clients) if args.doic else 0
        for c in clients:
            c.t.abort()
        if cap_proc is not None:
            cap_proc.send_signal(signal.SIGINT)
            cap_proc.wait(30)
        buckets: list[int] = []
        after, st_after = await closed_loop(port, 4, 64, args.recovery, buckets)
    unanswered = offered - got
    print(f"storm: {args.factor}x capacity = {rate:,.0f}/s offered for {sent_s:.1f} s over "
          f"{args.connections} connections ({offered:,} requests)")
    print(f"  verdicts (2001)        {stats.codes[2001] + stats.codes[5422]:,}")
    print(f"  3004 TOO_BUSY          {stats.codes[3004]:,}")
    others = {k: v for k, v in stats.codes.items() if k not in (2001, 5422, 3004, -1)}
    print(f"  other answers          {others or 0}")
    print(f"  late (> {args.timeout:g} s)         {stats.late:,}")
    print(f"  unanswered             {unanswered - (refused_by_client if args.doic else 0):,}")
    print(f"  verdict latency        p50 {pct(stats.lat, 50):.1f} ms  p99 "
          f"{pct(stats.lat, 99):.1f} ms  max {pct(stats.lat, 100):.1f} ms")
    # The storm starts at once from nothing: until shedding starts, every request is admitted
    # and waits behind the others. Its first second apart from the rest (both in the above).
    first = [lat for lat, at in zip(stats.lat, stats.at, strict=True) if at < t0 + 1.0]
    rest = [lat for lat, at in zip(stats.lat, stats.at, strict=True) if at >= t0 + 1.0]
    print(f"    first second: {len(first):,} verdicts, p99 {pct(first, 99):.1f} ms  max "
          f"{pct(first, 100):.1f} ms; after it: p99 {pct(rest, 99):.1f} ms  max "
          f"{pct(rest, 100):.1f} ms")
    if pcap is not None:
        from benchmarks.wire_latency import analyse
        w = analyse(pcap, port)
        shutil.rmtree(pcap.parent, ignore_errors=True)
        print(f"  on the wire (server)   verdict p50 {w.result_percentile((2001,), 50) / 1000:.1f}"
              f" ms  p99 {w.result_percentile((2001,), 99) / 1000:.1f} ms; 3004 p99 "
              f"{w.result_percentile((3004,), 99) / 1000:.1f} ms; capture gaps {w.gaps}, "
              f"TCP retransmissions {w.retransmitted}")
        if os.environ.get("STORM_SECONDS"):  # per second: median and max latency, ms
            print("  per second (p50/max ms)", " ".join(
                f"{sorted(v)[len(v) // 2] / 1000:.0f}/{max(v) / 1000:.0f}"
                for _, v in sorted(w.per_second.items())))
    print(f"  server CPU during storm {storm_cpu / sent_s * 100:.0f} % of a core")
    print(f"  RSS                    {rss0:.0f} MiB before, peak {rss.peak:.0f}, "
          f"{rss_end:.0f} after")
    first = next((i for i, b in enumerate(buckets) if b >= 0.9 * cap), None)
    answered_after = sum(st_after.codes.values())
    print(f"recovery: closed loop after the storm {after:,.0f}/s ("
          f"{(st_after.codes[2001] + st_after.codes[5422]) / max(answered_after, 1) * 100:.0f} % verdicts); per second "
          f"{[round(b) for b in buckets]}; >= 90 % of capacity "
          f"{'after ' + str(first) + ' s' if first is not None else 'not within the run'}")


async def nonreading(args: argparse.Namespace, pid: int, port: int) -> None:
    base, st = await closed_loop(port, 1, 64, args.seconds)
    print(f"healthy peer alone            {base:,.0f}/s  p99 {pct(st.lat, 99):.2f} ms")
    print(f"  per second p99 (ms)         {per_second_p99(st)}")
    rss0 = rss_mib(pid)
    hogs = []
    dummy = Stats(1 << 16, 1e9)
    for i in range(args.peers):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        _, c = await loop.create_connection(lambda i=i: Client(1000 + i, dummy, reading=False),
                                            sock=sock)
        c.t.pause_reading()  # never read: answers pile up in the server's write buffer
        hogs.append(c)

    # One batch per hog built once: they never read their answers, so their hop-by-hop ids do
    # not matter, and building 256 ECRs per hog every 10 ms in this process (the healthy peer's
    # loop too) put the generator's own lag into the healthy peer's latency.
    batches = {id(c): b"".join(bytes(t) for t in c.templates) * 4 for c in hogs}

    async def hog_writer() -> None:
        while True:
            for c in hogs:
                if not c.closed and c.t.get_write_buffer_size() < 256 * 1024:
                    c.t.write(batches[id(c)])
            await asyncio.sleep(0.01)

    task = asyncio.ensure_future(hog_writer())
    await asyncio.sleep(1.0)
    t0 = time.perf_counter()
    try:
        newcomer = await connect(port, 999, Stats(16, 1e9), timeout=60)
        cea = time.perf_counter() - t0
        newcomer.t.abort()
    except TimeoutError:
        cea = float("inf")
    during, st2 = await closed_loop(port, 1, 64, args.seconds)
    closed = sum(c.closed for c in hogs)
    task.cancel()
    print(f"with {args.peers} non-reading peers   {during:,.0f}/s ({during / base * 100:.0f} %)  "
          f"p99 {pct(st2.lat, 99):.2f} ms  max {pct(st2.lat, 100):.1f} ms")
    print(f"  per second p99 (ms)         {per_second_p99(st2)}")
    print(f"new peer's CER -> CEA         {cea * 1e3:.1f} ms")
    print(f"non-reading peers closed by the server: {closed}/{args.peers}; "
          f"RSS {rss0:.0f} -> {rss_mib(pid):.0f} MiB")
    for c in hogs:
        c.t.abort()


def shape_ecr(i: int, navps: int) -> bytes:
    """An ECR whose unknown non-M AVPs use codes no other shape uses: a new layout each."""
    base = 100_000 + i * navps
    extra = [avp(base + k, b"\0\0\0\0", mandatory=False) for k in range(navps)]
    return message(FLAG_R | FLAG_P, 324, 16777252, i, i, [
        str_avp(263, f"evil.bench;{i:09d};1"), u32_avp(277, 1), str_avp(264, "evil.bench"),
        str_avp(296, "bench"), str_avp(283, REALM),
        grouped_avp(1401, [str_avp(1402, "35209900176148", 10415)], 10415), *extra])


async def shapes(args: argparse.Namespace, pid: int, port: int) -> None:
    base, st = await closed_loop(port, 1, 64, args.seconds)
    rss0 = rss_mib(pid)
    print(f"healthy peer alone     {base:,.0f}/s  p99 {pct(st.lat, 99):.2f} ms; RSS {rss0:.0f} MiB")
    stats = Stats(1 << 16, 1e9)
    evil = await connect(port, 7777, stats)
    frames = [shape_ecr(i, args.avps) for i in range(args.shapes)]
    cpu0 = cpu_seconds(pid)
    t0 = time.perf_counter()

    async def attack() -> None:
        for k in range(0, len(frames), 64):
            evil.t.write(b"".join(frames[k:k + 64]))
            while evil.answers < k and not evil.closed:
                await asyncio.sleep(0.001)

    task = asyncio.ensure_future(attack())
    with RssSampler(pid) as rss:
        during, st2 = await closed_loop(port, 1, 64, args.seconds)
        await task
        while evil.answers < len(frames) and not evil.closed:
            await asyncio.sleep(0.01)
    took = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0
    after, st3 = await closed_loop(port, 1, 64, args.seconds)
    print(f"{args.shapes} shapes of {args.avps} unknown AVPs ({len(frames[0])} bytes) sent in "
          f"{took:.1f} s; answers {dict(stats.codes)}; server CPU {cpu:.1f} s "
          f"({cpu / max(len(frames), 1) * 1e6:.0f} µs per shape, incl. the healthy peer)")
    print(f"healthy peer during    {during:,.0f}/s ({during / base * 100:.0f} %)  "
          f"p99 {pct(st2.lat, 99):.2f} ms")
    print(f"healthy peer after     {after:,.0f}/s ({after / base * 100:.0f} %)  "
          f"p99 {pct(st3.lat, 99):.2f} ms")
    print(f"RSS                    {rss0:.0f} MiB before, peak {rss.peak:.0f}, "
          f"{rss_mib(pid):.0f} after")
    evil.t.abort()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=("storm", "nonreading", "shapes"))
    ap.add_argument("--cpu", type=float, default=0.0,
                    help="hold the worker to this share of one core (cgroup); 0: no quota")
    ap.add_argument("--cpu-period", type=float, default=10.0,
                    help="cgroup CPU period, ms (the kernel default is 100: a 25%% quota then "
                         "stops the worker for 75 ms at a time)")
    ap.add_argument("--server-args", default="", help="extra `eir-server serve` arguments")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--factor", type=float, default=3.0, help="storm: offered load / capacity")
    ap.add_argument("--capacity", type=float, default=0.0, help="storm: skip calibration")
    ap.add_argument("--calibrate", type=float, default=5.0)
    ap.add_argument("--recovery", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=5.0, help="the MME's answer timer")
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--capture", action="store_true",
                    help="storm: also measure latency from packet timestamps (dumpcap, root): "
                         "the server's own, without this generator's lag")
    ap.add_argument("--doic", action="store_true",
                    help="storm: advertise DOIC and reduce the offered load as told by OC-OLR")
    ap.add_argument("--peers", type=int, default=50)
    ap.add_argument("--shapes", type=int, default=10_000)
    ap.add_argument("--avps", type=int, default=16)
    args = ap.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    proc, port = start_server(args.server_args.split())
    try:
        quota = (cpu_quota(proc.pid, args.cpu, int(args.cpu_period * 1000)) if args.cpu
                 else contextlib.nullcontext("none"))
        with quota as q:
            print(f"worker pid {proc.pid}, CPU quota: {q}; load average "
                  f"{os.getloadavg()[0]:.1f} (other work on the machine)")
            fn = {"storm": storm, "nonreading": nonreading, "shapes": shapes}[args.scenario]
            asyncio.run(fn(args, proc.pid, port))
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())

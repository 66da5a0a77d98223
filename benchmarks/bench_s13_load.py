"""Pipelined S13 load: N connections x K ECRs in flight against a real `eir-server serve`.

Reports answers/s, latency percentiles (from writing a request to reading its answer) and the
server's CPU time per answer (utime+stime from /proc). Not a test: numbers go in the README.

    .venv/bin/python benchmarks/bench_s13_load.py --connections 4 --inflight 64 --seconds 10
    .venv/bin/python benchmarks/bench_s13_load.py --target 127.0.0.1:3868   # an external server

The client is plain asyncio + uvloop with pre-encoded ECRs (only hop-by-hop ids are patched), so
one client core can drive more load than one server core answers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eir_server.diameter.codec import (  # noqa: E402
    FLAG_P,
    FLAG_R,
    address_payload,
    avp,
    grouped_avp,
    message,
    str_avp,
    u32_avp,
)

U32 = struct.Struct("!I")


def cer(i: int) -> bytes:
    return message(FLAG_R, 257, 0, 1, 1, [
        str_avp(264, f"mme{i}.bench"), str_avp(296, "bench"),
        avp(257, address_payload("127.0.0.1")), u32_avp(266, 0),
        str_avp(269, "bench", mandatory=False),
        grouped_avp(260, [u32_avp(266, 10415), u32_avp(258, 16777252)]),
    ])


def ecr(conn: int, i: int, realm: str) -> bytes:
    imei = f"{35209900000000 + (i * 7919) % 10_000_000:014d}"
    return message(FLAG_R | FLAG_P, 324, 16777252, i, i, [
        str_avp(263, f"mme{conn}.bench;{i};1"), u32_avp(277, 1), str_avp(264, f"mme{conn}.bench"),
        str_avp(296, "bench"), str_avp(283, realm),
        grouped_avp(1401, [str_avp(1402, imei, 10415), str_avp(1403, "01", 10415)], 10415),
        str_avp(1, "00101" + imei[4:]),  # one subscriber per device, as in real traffic
    ])


class Client(asyncio.Protocol):
    def __init__(self, idx: int, inflight: int, pool: list[bytes], stop_at: float,
                 done: asyncio.Future[None], lat: list[float]) -> None:
        self.idx = idx
        self.inflight = inflight
        self.pool = pool
        self.stop_at = stop_at
        self.done = done
        self.lat = lat
        self.buf = b""
        self.sent_at: dict[int, float] = {}
        self.next = 0
        self.answers = 0
        self.opened = False
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(cer(self.idx))  # type: ignore[attr-defined]

    def send(self, n: int) -> None:
        now = time.perf_counter()
        out = []
        pool = self.pool
        for _ in range(n):
            i = self.next
            self.next += 1
            hbh = (self.idx << 24) | (i & 0xFFFFFF)
            m = pool[i % len(pool)]
            out.append(m[:12] + U32.pack(hbh) + m[16:])
            self.sent_at[hbh] = now
        self.t.write(b"".join(out))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        now = time.perf_counter()
        pos = 0
        n = len(buf)
        got = 0
        while n - pos >= 20:
            length = U32.unpack_from(buf, pos)[0] & 0xFFFFFF
            if n - pos < length:
                break
            code = U32.unpack_from(buf, pos + 4)[0] & 0xFFFFFF
            hbh = U32.unpack_from(buf, pos + 12)[0]
            if code == 257:
                self.opened = True
                self.send(self.inflight)
            elif code == 324:
                t0 = self.sent_at.pop(hbh, None)
                if t0 is not None:
                    self.lat.append(now - t0)
                got += 1
            pos += length
        self.buf = buf[pos:]
        self.answers += got
        if got:
            if now < self.stop_at:
                self.send(got)
            elif not self.sent_at and not self.done.done():
                self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


async def drive(host: str, port: int, conns: int, inflight: int, seconds: float,
                realm: str) -> tuple[int, float, list[float]]:
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    start = loop.time()
    stop_at = start + seconds
    clients = []
    for c in range(conns):
        pool = [ecr(c, i, realm) for i in range(1024)]
        done: asyncio.Future[None] = loop.create_future()
        await loop.create_connection(
            lambda c=c, pool=pool, done=done: Client(c, inflight, pool, stop_at, done, lat),
            host, port)
        clients.append(done)
    await asyncio.wait_for(asyncio.gather(*clients), seconds + 30)
    elapsed = loop.time() - start
    return len(lat), elapsed, lat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--inflight", type=int, default=64, help="requests in flight per connection")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--target", help="HOST:PORT of a running server (default: start one)")
    ap.add_argument("--server-args", default="", help="extra `eir-server serve` arguments")
    ap.add_argument("--realm", default="localdomain")
    args = ap.parse_args()
    proc = None
    if args.target:
        host, port_s = args.target.rsplit(":", 1)
        port = int(port_s)
    else:
        host = "127.0.0.1"
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        cmd = [str(ROOT / ".venv/bin/eir-server"), "serve", "--diameter-listen",
               f"{host}:{port}", "--metrics-listen", "", "--log-level", "warning",
               *args.server_args.split()]
        proc = subprocess.Popen(cmd)
        for _ in range(100):
            try:
                socket.create_connection((host, port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    cpu0 = cpu_seconds(proc.pid) if proc else 0.0
    n, elapsed, lat = asyncio.run(drive(host, port, args.connections, args.inflight,
                                        args.seconds, args.realm))
    cpu1 = cpu_seconds(proc.pid) if proc else 0.0
    if proc:
        proc.terminate()
        proc.wait(15)
    lat.sort()
    rate = n / elapsed
    print(f"{'connections x inflight':<28}{args.connections} x {args.inflight}")
    print(f"{'answers':<28}{n}")
    print(f"{'answers/s':<28}{rate:,.0f}")
    for p in (50, 99, 99.9):
        print(f"{'latency p' + str(p):<28}{percentile(lat, p) * 1e3:.3f} ms")
    if proc:
        print(f"{'server CPU per answer':<28}{(cpu1 - cpu0) / max(n, 1) * 1e6:.2f} µs")
        print(f"{'server CPU utilisation':<28}{(cpu1 - cpu0) / elapsed * 100:.0f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pipelined S13 load: N connections x K ECRs in flight against a real `eir-server serve`.

Reports answers/s, latency percentiles (from writing a request to reading its answer) and the
server's CPU time per answer (utime+stime from /proc). Not a test: numbers go in the README.

    .venv/bin/python benchmarks/bench_s13_load.py --connections 4 --batch 32 --depth 2 --pin
    .venv/bin/python benchmarks/bench_s13_load.py --target 127.0.0.1:3868   # an external server

The client is plain asyncio + uvloop writing pre-encoded batches of ECRs, so one client core
drives more load than one server core answers.
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
    """Closed loop per connection: `depth` batches of `batch` pre-encoded ECRs in flight; a batch
    is resent (one write) as soon as all its answers are back. Per answer the client only reads
    a length and a hop-by-hop id, so one client core can outrun one server core."""

    def __init__(self, idx: int, batches: list[bytes], batch: int, depth: int, stop_at: float,
                 done: asyncio.Future[None], lat: list[float]) -> None:
        self.idx = idx
        self.batches = batches
        self.batch = batch
        self.depth = depth
        self.stop_at = stop_at
        self.done = done
        self.lat = lat
        self.buf = b""
        self.sent_at = [0.0] * depth
        self.missing = [0] * depth
        self.turn = 0
        self.outstanding = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(cer(self.idx))  # type: ignore[attr-defined]

    def send(self, slot: int) -> None:
        # hop-by-hop ids of a batch are (slot << 16 | i): the answer tells which batch it ends.
        self.turn += 1
        self.sent_at[slot] = time.perf_counter()
        self.missing[slot] = self.batch
        self.outstanding += 1
        self.t.write(self.batches[(self.turn * self.depth + slot) % len(self.batches)][slot])  # type: ignore[index,attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        now = time.perf_counter()
        pos = 0
        n = len(buf)
        unpack = U32.unpack_from
        while n - pos >= 20:
            length = unpack(buf, pos)[0] & 0xFFFFFF
            if n - pos < length:
                break
            code = unpack(buf, pos + 4)[0] & 0xFFFFFF
            if code == 324:
                slot = unpack(buf, pos + 12)[0] >> 16
                self.lat.append(now - self.sent_at[slot])
                self.missing[slot] -= 1
                if self.missing[slot] == 0:
                    self.outstanding -= 1
                    if now < self.stop_at:
                        self.send(slot)
            elif code == 257:
                for slot in range(self.depth):
                    self.send(slot)
            pos += length
        self.buf = buf[pos:]
        if now >= self.stop_at and self.outstanding == 0 and not self.done.done():
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


async def drive(host: str, port: int, conns: int, batch: int, depth: int, seconds: float,
                realm: str) -> tuple[int, float, list[float]]:
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    start = loop.time()
    stop_at = time.perf_counter() + seconds
    clients = []
    for c in range(conns):
        # 8 variants of each batch slot, so IMEIs and sessions keep changing.
        batches = [[b"".join(_with_hbh(ecr(c, (v * depth + slot) * batch + i, realm),
                                       (slot << 16) | i) for i in range(batch))
                    for slot in range(depth)] for v in range(8)]
        done: asyncio.Future[None] = loop.create_future()
        await loop.create_connection(
            lambda c=c, b=batches, done=done: Client(c, b, batch, depth, stop_at, done, lat),
            host, port)
        clients.append(done)
    await asyncio.wait_for(asyncio.gather(*clients), seconds + 30)
    elapsed = loop.time() - start
    return len(lat), elapsed, lat


def _with_hbh(msg: bytes, hbh: int) -> bytes:
    return msg[:12] + U32.pack(hbh) + msg[16:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32, help="ECRs per write")
    ap.add_argument("--depth", type=int, default=2, help="batches in flight per connection")
    ap.add_argument("--pin", action="store_true",
                    help="pin the server to CPU 0 and this client to CPU 1")
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
    if args.pin and proc:
        os.sched_setaffinity(proc.pid, {0})
        os.sched_setaffinity(0, {1})
    n, elapsed, lat = asyncio.run(drive(host, port, args.connections, args.batch, args.depth,
                                        args.seconds, args.realm))
    cpu1 = cpu_seconds(proc.pid) if proc else 0.0
    if proc:
        proc.terminate()
        proc.wait(15)
    lat.sort()
    rate = n / elapsed
    print(f"{'connections x in flight':<28}{args.connections} x {args.batch * args.depth}")
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

"""ECR latency at a fixed, moderate S13 rate before, during and after a full register sync.

    .venv/bin/python benchmarks/bench_ecr_during_sync.py --imeis 10000000 --rate 5000

Starts a private redis-server, syncs an initial register (`--initial` rows), starts
`eir-server serve --store redis://...`, and drives ECRs at `--rate` per second (open loop: a
timer writes what is due every millisecond, whatever the answers do) over `--connections`
connections. After `--before` seconds it runs `eir-server sync --force-full` of an `--imeis`-row
register as a separate process, keeps the load on while it runs, and `--after` seconds more.
Latency is from writing an ECR to reading its ECA. IMEIs are a mix of the initial register, the
new register and unlisted ones, so answers move from cached to fetched and the verdicts change
when the new version is switched in.

Prints per phase: answered ECR/s, p50/p99/p99.9/max latency, blacklisted share, errors, and how
late the sending timer ran (a late timer means the client itself was starved of CPU).
Everything runs on the same machine: server, Redis, sync and this client share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_s13_load import cer  # noqa: E402
from bench_sync_load import make_zip, start_redis  # noqa: E402

from eir_server.diameter.codec import (  # noqa: E402
    FLAG_P,
    FLAG_R,
    grouped_avp,
    message,
    str_avp,
    u32_avp,
)

U32 = struct.Struct("!I")
AVP_HEAD = struct.Struct("!II")
EXE = ROOT / ".venv/bin/eir-server"
VENDOR_3GPP = 10415
STATUS_NAMES = {0: "white", 1: "black", 2: "grey"}


def ecr_template(conn: int, n: int, imei: str, realm: str) -> bytes:
    imsi = "00101" + imei[4:14]  # one subscriber per device
    return message(FLAG_R | FLAG_P, 324, 16777252, 0, 0, [
        str_avp(263, f"mme{conn}.bench;{n};1"), u32_avp(277, 1), str_avp(264, f"mme{conn}.bench"),
        str_avp(296, "bench"), str_avp(283, realm),
        grouped_avp(1401, [str_avp(1402, imei, VENDOR_3GPP), str_avp(1403, "01", VENDOR_3GPP)],
                    VENDOR_3GPP),
        str_avp(1, imsi),
    ])  # fmt: skip


def answer_status(msg: bytes) -> tuple[int, int]:
    """(Result-Code or Experimental-Result-Code, Equipment-Status or -1) of an ECA."""
    pos, end = 20, len(msg)
    code, status = 0, -1
    while pos + 8 <= end:
        c, fl = AVP_HEAD.unpack_from(msg, pos)
        length = fl & 0xFFFFFF
        hlen = 12 if fl >> 24 & 0x80 else 8
        if length < hlen:
            break
        if c == 268:
            code = U32.unpack_from(msg, pos + hlen)[0]
        elif c == 297:  # Experimental-Result: find its code inside
            inner = answer_status(b"\0" * 20 + msg[pos + hlen : pos + length])
            code = code or inner[0]
        elif c == 298:
            code = U32.unpack_from(msg, pos + hlen)[0]
        elif c == 1445:
            status = U32.unpack_from(msg, pos + hlen)[0]
        pos += (length + 3) & ~3
    return code, status


@dataclass
class Phase:
    name: str
    start: float
    end: float = 0.0
    lat: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0


class Conn(asyncio.Protocol):
    def __init__(self, idx: int, sent: dict[int, float], on_answer) -> None:  # noqa: ANN001
        self.idx = idx
        self.sent = sent
        self.on_answer = on_answer
        self.buf = b""
        self.ready = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(cer(self.idx))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self.buf + data if self.buf else data
        pos, n = 0, len(buf)
        while n - pos >= 20:
            length = U32.unpack_from(buf, pos)[0] & 0xFFFFFF
            if n - pos < length:
                break
            code = U32.unpack_from(buf, pos + 4)[0] & 0xFFFFFF
            if code == 324:
                hbh = U32.unpack_from(buf, pos + 12)[0]
                t0 = self.sent.pop(hbh, None)
                if t0 is not None:
                    self.on_answer(t0, now, buf[pos : pos + length])
            elif code == 257 and not self.ready.done():
                self.ready.set_result(None)
            pos += length
        self.buf = buf[pos:]


def pct(v: list[float], p: float) -> float:
    return v[min(len(v) - 1, int(p / 100 * len(v)))] * 1e3 if v else float("nan")


async def run(args: argparse.Namespace, url: str, src_full: Path, imeis: list[str]) -> None:
    loop = asyncio.get_running_loop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = subprocess.Popen([
        str(EXE), "serve", "--diameter-listen", f"127.0.0.1:{port}", "--metrics-listen", "",
        "--log-level", "warning", "--store", url,
    ])  # fmt: skip
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        sent: dict[int, float] = {}
        phases: list[Phase] = []
        timeline: list[tuple[float, float]] = []

        def on_answer(t0: float, now: float, msg: bytes) -> None:
            ph = phases[-1]
            for p in reversed(phases):  # by send time: a request belongs to when it was sent
                if t0 >= p.start:
                    ph = p
                    break
            ph.lat.append(now - t0)
            timeline.append((t0, now - t0))
            code, status = answer_status(msg)
            if code != 2001:
                ph.errors += 1
            ph.statuses[status] = ph.statuses.get(status, 0) + 1

        conns = []
        for c in range(args.connections):
            _, proto = await loop.create_connection(
                lambda c=c: Conn(c, sent, on_answer), "127.0.0.1", port
            )
            await asyncio.wait_for(proto.ready, 10)
            conns.append(proto)
        templates = [
            ecr_template(i % args.connections, i, imei, args.realm) for i, imei in enumerate(imeis)
        ]
        hbh = 0
        late: list[float] = []
        stop = False

        async def sender() -> None:
            nonlocal hbh
            start = time.perf_counter()
            due_at = start
            while not stop:
                now = time.perf_counter()
                late.append(now - due_at)
                due = int((now - start) * args.rate) - hbh
                for _ in range(due):
                    hbh += 1
                    tpl = templates[hbh % len(templates)]
                    ids = U32.pack(hbh)
                    conns[hbh % len(conns)].t.write(tpl[:12] + ids + ids + tpl[20:])
                    sent[hbh] = now
                due_at = now + 0.001
                await asyncio.sleep(0.001)

        task = asyncio.create_task(sender())
        phases.append(Phase("warm-up", time.perf_counter()))
        await asyncio.sleep(2)
        phases.append(Phase("before sync", time.perf_counter()))
        await asyncio.sleep(args.before)
        t_sync = time.perf_counter()
        phases.append(Phase("during sync", t_sync))
        sync = await asyncio.create_subprocess_exec(
            *(["nice", "-n", str(args.sync_nice)] if args.sync_nice else []),
            str(EXE), "sync", "--source", str(src_full), "--store", url, "--once",
            "--force-full", "--grace", "0", "--progress", "never",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        rc = await sync.wait()
        sync_s = time.perf_counter() - t_sync
        phases.append(Phase("after sync", time.perf_counter()))
        await asyncio.sleep(args.after)
        stop = True
        await task
        end = time.perf_counter()
        await asyncio.sleep(1)  # last answers
        for i, p in enumerate(phases):
            p.end = phases[i + 1].start if i + 1 < len(phases) else end
        print(f"\nsync: exit {rc}, {args.imeis:,} rows in {sync_s:.1f} s "
              f"({args.imeis / sync_s:,.0f} rows/s) under {args.rate:,} ECR/s")  # fmt: skip
        print(f"unanswered ECRs: {len(sent)}; sender timer lateness p99 "
              f"{pct(sorted(late), 99):.2f} ms, max {max(late) * 1e3:.1f} ms\n")  # fmt: skip
        hdr = f"{'phase':<12} {'s':>5} {'ECA/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8} "
        print(hdr + f"{'max ms':>7} {'black':>6} {'errors':>6}")
        for p in phases[1:]:
            lat = sorted(p.lat)
            n = len(lat)
            dur = p.end - p.start
            black = p.statuses.get(1, 0) / max(n, 1)
            print(
                f"{p.name:<12} {dur:>5.1f} {n / dur:>7,.0f} {pct(lat, 50):>7.2f} "
                f"{pct(lat, 99):>7.2f} {pct(lat, 99.9):>8.2f} {max(lat, default=0) * 1e3:>7.1f} "
                f"{black:>6.1%} {p.errors:>6}"
            )
        if args.timeline:
            print(f"\n{'t s':>6} {'phase':<12} {'n':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")
            t_first = phases[1].start
            buckets: dict[int, list[float]] = {}
            for t0, lat_s in timeline:
                if t0 >= t_first:
                    buckets.setdefault(int((t0 - t_first) / args.timeline), []).append(lat_s)
            for b, v in sorted(buckets.items()):
                v.sort()
                t = t_first + b * args.timeline
                name = next(p.name for p in reversed(phases) if t >= p.start)
                print(
                    f"{b * args.timeline:>6.1f} {name:<12} {len(v):>6} {pct(v, 50):>7.2f} "
                    f"{pct(v, 99):>7.2f} {v[-1] * 1e3:>7.1f}"
                )
        for c in conns:
            c.t.close()
    finally:
        serve.terminate()
        serve.wait(15)


def sample_imeis(src: Path, n: int, rnd: random.Random) -> list[str]:
    """The first `n` IMEIs (14 digits) of a generated register zip."""
    z = next(src.glob("*_blacklist.zip"))
    out = []
    with zipfile.ZipFile(z) as zf, zf.open(z.name.replace(".zip", ".csv")) as f:
        f.readline()
        while len(out) < n:
            line = f.readline()
            if not line:
                break
            out.append(line.split(b",", 1)[0][:14].decode())
    rnd.shuffle(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--imeis", type=int, default=10_000_000, help="rows of the synced register")
    ap.add_argument("--initial", type=int, default=100_000, help="rows of the initial register")
    ap.add_argument("--rate", type=int, default=5000, help="ECRs per second (open loop)")
    ap.add_argument("--connections", type=int, default=2)
    ap.add_argument("--before", type=float, default=10.0, help="seconds measured before the sync")
    ap.add_argument("--after", type=float, default=5.0, help="seconds measured after it")
    ap.add_argument("--distinct", type=int, default=60_000, help="distinct IMEIs queried")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sync-nice", type=int, default=0, help="run the sync under nice -n N")
    ap.add_argument(
        "--timeline", type=float, default=0, metavar="S", help="also print latency per S seconds"
    )
    ap.add_argument("--realm", default="localdomain")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "eir-bench"))
    a = ap.parse_args()
    work = Path(a.workdir)
    src_full = make_zip(work, a.imeis, a.seed)
    src_init = make_zip(work, a.initial, a.seed + 100)
    rnd = random.Random(a.seed)
    third = a.distinct // 3
    imeis = sample_imeis(src_init, third, rnd) + sample_imeis(src_full, third, rnd)
    imeis += [f"{rnd.randrange(10**13, 10**14)}" for _ in range(a.distinct - len(imeis))]
    rnd.shuffle(imeis)
    tmp = Path(tempfile.mkdtemp(prefix="eir-bench-redis-"))
    proc, port = start_redis(tmp)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        subprocess.run(
            [str(EXE), "sync", "--source", str(src_init), "--store", url, "--once",
             "--grace", "0", "--progress", "never"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        print(f"cores: {os.cpu_count()}; initial register {a.initial:,} rows; "
              f"{a.distinct:,} distinct IMEIs (1/3 initial, 1/3 new register, 1/3 unlisted)")  # fmt: skip
        asyncio.run(run(a, url, src_full, imeis))
    finally:
        proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

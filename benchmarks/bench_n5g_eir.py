"""N5g-eir load with h2load (nghttp2-client): HTTP/2 with prior knowledge against a real
`eir-server serve --http-listen` (one worker), and the server's CPU time per answer
(utime+stime from /proc). Not a test: numbers go in the README.

    .venv/bin/python benchmarks/bench_n5g_eir.py --pin                      # embedded store
    .venv/bin/python benchmarks/bench_n5g_eir.py --pin --store redis        # Redis, warm cache
    .venv/bin/python benchmarks/bench_n5g_eir.py --pin --app trivial        # the HTTP server alone

--app trivial serves a constant answer from the same HTTP/2 server on a uvloop loop: the floor
that the verdict path adds to. h2load needs `apt-get install
nghttp2-client`; --store redis needs redis-server.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eir_server.policy.imei import luhn_check_digit  # noqa: E402

PATH = "/n5g-eir-eic/v1/equipment-status"
TRIVIAL = """
import asyncio, os, signal, sys, time, uvloop
from eir_server.io.http_server import HttpListener
from eir_server.n5g_eir.app import Response
from eir_server.obs.metrics import Metrics

class Constant:
    metrics = Metrics()
    clock = time.monotonic
    answer = Response(200, [("content-type", "application/json")],
                      b'{"status":"WHITELISTED"}', "200")

    def request(self, *args):
        return self.answer

    def observe_latency(self, seconds):
        pass

async def main():
    listener = HttpListener(Constant(), "127.0.0.1", int(sys.argv[1]))
    await listener.start()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: os._exit(0))
    await asyncio.Event().wait()

uvloop.run(main())
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of the event-loop thread, of all other threads: the store client's and
    the metrics server's)."""
    main = other = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            t = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            if int(tid) == pid:
                main += t
            else:
                other += t
    return main, other


def wait_port(port: int, proc: subprocess.Popen) -> None:
    import socket
    end = time.monotonic() + 30
    while time.monotonic() < end:
        assert proc.poll() is None, "server exited"
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listening on {port}")


def register(d: Path, n: int) -> list[str]:
    """n blacklisted IMEIs (every 3rd IMEI asked is listed) as a DIRBS blacklist CSV."""
    rows = [f"{35209900000000 + i * 3:014d}" for i in range(n)]
    (d / "20260101_000000_blacklist.csv").write_text(
        "imei,block_date,reasons\n" + "".join(f"{r},20200101,stolen\n" for r in rows))
    return rows


def uris(port: int, n: int) -> list[str]:
    out = []
    for i in range(n):
        imei = f"{35209900000000 + i:014d}"
        out.append(f"http://127.0.0.1:{port}{PATH}?pei=imei-{imei}{luhn_check_digit(imei)}"
                   f"&supi=imsi-00101{imei[4:]}")
    return out


def h2load(urls: list[str], n: int, clients: int, streams: int, cpu: int | None) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(urls) + "\n")
    cmd = ["h2load", "-n", str(n), "-c", str(clients), "-m", str(streams), "-t", "1",
           "-i", f.name]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--app", choices=("eir", "trivial"), default="eir")
    ap.add_argument("--store", choices=("memory", "redis"), default="memory")
    ap.add_argument("--requests", type=int, default=300_000)
    ap.add_argument("--clients", type=int, default=4, help="h2load connections")
    ap.add_argument("--streams", type=int, default=32, help="concurrent streams per connection")
    ap.add_argument("--imeis", type=int, default=10_000, help="distinct IMEIs asked")
    ap.add_argument("--pin", action="store_true", help="the server's event-loop thread on CPU 0 "
                    "h2load on CPU 1")
    ap.add_argument("--rounds", type=int, default=3, help="measured runs (best is reported)")
    ap.add_argument("--server-args", default="", help="extra `serve` options, e.g. "
                    "'--device-signals off'")
    args = ap.parse_args()
    if not shutil.which("h2load"):
        raise SystemExit("h2load not found: apt-get install nghttp2-client")
    port = 18080 + os.getpid() % 1000
    work = Path(tempfile.mkdtemp(prefix="bench-n5g-"))
    redis = None
    if args.app == "trivial":
        cmd = [sys.executable, "-c", TRIVIAL, str(port)]
    else:
        reg = work / "reg"
        reg.mkdir()
        register(reg, args.imeis // 3 + 1)
        store = ["--register", str(reg)]
        if args.store == "redis":
            rport = port + 1000
            redis = subprocess.Popen(["redis-server", "--port", str(rport), "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL)
            time.sleep(0.5)
            url = f"redis://127.0.0.1:{rport}/0"
            # sync reads DIRBS zips (the embedded store above also takes the bare CSV).
            src = work / "src"
            src.mkdir()
            with zipfile.ZipFile(src / "20260101_000000_blacklist.zip", "w") as zf:
                zf.write(reg / "20260101_000000_blacklist.csv", "20260101_000000_blacklist.csv")
            r = subprocess.run([sys.executable, "-m", "eir_server.cli", "sync", "--source",
                                str(src), "--store", url, "--once", "--progress", "never"],
                               check=True, capture_output=True, text=True)
            assert '"mode": "full"' in r.stderr + r.stdout, r.stderr  # not a no-op
            store = ["--store", url]
        cmd = [sys.executable, "-m", "eir_server.cli", "serve", *store,
               "--diameter-listen", f"127.0.0.1:{port + 2000}", "--metrics-listen", "",
               "--http-listen", f"127.0.0.1:{port}", "--log-level", "warning",
               *args.server_args.split()]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        wait_port(port, proc)
        if args.pin:
            os.sched_setaffinity(proc.pid, {0})
        urls = uris(port, args.imeis)
        # Warm-up: every IMEI at least once (fills the local cache in front of Redis). Each
        # h2load client walks the URI list from its start, so every client must get through
        # all of it: with one pass shared by 4 clients, half the IMEIs stayed cold.
        h2load(urls, max(args.imeis, 20_000) * args.clients, args.clients, args.streams,
               1 if args.pin else None)
        best = None
        for _ in range(args.rounds):
            c0 = cpu_seconds(proc.pid)
            m0, o0 = thread_cpu(proc.pid)
            out = h2load(urls, args.requests, args.clients, args.streams,
                         1 if args.pin else None)
            cpu = cpu_seconds(proc.pid) - c0
            m1, o1 = thread_cpu(proc.pid)
            m = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", out)
            ok = re.search(r"status codes: (\d+) 2xx, \d+ 3xx, (\d+) 4xx, (\d+) 5xx", out)
            assert m and ok, out
            assert int(ok.group(3)) == 0, out
            rate = float(m.group(2))
            us = cpu / args.requests * 1e6
            mus = (m1 - m0) / args.requests * 1e6
            ous = (o1 - o0) / args.requests * 1e6
            print(f"  {rate:,.0f} req/s, server CPU {us:.1f} us/request: loop thread {mus:.1f}, "
                  f"other threads {ous:.1f} ({ok.group(1)} 2xx, {ok.group(2)} 4xx)")
            if best is None or rate > best[0]:
                best = (rate, us, mus, ous)
        assert best is not None
        print(f"{args.app} store={args.store if args.app == 'eir' else '-'} "
              f"clients={args.clients} streams={args.streams}: best {best[0]:,.0f} req/s, "
              f"{best[1]:.1f} us CPU/request (loop thread {best[2]:.1f}, other threads "
              f"{best[3]:.1f}; load {os.getloadavg()[0]:.1f})")
    finally:
        proc.terminate()
        proc.wait(30)
        if redis is not None:
            redis.terminate()
            redis.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

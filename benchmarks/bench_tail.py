"""Latency tail of one worker in open loop, measured twice: by `eir-server load` (from each
request's scheduled send time, so the generator's own lag counts) and from packet timestamps on
the loopback interface (dumpcap; `wire_latency.py`), which is the server's own latency.

    .venv/bin/python benchmarks/bench_tail.py --rate 20000 --duration 30 [--store redis|...]
        [--imeis 1000000] [--pacing tick|exact] [--json OUT]

The worker is pinned to CPU 0 and the generator to CPU 1. `--store redis` starts a
redis-server, syncs a generated register into it and sends IMEIs that are new to the worker
(every lookup a cache miss); `--store redis-snapshot` is the same with the node's register
snapshot (`--store-snapshot-dir`), which then answers those misses; `--store otp` measures the
Erlang/OTP reference EIR the same way. Before the run a busy loop on each CPU counts the
stalls the platform itself causes (a VM's steal time, interrupts): no server's tail can be
below them. dumpcap needs root (or capture rights).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.suite import ENV, EXE, HOST, Redis, Server, _await_snapshot, sync  # noqa: E402
from benchmarks.wire_latency import analyse  # noqa: E402

SERVER_CPU, GENERATOR_CPU = 0, 1


def capture(port: int, out: Path) -> subprocess.Popen[bytes]:
    dumpcap = shutil.which("dumpcap")
    if dumpcap is None:
        raise SystemExit("dumpcap not found (Debian: wireshark-common, or tshark)")
    # -B: a 256 MiB kernel buffer, so that a burst is not dropped while dumpcap is descheduled.
    # On the generator's CPU: left to float, it took ~4 ms a second of the server's CPU, in runs
    # of ~0.2 ms (perf sched), and measured its own intrusion as the server's latency.
    cmd = [dumpcap, "-q", "-P", "-i", "lo", "-B", "256", "-s", "0", "-f", f"tcp port {port}",
           "-w", str(out)]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", str(GENERATOR_CPU), *cmd]
    p = subprocess.Popen(cmd,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not (out.exists() and out.stat().st_size >= 24):  # the pcap header: capture is on
        if p.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"dumpcap did not start: {p.stderr.read().decode()[-500:]}"
                             if p.stderr else "dumpcap did not start")
        time.sleep(0.05)
    return p


def platform_stalls(seconds: float = 3.0) -> dict[str, float]:
    """The floor under any tail here: a busy loop on each CPU, nothing else running, counting
    the gaps the hypervisor and the kernel take from it (a VM's steal, interrupts).

    `share_over_*ms`: of requests arriving at an even rate on the server's CPU (0), the share
    that such gaps alone hold up longer than that (a gap of g delays the arrivals of its first
    g - x seconds by more than x). No server measured here can have fewer answers over 1 ms
    than that share: above 0.1%, a p99.9 of 1 ms cannot be shown on this machine then."""
    code = ("import os,sys,time\n"
            "os.sched_setaffinity(0,{int(sys.argv[1])})\n"
            "d=float(sys.argv[2]);t0=last=time.perf_counter();n1=0;mx=0.0;w5=0.0;w1=0.0\n"
            "while last-t0<d:\n"
            " now=time.perf_counter();g=now-last;last=now\n"
            " if g>0.0005:\n"
            "  w5+=g-0.0005\n"
            "  if g>0.001: n1+=1;w1+=g-0.001\n"
            "  if g>mx: mx=g\n"
            "print(n1/d,mx*1000,w5/d,w1/d)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(cpu), str(seconds)],
                              stdout=subprocess.PIPE, text=True)
             for cpu in (SERVER_CPU, GENERATOR_CPU)]
    per_s, worst = 0.0, 0.0
    shares: list[tuple[float, float]] = []
    for p in procs:
        out, _ = p.communicate(timeout=seconds + 30)
        a, b, c, d = out.split()
        per_s, worst = per_s + float(a) / len(procs), max(worst, float(b))
        shares.append((float(c), float(d)))
    return {"stalls_over_1ms_per_s_per_cpu": round(per_s, 1), "worst_stall_ms": round(worst, 2),
            "share_over_0.5ms": round(shares[0][0], 5), "share_over_1ms": round(shares[0][1], 5)}


class _Otp:
    """The Erlang/OTP diameter EIR of bench_otp_baseline.py (a fixed answer), as a reference
    for what this machine allows."""

    def __init__(self, work: Path) -> None:
        from benchmarks import bench_otp_baseline as otp
        from benchmarks.suite import free_port
        ebin = work / "otp"
        ebin.mkdir()
        otp.compile_otp(ebin)
        self.srv = otp.OtpServer(ebin, HOST, free_port(), SERVER_CPU, "1:1", [], True)
        self.port = self.srv.port

    def cpu(self) -> float:
        from benchmarks.suite import tree_cpu
        return tree_cpu(self.srv.pid)

    def stop(self) -> None:
        self.srv.stop()


def run(rate: int, duration: float, store: str, imeis: int, work: Path,
        extra: list[str], pacing: str = "tick") -> dict[str, Any]:
    redis = None
    args = ["--workers", "1", *extra]
    sent = "range:35209900000000:2000"
    snapdir = None
    if store in ("redis", "redis-snapshot"):
        from benchmarks.bench_sync_load import make_zip
        redis = Redis(work)
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON report
            src = Path(make_zip(work / "registers", imeis, 1))
        sync(redis.url, src)
        args += ["--store", redis.url]
        if store == "redis-snapshot":  # misses answered by the node's register snapshot
            snapdir = Path(tempfile.mkdtemp(prefix="snap-", dir=work))
            args += ["--store-snapshot-dir", str(snapdir)]
        # More IMEIs than the run sends, each new: every lookup misses the worker's cache.
        sent = f"range:35210000000000:{int(rate * (duration + 2)) + 1}"
    server: Server | _Otp = _Otp(work) if store == "otp" else Server(*args, cpu=SERVER_CPU)
    pcap = work / "tail.pcap"
    try:
        if snapdir is not None and isinstance(server, Server):
            _await_snapshot(snapdir, server)
        cap = capture(server.port, pcap)
        report = work / "load.json"
        cmd = [EXE, "load", "--target", f"{HOST}:{server.port}", "--progress", "off",
               "--json", str(report), "--rate", str(rate), "--duration", str(duration),
               "--warmup", "0", "--connections", "4", "--imeis", sent, "--pin", str(GENERATOR_CPU),
               "--pacing", pacing]
        cpu0 = server.cpu()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120, env=ENV)
        cpu = server.cpu() - cpu0
        time.sleep(0.5)
        cap.send_signal(signal.SIGINT)
        cap.wait(30)
        r = json.loads(report.read_text())
        if p.returncode not in (0, 4):
            raise SystemExit(f"eir-server load exit {p.returncode}: {r.get('exit_reason')}")
    finally:
        server.stop()
        if redis is not None:
            redis.stop()
    w = analyse(pcap, server.port)
    pcap.unlink()
    lat = r["latency_ms"]
    worst = sorted(w.per_second.items(), key=lambda kv: -max(kv[1]))[:5]
    return {
        "server": "Erlang/OTP diameter, fixed answer" if store == "otp" else "eir-server",
        "rate": rate, "pacing": pacing, "store": store, "answers": r["answers"],
        "timeouts": r["timeouts"],
        # the server's CPU covers the warm-up too
        "server_cpu_us": cpu / max(r["answers"] + r["warmup_answers"], 1) * 1e6,
        "generator": {k: lat[k] for k in ("p50", "p99", "p99.9", "max") if k in lat}
        | {"late_ms": r.get("generator", {}).get("open_loop_max_lag_ms")},
        "wire": w.summary(),
        "wire_worst_seconds": [(s, round(max(v) / 1000, 2)) for s, v in worst],
        # [start (wall clock, s), length (ms)] of the first 500 stalls over 1 ms: a period
        # between them, or what a profiler of the server's CPU saw then (docs/operations.md)
        "server_stalls": [[round(t, 6), round(ms, 2)] for t, ms in
                          zip(w.server_stall_at[:500], w.server_stalls_ms[:500], strict=True)],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=int, default=20000)
    ap.add_argument("--duration", type=float, default=30)
    ap.add_argument("--store", choices=("memory", "redis", "redis-snapshot", "otp"),
                    default="memory",
                    help="otp: the Erlang/OTP reference EIR instead of eir-server; "
                    "redis-snapshot: Redis with the register snapshot")
    ap.add_argument("--imeis", type=int, default=1_000_000, help="register rows (redis)")
    ap.add_argument("--pacing", choices=("tick", "exact"), default="tick",
                    help="the generator's open loop (eir-server load --pacing): tick sends each "
                    "1 ms what is due in one write, exact each request at its time")
    ap.add_argument("--json", type=Path)
    ap.add_argument("serve_args", nargs="*", help="after --: extra `eir-server serve` options")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("note: dumpcap needs root or capture rights", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="eir-tail-") as d:
        floor = platform_stalls()
        res = run(a.rate, a.duration, a.store, a.imeis, Path(d), a.serve_args, a.pacing)
        res["platform"] = floor
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

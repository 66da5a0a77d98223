"""Memory per worker with every cache full: what to size a node's memory limit for.

A worker after little traffic holds its code, heap and the register snapshot's pages; under a
busy hour of distinct devices each of its caches (device signals, duplicate cache, the store's
caches) grows to its bound. This starts a redis-server, syncs a generated register into it,
starts the real `eir-server serve --workers N` with the node's register snapshot, drives it
with `eir-server load` in closed loop over IMEIs none of its caches hold, and reads
/proc/PID/smaps_rollup of every worker every few seconds until the load ends (MiB):

    .venv/bin/python benchmarks/bench_worker_caches.py --imeis 10000000 --duration 60
    # what one cache costs: run again without it
    .venv/bin/python benchmarks/bench_worker_caches.py ... -- --device-signals off

Each worker's private memory levels off once its caches are full (~45 s here at ~80k new
devices per second per worker); the last sample is the figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_store_memory import children, smaps  # noqa: E402
from benchmarks.bench_sync_load import make_zip  # noqa: E402
from benchmarks.suite import ENV, EXE, HOST, Redis, Server, _await_snapshot, sync  # noqa: E402

MIB = 1 << 20


def sample(pid: int) -> dict[str, int]:
    m = smaps(pid)
    return {"rss": m["Rss"] // MIB, "private_dirty": m["Private_Dirty"] // MIB,
            "shared_clean": m["Shared_Clean"] // MIB, "pss": m["Pss"] // MIB}


def run(imeis: int, workers: int, duration: float, every: float, workdir: Path,
        extra: list[str]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="caches-", dir=workdir))
    src = make_zip(workdir, imeis, 1)
    redis = Redis(work)
    server = None
    try:
        sync(redis.url, src)
        snapdir = work / "snapshot"
        snapdir.mkdir()
        server = Server("--workers", str(workers), "--store", redis.url,
                        "--store-snapshot-dir", str(snapdir), *extra)
        _await_snapshot(snapdir, server, timeout=600)
        pids = children(server.proc.pid)
        start = {p: sample(p) for p in pids}
        report = work / "load.json"
        # IMEIs outside the register's range and more than every cache holds: each ECR is a new
        # device to the worker that answers it.
        load = subprocess.Popen([EXE, "load", "--target", f"{HOST}:{server.port}",
                                 "--progress", "off", "--duration", str(duration), "--warmup",
                                 "0", "--connections", str(2 * workers),
                                 "--imeis", "range:35300000000000:5000000",
                                 "--json", str(report)], env=ENV, stdout=subprocess.DEVNULL)
        t0, samples = time.monotonic(), []
        while load.poll() is None:
            time.sleep(every)
            row = {"s": round(time.monotonic() - t0), "workers": [sample(p) for p in pids]}
            samples.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)  # progress
        if load.returncode != 0:
            raise SystemExit(f"eir-server load exit {load.returncode}")
        answers = json.loads(report.read_text())["answers"]
        return {"imeis": imeis, "workers": workers, "serve_args": extra, "answers": answers,
                "at_start": list(start.values()), "at_end": samples[-1]["workers"],
                "parent": sample(server.proc.pid), "samples": samples}
    finally:
        if server is not None:
            server.stop()
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)  # the snapshot file: ~14 bytes per IMEI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--imeis", type=int, default=10_000_000, help="register rows")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "eir-bench")
    ap.add_argument("--json", type=Path)
    ap.add_argument("serve_args", nargs="*", help="after --: extra `eir-server serve` options")
    a = ap.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    res = run(a.imeis, a.workers, a.duration, a.every, a.workdir, a.serve_args)
    text = json.dumps({k: v for k, v in res.items() if k != "samples"}, indent=1)
    print(text)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Store cost of an uncached lookup, worker CPU per lookup (process time, so other load on the
machine inflates it less than wall time): the Redis round-trip path (coalesced fetches, N in
flight) against the memory-mapped register snapshot (`snapshot_dir`), alternating A/B.

    .venv/bin/python benchmarks/bench_miss_path.py --imeis 1000000 [--url redis://...]

Without --url it starts its own redis-server and syncs the generated register of
bench_sync_load.py into it. With a Cluster URL it measures the Cluster pipeline path.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_sync_load import make_zip, start_redis  # noqa: E402

from eir_server.store import MISSING, open_store  # noqa: E402


async def redis_path(url: str, imeis: list[str], inflight: int) -> float:
    s = open_store(url, cache_size=10)
    await s.start()
    try:
        await asyncio.gather(*(s.fetch(i) for i in imeis[:inflight]))  # connections up
        cpu = time.process_time()
        for lo in range(0, len(imeis), inflight):
            s._cache.clear()
            await asyncio.gather(*(s.fetch(i) for i in imeis[lo:lo + inflight]))
        return (time.process_time() - cpu) / len(imeis)
    finally:
        await s.close()


async def snapshot_path(url: str, imeis: list[str], snapdir: str) -> float:
    s = open_store(url, cache_size=10, snapshot_dir=snapdir)
    await s.start()
    try:
        while s._state.snap is None:  # built once, then mapped by every run
            await asyncio.sleep(0.1)
        get = s.get_nowait
        cpu = time.process_time()
        for i in imeis:
            if get(i) is MISSING:
                await s.fetch(i)
        return (time.process_time() - cpu) / len(imeis)
    finally:
        await s.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--imeis", type=int, default=1_000_000, help="register size")
    ap.add_argument("--lookups", type=int, default=100_000)
    ap.add_argument("--url", help="a Redis already holding a register (default: start one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "eir-bench"))
    a = ap.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    proc = None
    url = a.url
    if url is None:
        work = Path(a.workdir)
        src = make_zip(work, a.imeis, 1)
        proc, port = start_redis(Path(tempfile.mkdtemp()))
        url = f"redis://127.0.0.1:{port}/0"
        subprocess.run([str(ROOT / ".venv/bin/eir-server"), "sync", "--source", str(src),
                        "--store", url, "--once", "--progress", "never"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rnd = random.Random(5)
    imeis = [f"{rnd.randrange(35209900000000, 35209900000000 + 5 * a.imeis)}"
             for _ in range(a.lookups)]
    snapdir = tempfile.mkdtemp(prefix="eir-snap-")
    try:
        rows = []
        for r in range(a.rounds):
            for inflight in (256, 32):
                t = asyncio.run(redis_path(url, imeis, inflight))
                rows.append((r, f"redis, {inflight} in flight", t))
            t = asyncio.run(snapshot_path(url, imeis, snapdir))
            rows.append((r, "snapshot", t))
        for r, what, t in rows:
            print(f"round {r}  {what:<24} {t * 1e6:6.2f} µs CPU per uncached lookup")
    finally:
        if proc is not None:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())

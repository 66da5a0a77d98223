"""RedisStore hot path: cached get_nowait, coalesced fetch throughput/latency, and fetch latency
while a full sync load runs against the same Redis.

    .venv/bin/python benchmarks/bench_store_redis.py --imeis 1000000
    .venv/bin/python benchmarks/bench_store_redis.py --imeis 1000000 --during-load

Starts its own redis-server; the register is the generated blacklist of bench_sync_load.py.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sync_load import make_zip, start_redis  # noqa: E402

from eir_server.store import MISSING, open_store  # noqa: E402
from eir_server.store.urls import parse_store_url  # noqa: E402
from eir_server.sync.engine import SyncOptions, run_once  # noqa: E402
from eir_server.sync.redis_db import RegisterDB  # noqa: E402
from eir_server.sync.source import DirSource  # noqa: E402


def listed_sample(src: Path, n: int) -> list[str]:
    import zipfile

    with (
        zipfile.ZipFile(src / "20240101_000000_blacklist.zip") as zf,
        zf.open("20240101_000000_blacklist.csv") as f,
    ):
        f.readline()
        return [f.readline().decode().split(",")[0][:14] for _ in range(n)]


async def fetch_load(
    store, imeis: list[str], concurrency: int, seconds: float, seed: int = 3
) -> tuple[int, list[float], float]:
    """`concurrency` tasks each fetching in a loop (cache bypassed by random unseen IMEIs)."""
    lat: list[float] = []
    done = 0
    stop = time.monotonic() + seconds
    rnd = random.Random(seed)  # a new seed per phase, so earlier phases did not warm the cache

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop:
            imei = (
                imeis[rnd.randrange(len(imeis))]
                if rnd.random() < 0.1
                else f"{rnd.randrange(10**13, 10**14)}"
            )
            t = time.perf_counter()
            r = store.get_nowait(imei)
            if r is MISSING:
                await store.fetch(imei)
            lat.append(time.perf_counter() - t)
            done += 1

    cpu = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done, lat, time.process_time() - cpu


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] * 1e6


async def main_async(a: argparse.Namespace, url: str, src: Path) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    sample = listed_sample(src, 10000)
    store = open_store(url, cache_size=a.cache_size)
    await store.start()
    # Cached path
    for i in sample[:1000]:
        await store.fetch(i)
    imei = sample[0]
    n = 1_000_000
    t = timeit.timeit(lambda: store.get_nowait(imei), number=n) / n
    rows.append(("get_nowait cached (ns)", f"{t * 1e9:.0f}"))
    t = timeit.timeit(lambda: store.get_nowait("99999999999999"), number=n) / n
    rows.append(("get_nowait miss (ns)", f"{t * 1e9:.0f}"))
    # Uncached path: mostly unlisted random IMEIs, as in live traffic
    done, lat, cpu = await fetch_load(store, sample, a.concurrency, a.seconds)
    rows += [
        ("fetch concurrency", str(a.concurrency)),
        ("fetches/s (uncached)", f"{done / a.seconds:,.0f}"),
        ("client CPU per fetch (us)", f"{cpu / done * 1e6:.1f}"),
        (
            "keys per round trip",
            f"{store.stats.fetch_keys / max(store.stats.fetch_batches, 1):.1f}",
        ),
        ("fetch p50 / p99 (us)", f"{pct(lat, 0.5):.0f} / {pct(lat, 0.99):.0f}"),
    ]
    if a.during_load:
        cmd = [
            sys.executable,
            str(Path(__file__).parent / "bench_store_redis.py"),
            "--sync-only",
            url,
            str(src),
        ]
        proc = subprocess.Popen(cmd)
        await asyncio.sleep(1.0)  # let the load get going
        done, lat, cpu = await fetch_load(store, sample, a.concurrency, a.seconds, seed=4)
        proc.wait()
        rows += [
            ("during full load: fetches/s", f"{done / a.seconds:,.0f}"),
            ("during full load: p50 / p99 (us)", f"{pct(lat, 0.5):.0f} / {pct(lat, 0.99):.0f}"),
            ("during full load: max (us)", f"{max(lat) * 1e6:.0f}"),
            ("redis errors", str(store.stats.redis_errors)),
        ]
    await store.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--imeis", type=int, default=1_000_000)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--cache-size", type=int, default=1_000_000)
    ap.add_argument(
        "--during-load", action="store_true", help="also measure while a full load runs"
    )
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "eir-bench"))
    ap.add_argument("--sync-only", nargs=2, metavar=("URL", "SRC"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.sync_only:
        url, src = a.sync_only
        run_once(
            DirSource(src), RegisterDB(parse_store_url(url)), SyncOptions(grace=0, force_full=True)
        )
        return
    src = make_zip(Path(a.workdir), a.imeis, 1)
    tmp = Path(tempfile.mkdtemp(prefix="eir-bench-redis-"))
    proc, port = start_redis(tmp)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        run_once(DirSource(src), RegisterDB(parse_store_url(url)), SyncOptions(grace=0))
        rows = asyncio.run(main_async(a, url, src))
        w = max(len(k) for k, _ in rows)
        print(f"\n{'metric':<{w}}  value")
        for k, v in rows:
            print(f"{k:<{w}}  {v}")
    finally:
        proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

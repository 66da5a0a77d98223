"""The bounded per-worker maps on the request path, full and churning: the device-signal
detector (CPU per observation, the worst one, cyclic-GC time) and the Redis store's cache
(eir_server.recent.RecentMap against the former dict trimmed by 1/8 from its front: CPU of the
worst single write).

    .venv/bin/python benchmarks/bench_bounded_maps.py [--tracked 1000000] [--cache 1000000]

A full detector used to cost O(keys forgotten since the dict's last rebuild) per observation,
and the former cache's eviction stalled a worker for tens of milliseconds; this shows both stay
flat.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eir_server.obs.audit import DeviceChangeDetector  # noqa: E402
from eir_server.obs.metrics import Metrics  # noqa: E402
from eir_server.recent import RecentMap  # noqa: E402


def cache_writes(n: int, writes: int) -> None:
    """Worst CPU of one write into a full n-entry cache: RecentMap, then the former design."""
    recent: RecentMap[None] = RecentMap(n)
    old: dict[str, None] = {}

    def trim_put(k: str, v: None) -> None:
        old[k] = v
        if len(old) > n:  # the former RedisStore._evict: FIFO, 1/8 at a time
            for kk in list(islice(old, n // 8)):
                del old[kk]

    for name, put in (("RecentMap", recent.put), ("dict trimmed from the front", trim_put)):
        worst, over, t0 = 0.0, 0, time.process_time()
        for i in range(writes):
            k = str(35210000000000 + i)
            c = time.thread_time()
            put(k, None)
            d = time.thread_time() - c
            worst = max(worst, d)
            over += int(d > 0.001)
        per = (time.process_time() - t0) / writes * 1e6
        print(f"cache of {n:,}, {writes:,} new IMEIs, {name}: {per:.2f} µs/write (with the "
              f"timing), worst write {worst * 1000:.1f} ms CPU, {over} writes over 1 ms")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracked", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", type=int, default=1_000_000)
    a = ap.parse_args(argv)
    gc.freeze()
    cache_writes(a.cache, 4 * a.cache)
    n = a.tracked
    det = DeviceChangeDetector(Metrics(), max_tracked=n, log_events=False)
    spent = [0.0, 0.0, 0.0]  # collections' time while churning, and the longest

    def timing(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            spent[2] = time.perf_counter()
        else:
            d = time.perf_counter() - spent[2]
            spent[0] += d
            spent[1] = max(spent[1], d)

    gc.callbacks.append(timing)
    t = time.process_time()
    for i in range(n):
        det.observe(1000.0 + i / 1e4, f"{35209900000000 + i}", f"00101{i:010d}")
    print(f"filling {n:,} devices: {(time.process_time() - t) / n * 1e6:.2f} µs/observation")
    step = max(1, n // 4)
    for r in range(a.rounds):
        t, worst = time.process_time(), 0.0
        spent[0] = spent[1] = 0.0
        lo = n * (r + 1)
        for i in range(lo, lo + step):
            c = time.perf_counter()
            det.observe(5000.0 + i / 1e4, f"{35209900000000 + i}", f"00101{i:010d}")
            worst = max(worst, time.perf_counter() - c)
        print(f"full, {step:,} new devices: {(time.process_time() - t) / step * 1e6:.2f} "
              f"µs/observation, worst {worst * 1000:.2f} ms; cyclic GC {spent[0]:.2f} s in "
              f"all, longest {spent[1] * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

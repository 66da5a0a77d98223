"""Embedded MemoryStore: process memory per listed IMEI and get_nowait cost.

.venv/bin/python benchmarks/bench_store_memory.py --imeis 1000000
"""

from __future__ import annotations

import argparse
import random
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eir_server.policy.types import BlacklistEntry, ImeiRecord  # noqa: E402
from eir_server.store import MemoryStore  # noqa: E402


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--imeis", type=int, default=1_000_000)
    a = ap.parse_args()
    rnd = random.Random(1)
    shared = [
        ImeiRecord(blacklist=BlacklistEntry(f"2023{m:02d}01", ("stolen",))) for m in range(1, 13)
    ]
    before = rss()
    store = MemoryStore()
    # replace_all is what load_register_dir does: one dict, records shared by value.
    store.replace_all(
        {f"{rnd.randrange(10**13, 10**14)}": shared[i % 12] for i in range(a.imeis)}, "bench"
    )
    per = (rss() - before) / len(store)
    key = next(iter(store._records))
    n = 1_000_000
    hit = timeit.timeit(lambda: store.get_nowait(key), number=n) / n
    miss = timeit.timeit(lambda: store.get_nowait("00000000000000"), number=n) / n
    rows = [
        ("IMEIs", f"{len(store):,}"),
        ("RSS bytes / IMEI", f"{per:.0f}"),
        ("get_nowait hit (ns)", f"{hit * 1e9:.0f}"),
        ("get_nowait miss (ns)", f"{miss * 1e9:.0f}"),
    ]
    for k, v in rows:
        print(f"{k:<22}{v}")


if __name__ == "__main__":
    main()

"""CPU per observation of the device-signal detector (IMEI/IMSI pairs) while it fills and once
it is full and churning (new devices pushing old ones out), with the worst single observation.

    .venv/bin/python benchmarks/bench_device_signals.py [--tracked 1000000]

A full detector used to cost O(keys forgotten since the dict's last rebuild) per observation;
this shows it stays flat.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eir_server.obs.audit import DeviceChangeDetector  # noqa: E402
from eir_server.obs.metrics import Metrics  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracked", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    n = a.tracked
    det = DeviceChangeDetector(Metrics(), max_tracked=n, log_events=False)
    gc.freeze()  # as the server does: measure the detector, not collections of this script
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

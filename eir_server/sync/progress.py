"""Load progress: a bar on a terminal, periodic log lines and Prometheus gauges otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

import structlog
from prometheus_client import Counter, Gauge

log = structlog.get_logger("eir.sync")

ROWS = Gauge("eir_sync_rows_processed", "Rows processed by the running sync load")
ROWS_TOTAL = Gauge("eir_sync_rows_expected", "Rows expected in the running sync load (estimate)")
RUNS = Counter("eir_sync_runs", "Sync runs by result", ["result"])
LAST_SUCCESS = Gauge(
    "eir_sync_last_success_timestamp_seconds", "End of the last successful sync run"
)
LAST_DURATION = Gauge("eir_sync_last_duration_seconds", "Duration of the last sync run")
BAD_ROWS = Counter("eir_sync_bad_rows", "Malformed register rows skipped")
DUP_ROWS = Counter(
    "eir_sync_duplicate_rows", "Register rows dropped as duplicates (the most restrictive kept)"
)
IMEIS = Gauge("eir_sync_register_imeis", "Listed IMEIs in the version last switched to")


class Progress:
    """Call `start`, then `update(rows)` often (cheap), then `finish`."""

    def __init__(
        self, mode: str = "auto", stream: TextIO | None = None, log_every: float = 10.0
    ) -> None:
        self.stream = stream or sys.stderr
        self.tty = mode == "always" or (mode == "auto" and self.stream.isatty())
        self.quiet = mode == "never"
        self.log_every = log_every
        self.label = ""
        self.total = 0
        self.rows = 0
        self._t0 = self._last = 0.0

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.rows = label, max(total, 1), 0
        self._t0 = self._last = time.monotonic()
        ROWS.set(0)
        ROWS_TOTAL.set(total)

    def update(self, rows: int) -> None:
        self.rows = rows
        ROWS.set(rows)
        now = time.monotonic()
        every = 0.2 if self.tty else self.log_every
        if now - self._last < every or self.quiet:
            return
        self._last = now
        self._emit(now)

    def _emit(self, now: float, final: bool = False) -> None:
        rate = self.rows / max(now - self._t0, 1e-9)
        frac = min(self.rows / self.total, 1.0) if not final else 1.0
        if self.tty:
            bar = "#" * int(frac * 30)
            self.stream.write(
                f"\r{self.label} [{bar:<30}] {frac:6.1%} {self.rows:>11,} rows {rate:>10,.0f}/s"
                + ("\n" if final else "")
            )
            self.stream.flush()
        else:
            log.info(
                "sync progress",
                load=self.label,
                rows=self.rows,
                expected=self.total,
                rows_per_s=round(rate),
            )

    def finish(self) -> None:
        if not self.quiet:
            self._emit(time.monotonic(), final=True)

"""Embedded in-process store: a dict, for single-node use and tests (no Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from pathlib import Path

import structlog

from eir_server.policy.types import ImeiRecord

from .base import MISSING, StoreStats, _Missing
from .codec import Listing
from .register import CsvReport, latest_full_lists, read_full_lists

log = structlog.get_logger("eir.store")


class MemoryStore:
    """Holds every listed IMEI in one dict; a lookup is one dict probe (~50 ns).

    Loading builds a new dict and swaps it in with one assignment, so a reader never sees a
    half-loaded register. Blacklist-only records with the same date and reasons share one
    ImeiRecord object, which keeps 10M IMEIs at roughly the cost of the dict itself.
    """

    name = "memory"
    queue_depth = 0  # answers synchronously: nothing ever waits

    def __init__(
        self, register_dir: str | Path | None = None, *, max_bad_share: float = 0.01
    ) -> None:
        self._records: dict[str, ImeiRecord] = {}
        self._register_dir = Path(register_dir) if register_dir is not None else None
        self.max_bad_share = max_bad_share
        self.version: str | None = None
        self.ready = register_dir is None
        self.stats = StoreStats()
        self.stats.redis_up = 1  # nothing to be down; keeps dashboards uniform
        self.reports: list[CsvReport] = []

    def __len__(self) -> int:
        return len(self._records)

    # -- hot path ------------------------------------------------------------------------------
    def get_nowait(self, imei14: str) -> ImeiRecord | None | type[_Missing]:
        self.stats.cache_hits += 1
        return self._records.get(imei14)

    def fetch(self, imei14: str) -> asyncio.Future[ImeiRecord | None]:
        fut: asyncio.Future[ImeiRecord | None] = asyncio.get_running_loop().create_future()
        self.stats.fetches += 1
        fut.set_result(self._records.get(imei14))
        return fut

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._register_dir is not None:
            # Parsing 10M rows takes seconds: keep the event loop free while it runs.
            await asyncio.to_thread(self.load_register_dir, self._register_dir)
        self.ready = True

    async def close(self) -> None:
        self.ready = False

    # -- loading -------------------------------------------------------------------------------
    def put(self, imei14: str, record: ImeiRecord | None) -> None:
        """Set (or with None, delete) one record. For tests and tooling."""
        _check_key(imei14)
        if self.version is None:
            self.version = "local"  # records put by hand, not from a register run
        if record is None:
            self._records.pop(imei14, None)
        else:
            self._records[imei14] = record

    def put_many(
        self, records: Mapping[str, ImeiRecord] | Iterable[tuple[str, ImeiRecord]]
    ) -> None:
        items = records.items() if isinstance(records, Mapping) else records
        for imei14, record in items:
            self.put(imei14, record)

    def replace_all(self, records: dict[str, ImeiRecord], version: str | None = None) -> None:
        """Swap in a whole register at once (readers see the old or the new one, never a mix)."""
        self._records = records
        self.version = version
        self.stats.version_changes += 1

    def load_register_dir(self, path: str | Path) -> None:
        """Load the newest full list of each list name found in `path` (zips or bare CSVs).

        Raises `register.RegisterError` if a file is refused; the current records then stay.
        """
        sources = latest_full_lists(Path(path))
        reports: list[CsvReport] = []
        merged = read_full_lists(sources, self.max_bad_share, reports)
        shared: dict[tuple[object, ...], ImeiRecord] = {}
        records: dict[str, ImeiRecord] = {}
        for imei, listing in merged.items():
            records[imei] = _intern(listing, shared)
        version = max((s.ts for s in sources.values()), default=None)
        self.reports = reports
        self.replace_all(records, version)
        log.info(
            "register loaded",
            path=str(path),
            imeis=len(records),
            lists={str(k): v.run_id for k, v in sources.items()},
            bad_rows=sum(r.bad for r in reports),
            version=version,
        )


def _intern(listing: Listing, shared: dict[tuple[object, ...], ImeiRecord]) -> ImeiRecord:
    if listing.blacklist_only():
        b = listing.blacklist
        assert b is not None
        key = (b.block_date, b.reasons)
        rec = shared.get(key)
        if rec is None:
            rec = shared[key] = ImeiRecord(blacklist=b)
        return rec
    return listing.to_record()


def _check_key(imei14: str) -> None:
    if len(imei14) != 14 or not (imei14.isdigit() and imei14.isascii()):
        raise ValueError(f"store keys are 14-digit IMEIs, got {imei14!r}")


__all__ = ["MISSING", "MemoryStore"]

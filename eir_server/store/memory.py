"""Embedded store (no Redis): the register from a directory of list files, in-process.

With a snapshot directory (`eir-server serve` sets one unless `--register-snapshot-dir off`)
the register is one memory-mapped file shared by the node's workers (register_snapshot.py);
without one, or when that file cannot be had, a dict in this process, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import structlog

from eir_server.policy.types import ImeiRecord

from .base import MISSING, StoreStats, _Missing
from .codec import Listing
from .register import CsvReport, latest_full_lists, read_full_lists
from .register_snapshot import RegisterView, SnapshotUnavailable, ensure, open_view
from .tiers import CountedLookup

log = structlog.get_logger("eir.store")


# Registers of at most this many IMEIs are also copied into a dict in each worker: the shared
# file then serves only its build-once and reload bookkeeping, and lookups stay dict-fast.
SMALL_REGISTER = 65_536


class MemoryStore:
    """Holds every listed IMEI in one dict (a lookup is one dict probe, ~50 ns), or maps the
    node's register snapshot (a binary search in shared pages, ~1-2 µs; `snapshot_dir`).

    Loading builds a new dict (or maps a new file) and swaps it in with one assignment, so a
    reader never sees a half-loaded register. Blacklist-only records with the same date and
    reasons share one ImeiRecord object, which keeps 10M IMEIs at roughly the cost of the dict
    itself.
    """

    name = "memory"
    queue_depth = 0  # answers synchronously: nothing ever waits

    def __init__(
        self,
        register_dir: str | Path | None = None,
        *,
        max_bad_share: float = 0.01,
        snapshot_dir: str | Path | None = None,
    ) -> None:
        self._records: dict[str, ImeiRecord] = {}
        self._view: RegisterView | None = None
        self.stats = StoreStats()
        # The hot path's lookup, compiled: the dict's get, or the mapped snapshot's, swapped as
        # one (`_lookup.get`).
        self._lookup = CountedLookup(self._records.get, self.stats)
        self._register_dir = Path(register_dir) if register_dir is not None else None
        self.max_bad_share = max_bad_share
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self._snapshot_warned = False
        self.version: str | None = None
        self.ready = register_dir is None
        self.stats.redis_up = 1  # nothing to be down; keeps dashboards uniform
        self.reports: list[CsvReport] = []

    @property
    def snapshot_path(self) -> Path | None:
        """The snapshot file served, None when the register is a dict in this process."""
        return self._view.path if self._view is not None else None

    def __len__(self) -> int:
        return len(self._view) if self._view is not None else len(self._records)

    # -- hot path ------------------------------------------------------------------------------
    @property
    def get_nowait(self) -> Callable[[str], ImeiRecord | None | type[_Missing]]:
        """`store.get_nowait(imei14)`, as the RecordStore contract says; a property so that a
        caller that binds it once (the checker) calls compiled code only (tiers.py). A subclass
        may define a plain method instead."""
        return self._lookup.get_nowait

    def fetch(self, imei14: str) -> asyncio.Future[ImeiRecord | None]:
        fut: asyncio.Future[ImeiRecord | None] = asyncio.get_running_loop().create_future()
        self.stats.fetches += 1
        fut.set_result(self._lookup.get(imei14))
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
        if self._view is not None:
            raise RuntimeError("the register is a mapped snapshot: use replace_all")
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
        self._lookup.get = records.get
        self._view = None  # unmapped once no lookup holds it (reference counting)
        self.version = version
        self.stats.version_changes += 1

    def load_register_dir(self, path: str | Path) -> None:
        """Load the newest full list of each list name found in `path` (zips or bare CSVs).

        Raises `register.RegisterError` if a file is refused; the current records then stay.
        """
        if self.snapshot_dir is not None:
            try:
                self._load_snapshot(Path(path), self.snapshot_dir)
                return
            except SnapshotUnavailable as e:
                if not self._snapshot_warned:  # once: the cause stays until someone fixes it
                    self._snapshot_warned = True
                    log.warning("register snapshot unavailable: this process loads the "
                                "register itself (memory per worker)", path=str(path),
                                snapshot_dir=str(self.snapshot_dir), error=str(e))
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

    def prepare_snapshot(self) -> Path:
        """Build the register's snapshot file if it has none (e.g. in the parent before the
        workers fork, so that none of them parses the register). Raises SnapshotUnavailable."""
        if self._register_dir is None or self.snapshot_dir is None:
            raise SnapshotUnavailable("no register or no snapshot directory")
        return ensure(self._register_dir, self.snapshot_dir, self.max_bad_share)

    def _load_snapshot(self, path: Path, directory: Path) -> None:
        view = open_view(path, directory, self.max_bad_share, self._view)
        if view is self._view:
            log.info("register unchanged", path=str(path), snapshot=str(view.path),
                     version=view.version)
            return
        self.reports = view.reports
        # One assignment switches every lookup; the old mapping goes with its last reference.
        if len(view) <= SMALL_REGISTER:
            # A dict lookup costs ~1/8 of the mapped binary search (~1.2k against ~9.9k
            # instructions), and so few records cost each worker little (<= ~35 MB).
            self._records = view.records()
            self._lookup.get = self._records.get
        else:
            self._records = {}
            self._lookup.get = view.get
        self._view = view
        self.version = view.version
        self.stats.version_changes += 1
        log.info(
            "register loaded",
            path=str(path),
            imeis=len(view),
            lists=view.lists,
            bad_rows=sum(r.bad for r in view.reports),
            version=view.version,
            snapshot=str(view.path),
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

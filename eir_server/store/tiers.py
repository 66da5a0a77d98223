"""The stores' lookups that need no round trip, compiled (setup.py) while redis_store.py and
memory.py are not: each ECR passes here once, and as interpreted code the Redis store's lookup
cost more worker CPU than the snapshot's binary search it ends in (the embedded store's, a
tenth of a cached ECR). Each store hands out a bound method of these as its `get_nowait`, so
the (compiled) checker reaches it without an interpreted frame in between.

- `LocalTiers`: the Redis store's worker caches, the version's overlay and the node's register
  snapshot, in that order.
- `CountedLookup`: the embedded store's register (a dict's or a mapped snapshot's `get`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from eir_server.policy.types import ImeiRecord
from eir_server.recent import RecentMap

from .base import MISSING, StoreStats, _Missing
from .codec import decode_record
from .snapshot import Snapshot

_MISS: Final = MISSING  # compiled, a Final global is a constant, not a module dict lookup

Answer = ImeiRecord | None | type[_Missing]


def cache_key(imei14: str) -> int | str:
    """The caches' key: the 14 digits as an int (an int-keyed dict keeps each key's hash in
    the entry; a str-keyed one reads the key object, cold memory once there are millions);
    anything else as it is (never equal to an int, so never confused with an IMEI)."""
    if len(imei14) == 14 and imei14.isascii() and imei14.isdigit():
        return int(imei14)
    return imei14


class LocalTiers:
    """`cache` (IMEIs Redis said are not listed) and `listed` (their records) are the store's
    own maps; `serve` points the rest at a register version, as one switch."""

    __slots__ = ("cache", "listed", "stats", "overlay", "snap", "table", "missed")

    def __init__(self, cache: RecentMap[None], listed: RecentMap[ImeiRecord],
                 stats: StoreStats) -> None:
        self.cache = cache
        self.listed = listed
        self.stats = stats
        self.overlay: dict[str, ImeiRecord | None] = {}
        self.snap: Snapshot | None = None
        self.table: dict[int, ImeiRecord] = {}
        # The IMEI get_nowait last found in no tier: the checker's next call is its fetch,
        # which then asks Redis without probing the tiers again (`fetched_locally`).
        self.missed: str | None = None

    def serve(self, overlay: dict[str, ImeiRecord | None], snap: Snapshot | None,
              table: dict[int, ImeiRecord]) -> None:
        self.overlay = overlay
        self.snap = snap
        self.table = table

    def get_nowait(self, imei14: str) -> Answer:
        key = cache_key(imei14)
        r: Answer = self.cache.get_or(self.listed, key, _MISS)
        if r is _MISS:
            r = self.overlay.get(imei14, _MISS)
            if r is _MISS:
                if self.snap is not None:
                    r = self._from_snap(self.snap, key)
                    if r is not _MISS:
                        if r is None:
                            self.stats.snapshot_misses += 1
                        else:
                            self.stats.snapshot_hits += 1
                        return r
                self.stats.cache_misses += 1
                self.missed = imei14
                return _MISS
        self.stats.cache_hits += 1
        return r

    def fetched_locally(self, imei14: str) -> Answer:
        """What the tiers answer for a fetch (uncounted: get_nowait counted the lookup)."""
        if imei14 is self.missed:  # the checker's order: get_nowait just probed every tier
            self.missed = None
            return _MISS
        key = cache_key(imei14)
        r: Answer = self.cache.get_or(self.listed, key, _MISS)
        if r is _MISS:
            r = self.overlay.get(imei14, _MISS)
            if r is _MISS and self.snap is not None:
                r = self._from_snap(self.snap, key)
        return r

    def _from_snap(self, snap: Snapshot, key: int | str) -> Answer:
        if not isinstance(key, int):
            return None  # not 14 digits: no key the register can hold
        raw = snap.get_number(key)  # the number cache_key made: no second parse of the digits
        if raw is None:
            return None
        if isinstance(raw, int):
            return self.table.get(raw, _MISS)  # an id the table lacks: ask Redis
        return decode_record(raw)


class CountedLookup:
    """The embedded store's lookup: `get` (swapped as a whole when the register reloads),
    counted as a cache hit (nothing is ever fetched)."""

    __slots__ = ("get", "stats")

    def __init__(self, get: Callable[[str], ImeiRecord | None], stats: StoreStats) -> None:
        self.get = get
        self.stats = stats

    def get_nowait(self, imei14: str) -> Answer:
        self.stats.cache_hits += 1
        return self.get(imei14)

"""Duplicate request detection (RFC 6733 6.2.1 / 5.5.4): a request retransmitted with the T flag
whose (Origin-Host, End-to-End-Id) we answered recently gets the same answer again.

Bounded by memory, not only by entries: every request a peer sends adds an entry, so at a high
rate the cache is what grows (2M entries of the former layout were ~810 MB per worker). The
cache keeps the *outcome* (for S13 the Equipment-Status, a small int) rather than answer bytes,
and packs key and entry into one int each: the key is a `HASH_BITS`-bit hash of the Origin-Host
and the End-to-End-Id, the entry the answer time in milliseconds and the outcome. Both stay
below 2^62, mypyc's unboxed ints: a wider key made every put build and combine big ints. About
`ENTRY_BYTES` per entry, so the default 64 MiB holds ~600k answers: the last 6 s at 100k ECR/s,
minutes at an MME's usual rate. The trade-off is deliberate: an ECR is a read-only check, and a
retransmission that fell out of the cache is simply checked again (same verdict unless the
register changed in between). A hash collision between two Origin-Hosts with the same
End-to-End-Id inside the window would answer one with the other's outcome: one chance in 2^29
per pair of peers.

Kept in a `RecentMap` (eir_server.recent): two generations of small shards, no per-entry links
and no sweep, a dropped generation freed a shard per write. A new generation also starts when
the young one is half a window old, so an entry lives between half and a whole window (or
capacity). Ints are untracked by the cyclic GC, so a full cache does not lengthen its
collections. Hits are counted by the caller (eir_requests_total{result="duplicate"}).
"""

from __future__ import annotations

from typing import Final

from eir_server.recent import RecentMap

DEFAULT_WINDOW: Final = 240.0  # RFC 6733 5.5.4 suggests remembering answers for about 4 minutes
DEFAULT_MAX_ENTRIES: Final = 2_000_000
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024
ENTRY_BYTES: Final = 120  # measured ~116 with tracemalloc: dict slot + index + int key + int entry
HASH_BITS: Final = 29  # the Origin-Host's hash, above the 32-bit End-to-End-Id: key < 2^61
_HASH_MASK: Final = (1 << HASH_BITS) - 1


def cache_key(origin_host: bytes, end_to_end: int) -> int:
    return (hash(origin_host) & _HASH_MASK) << 32 | end_to_end


class DuplicateCache:
    """Outcomes are small ints (-128..127)."""

    __slots__ = ("window", "capacity", "_map", "_young_since")

    def __init__(self, window: float = DEFAULT_WINDOW, max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.window = window
        self.capacity = max(2, min(max_entries, max_bytes // ENTRY_BYTES))
        # key: cache_key(); value: answer time (ms), outcome
        self._map: RecentMap[int] = RecentMap(self.capacity)
        self._young_since = 0.0  # when the young generation took its first put

    def __len__(self) -> int:
        return len(self._map)

    def get(self, origin_host: bytes, end_to_end: int, now: float) -> int | None:
        v: int | None = self._map.get(cache_key(origin_host, end_to_end))
        if v is None or now * 1000.0 - (v >> 8) > self.window * 1000.0:
            return None
        o = v & 0xFF
        return o - 256 if o >= 128 else o

    def put(self, origin_host: bytes, end_to_end: int, outcome: int, now: float) -> None:
        """Separate arguments, an int outcome: no tuple to build, no int() to call per answer."""
        m = self._map
        if m.young and now - self._young_since >= self.window / 2:
            m.turn()
        m.put(cache_key(origin_host, end_to_end), int(now * 1000.0) << 8 | (outcome & 0xFF))
        if m.young == 1:  # this put began a generation (here, or as the bound turned it)
            self._young_since = now

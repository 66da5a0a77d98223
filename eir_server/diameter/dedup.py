"""Duplicate request detection (RFC 6733 6.2.1 / 5.5.4): a request retransmitted with the T flag
whose (Origin-Host, End-to-End-Id) we answered recently gets the same answer again.

Bounded by memory, not only by entries: every request a peer sends adds an entry, so at a high
rate the cache is what grows (2M entries of the former layout were ~810 MB per worker). The
cache keeps the *outcome* (for S13 the Equipment-Status, a small int) rather than answer bytes,
and packs key and entry into one int each: the key is a 32-bit hash of the Origin-Host and the
End-to-End-Id, the entry the answer time in milliseconds and the outcome. About
`ENTRY_BYTES` per entry, so the default 64 MiB holds ~600k answers: the last 6 s at 100k ECR/s,
minutes at an MME's usual rate. The trade-off is deliberate: an ECR is a read-only check, and a
retransmission that fell out of the cache is simply checked again (same verdict unless the
register changed in between). A hash collision between two Origin-Hosts with the same
End-to-End-Id inside the window would answer one with the other's outcome: one chance in 2^32
per pair of peers.

Two generations instead of an ordered map: new answers go to `_new`; when it holds half the
capacity or is half a window old, it becomes `_old` and the former `_old` is dropped.
No per-entry links, no sweep; an entry lives between half and a whole window (or capacity).
Ints are untracked by the cyclic GC, so a full cache does not lengthen its collections. Hits are
counted by the caller (eir_requests_total{result="duplicate"}).

Each generation is `SHARDS` small dicts, not one big one, for the latency tail: a dict that
doubles rehashes all its entries in one go (10 ms at 175k entries on a slow core, inside one
request), and dropping a generation frees all its ints at once. Small shards grow in small steps,
and a dropped generation is freed one shard per `put`.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_WINDOW = 240.0  # RFC 6733 5.5.4 suggests remembering answers for about 4 minutes
DEFAULT_MAX_ENTRIES = 2_000_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
ENTRY_BYTES = 120  # measured ~116 with tracemalloc: dict slot + index + int key + int entry


SHARDS = 256  # a power of two: the shard is the key's low bits (End-to-End-Id bits, well spread)
_MASK = SHARDS - 1


class DuplicateCache(Generic[T]):
    """Outcomes are small ints (-128..127)."""

    __slots__ = ("window", "capacity", "_new", "_old", "_new_count", "_new_since", "_dying")

    def __init__(self, window: float = DEFAULT_WINDOW, max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.window = window
        self.capacity = max(2, min(max_entries, max_bytes // ENTRY_BYTES))
        self._new: list[dict[int, int]] = [{} for _ in range(SHARDS)]
        self._old: list[dict[int, int]] = [{} for _ in range(SHARDS)]
        self._new_count = 0  # puts into _new (a re-put counts twice: errs towards swapping early)
        self._new_since = 0.0
        self._dying: list[dict[int, int]] = []  # the generation being dropped, a shard at a time

    def __len__(self) -> int:
        return sum(map(len, self._new)) + sum(map(len, self._old))

    def get(self, key: tuple[bytes, int], now: float) -> T | None:
        k = (hash(key[0]) & 0xFFFFFFFF) << 32 | key[1]  # 32-bit host hash, End-to-End-Id
        v = self._new[k & _MASK].get(k)
        if v is None:
            v = self._old[k & _MASK].get(k)
            if v is None:
                return None
        if now * 1000.0 - (v >> 8) > self.window * 1000.0:
            return None
        o = v & 0xFF
        return (o - 256 if o >= 128 else o)  # type: ignore[return-value]

    def put(self, key: tuple[bytes, int], outcome: T, now: float) -> None:
        n = self._new_count
        if not n:
            self._new_since = now
        elif n * 2 >= self.capacity or now - self._new_since >= self.window / 2:
            # Leftovers of the previous drop (fewer puts than shards in half a window) are
            # small: they go at once.
            self._dying = self._old
            self._old = self._new
            self._new = [{} for _ in range(SHARDS)]
            self._new_since = now
            n = 0
        self._new_count = n + 1
        if self._dying:
            self._dying.pop()
        k = (hash(key[0]) & 0xFFFFFFFF) << 32 | key[1]  # as in get()
        self._new[k & _MASK][k] = int(now * 1000.0) << 8 | (int(outcome) & 0xFF)  # type: ignore[call-overload]

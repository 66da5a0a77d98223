"""A bounded map for per-request caches that must never stall the loop it runs on.

At most `max_entries` keys; the least recently *written* are forgotten first, by generations:
writes go to the young generation; when it holds half the bound, the old one is dropped and the
young one becomes old. Reads see both; a key read from the old generation survives the next
turn only if it is written again.

What it replaces, and why (each measured on the request path of a worker):
- An insertion-ordered dict trimmed from its front (`next(iter(d))`, `islice(d, n)`) scans every
  slot deleted since the dict's last rebuild, each time: 77-350 us per write once a detector
  tracked 200k devices, 30-60 ms per eviction of a 1M-entry store cache.
- One dict of a million entries rehashes all of them when it grows (tens of ms inside one
  request), and frees all of them when dropped. Here each generation is `SHARDS` small dicts,
  and a dropped generation is freed one shard per write.
- Keep keys and values atomic (ints, strings, None), never tuples: a dict of those is not
  tracked by the cyclic GC, which otherwise walks every entry at each full collection (~100 ms
  per million entries). Values that are objects make their shard tracked; keep such maps small.
  A value with a time packs both into one int (the device-signal detector, the duplicate
  cache): one table per generation to touch, not two.
- Large maps are faster with int keys than with strings: a str-keyed dict reads each probed
  entry's key object to compare hashes, an int-keyed one keeps the hash in the entry. With a
  million devices those key objects are cold memory, one cache miss per probe.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final, Generic, TypeVar

V = TypeVar("V")

SHARDS: Final = 64
MASK: Final = SHARDS - 1
_ABSENT: Final[Any] = object()


def _fresh() -> list[dict[Any, Any]]:
    return [{} for _ in range(SHARDS)]


class RecentMap(Generic[V]):
    """See the module docstring. `len()` counts a key written in both generations twice."""

    __slots__ = ("half", "_young", "_old", "young", "_dying", "evicted")

    def __init__(self, max_entries: int) -> None:
        self.half = max(1, max_entries // 2)
        self._young: list[dict[Any, V]] = _fresh()
        self._old: list[dict[Any, V]] = _fresh()
        self.young = 0  # keys written into the young generation (read-only outside)
        self._dying: list[dict[Any, Any]] = []
        self.evicted = 0  # keys dropped with old generations

    def get(self, key: Any, default: Any = None) -> Any:
        h = hash(key) & MASK
        v = self._young[h].get(key, _ABSENT)
        if v is _ABSENT:
            return self._old[h].get(key, default)
        return v

    def get_or(self, other: RecentMap[Any], key: Any, default: Any = None) -> Any:
        """`self.get(key)`, else `other.get(key, default)`, in one call and one hash (a store
        probes its two caches on every miss)."""
        h = hash(key) & MASK
        v = self._young[h].get(key, _ABSENT)
        if v is _ABSENT:
            v = self._old[h].get(key, _ABSENT)
            if v is _ABSENT:
                v = other._young[h].get(key, _ABSENT)
                if v is _ABSENT:
                    return other._old[h].get(key, default)
        return v

    def swap(self, key: Any, value: V, default: Any = None) -> Any:
        """`put(key, value)`, returning what `key` held before (or `default`): a get and a put
        in one call and one hash (the device-signal detector does this twice per sighting)."""
        h = hash(key) & MASK
        young = self._young[h]
        prev = young.get(key, _ABSENT)
        if prev is _ABSENT:
            prev = self._old[h].get(key, default)
            if self.young >= self.half:
                self.turn()
                young = self._young[h]
            self.young += 1
        young[key] = value
        if self._dying:
            self._dying.pop()
        return prev

    def put(self, key: Any, value: V) -> None:
        h = hash(key) & MASK
        young = self._young[h]
        if key not in young:
            if self.young >= self.half:
                self.turn()
                young = self._young[h]
            self.young += 1
        young[key] = value
        if self._dying:
            self._dying.pop()

    def put_many(self, keys: Iterable[Any], value: V) -> None:
        """`put(key, value)` for each key, in one call (the store caches a batch of "not
        listed" answers at once)."""
        for key in keys:
            h = hash(key) & MASK
            young = self._young[h]
            if key not in young:
                if self.young >= self.half:
                    self.turn()
                    young = self._young[h]
                self.young += 1
            young[key] = value
            if self._dying:
                self._dying.pop()

    def turn(self) -> None:
        """Start a new young generation now (also done when it holds half the bound); the old
        one is dropped, a shard per write from here on."""
        self.evicted += sum(map(len, self._old))
        # Leftovers of the previous turn (fewer writes than shards since) are few: freed now.
        self._dying = self._old
        self._old = self._young
        self._young = _fresh()
        self.young = 0

    def discard(self, key: Any) -> None:
        h = hash(key) & MASK
        self._young[h].pop(key, None)
        self._old[h].pop(key, None)

    def clear(self) -> None:
        self._young, self._old = _fresh(), _fresh()
        self.young = 0
        self._dying = []

    def __contains__(self, key: Any) -> bool:
        return self.get(key, _ABSENT) is not _ABSENT

    def __len__(self) -> int:
        return sum(map(len, self._young)) + sum(map(len, self._old))

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
  and a dropped generation is freed a shard at a time, spread over the next generation's
  writes.
- Shards take uneven shares of the keys (`_SHARD_OF`: 1x to 3x the smallest). With even shares,
  keys that come in sequence (End-to-End-Ids, a block of IMEIs) fill every shard at the same rate,
  so all of them grew in the same few writes: the rehash of the whole map again, in one slice of
  the audit task (19 ms at 350k devices) or in one tick of requests (5 ms). With uneven shares
  each shard reaches its next size at its own point, a shard at a time.
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
SPREAD: Final = 4096  # slots of _SHARD_OF: the hash's low 12 bits pick the shard
_LOW: Final = SPREAD - 1
_ABSENT: Final[Any] = object()


def _shares() -> bytes:
    """Slot -> shard: shard i owns 32 + i slots, and the first 32 one more (33..95 of 4096), so
    that no two shards (but 31 and 32) fill at the same rate."""
    out = bytearray()
    for i in range(SHARDS):
        out += bytes([i]) * (32 + i)
    out += bytes(range(SHARDS))[: SPREAD - len(out)]  # 4096 - 4064: the first 32 one more each
    return bytes(out)


_SHARD_OF: Final = _shares()


def _fresh() -> list[dict[Any, Any]]:
    return [{} for _ in range(SHARDS)]


class RecentMap(Generic[V]):
    """See the module docstring. `len()` counts a key written in both generations twice."""

    __slots__ = ("half", "_young", "_old", "young", "_dying", "_pace", "_wait", "evicted")

    def __init__(self, max_entries: int) -> None:
        self.half = max(1, max_entries // 2)
        self._young: list[dict[Any, V]] = _fresh()
        self._old: list[dict[Any, V]] = _fresh()
        self.young = 0  # keys written into the young generation (read-only outside)
        self._dying: list[dict[Any, Any]] = []
        # Writes between two dying shards freed: a dropped generation is gone within a quarter
        # of the next one's writes (4 x SHARDS frees), and no run of writes (a slice of the
        # audit task is 64) frees more than a shard or two of it.
        self._pace = max(1, self.half // (4 * SHARDS))
        self._wait = 0
        self.evicted = 0  # keys dropped with old generations

    def get(self, key: Any, default: Any = None) -> Any:
        h = _SHARD_OF[hash(key) & _LOW]
        v = self._young[h].get(key, _ABSENT)
        if v is _ABSENT:
            return self._old[h].get(key, default)
        return v

    def get_or(self, other: RecentMap[Any], key: Any, default: Any = None) -> Any:
        """`self.get(key)`, else `other.get(key, default)`, in one call and one hash (a store
        probes its two caches on every miss)."""
        h = _SHARD_OF[hash(key) & _LOW]
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
        h = _SHARD_OF[hash(key) & _LOW]
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
            self._free()
        return prev

    def put(self, key: Any, value: V) -> None:
        h = _SHARD_OF[hash(key) & _LOW]
        young = self._young[h]
        if key not in young:
            if self.young >= self.half:
                self.turn()
                young = self._young[h]
            self.young += 1
        young[key] = value
        if self._dying:
            self._free()

    def put_many(self, keys: Iterable[Any], value: V) -> None:
        """`put(key, value)` for each key, in one call (the store caches a batch of "not
        listed" answers at once)."""
        for key in keys:
            h = _SHARD_OF[hash(key) & _LOW]
            young = self._young[h]
            if key not in young:
                if self.young >= self.half:
                    self.turn()
                    young = self._young[h]
                self.young += 1
            young[key] = value
            if self._dying:
                self._free()

    def _free(self) -> None:
        self._wait -= 1
        if self._wait <= 0:
            self._wait = self._pace
            self._dying.pop()

    def turn(self) -> None:
        """Start a new young generation now (also done when it holds half the bound); the old
        one is dropped, a shard every `_pace` writes from here on."""
        self.evicted += sum(map(len, self._old))
        # Leftovers of the previous turn are freed now: there were fewer than half/4 writes
        # since (a turn by time, at a low rate), so they hold few keys.
        self._dying = self._old
        self._old = self._young
        self._young = _fresh()
        self.young = 0

    def forget(self) -> None:
        """Forget every key now, as `clear` does, but free them a shard at a time, as a turn does
        (a 65k-entry map freed at once held the loop for 2 ms)."""
        self._dying = self._dying + self._old + self._young
        self._young, self._old = _fresh(), _fresh()
        self.young = 0

    def discard(self, key: Any) -> None:
        h = _SHARD_OF[hash(key) & _LOW]
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

"""Duplicate request detection (RFC 6733 6.2.1 / 5.5.4): a request retransmitted with the T flag
whose (Origin-Host, End-to-End-Id) we answered recently gets the same answer again.

Storing every answer for the full window costs memory proportional to the request rate, so the
cache keeps the *outcome* (for S13 the Equipment-Status as an int) rather than answer bytes; the
answer is rebuilt from the retransmitted request, which gives the same bytes (the request carries
the same AVPs) except the hop-by-hop id. Keep outcomes atomic (ints): tuples of atomics are
untracked by the cyclic GC, so millions of entries do not lengthen its collections. Entries expire
after `window` seconds, and the oldest are dropped first beyond `max_entries` (coverage =
min(window, max_entries / request rate)). Hits are counted by the caller
(eir_requests_total{result="duplicate"}).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_WINDOW = 240.0  # RFC 6733 5.5.4 suggests remembering answers for about 4 minutes
DEFAULT_MAX_ENTRIES = 2_000_000


class DuplicateCache(Generic[T]):
    __slots__ = ("window", "max_entries", "_entries", "_puts")

    def __init__(self, window: float = DEFAULT_WINDOW,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.window = window
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[bytes, int], tuple[float, T]] = OrderedDict()
        self._puts = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[bytes, int], now: float) -> T | None:
        item = self._entries.get(key)
        if item is None or now - item[0] > self.window:
            return None
        return item[1]

    def put(self, key: tuple[bytes, int], outcome: T, now: float) -> None:
        entries = self._entries
        if key in entries:
            entries.move_to_end(key)
        entries[key] = (now, outcome)
        if len(entries) > self.max_entries:
            entries.popitem(last=False)
        self._puts += 1
        if self._puts & 63 == 0:
            # Expire in small batches (amortised O(1), no sweep task): up to 128 entries per 64
            # puts, so expiry always outpaces insertion.
            for _ in range(128):
                oldest = next(iter(entries.values()))
                if now - oldest[0] <= self.window:
                    break
                entries.popitem(last=False)

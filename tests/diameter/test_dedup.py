"""The duplicate cache is bounded by bytes: a peer's request rate cannot grow a worker's memory
past `max_bytes`; what falls out is re-checked, which for a read-only ECR is the same answer."""

from __future__ import annotations

import tracemalloc

from hypothesis import given
from hypothesis import strategies as st

from eir_server.diameter.dedup import ENTRY_BYTES, DuplicateCache, cache_key


def test_memory_stays_under_max_bytes() -> None:
    limit = 4 * 1024 * 1024
    cache: DuplicateCache = DuplicateCache(window=240.0, max_bytes=limit)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(300_000):  # ~9x what fits
            cache.put(b"mme1.epc.mnc001.mcc001.3gppnetwork.org", i, 1, 1000.0 + i / 1e5)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(cache) <= limit // ENTRY_BYTES
    assert used <= limit * 1.25, used  # dict growth steps overshoot a little
    # The most recent answers are still there; the oldest were dropped.
    assert cache.get(b"mme1.epc.mnc001.mcc001.3gppnetwork.org", 299_999, 1003.0) == 1
    assert cache.get(b"mme1.epc.mnc001.mcc001.3gppnetwork.org", 0, 1003.0) is None


def test_window_and_origins() -> None:
    cache: DuplicateCache = DuplicateCache(window=10.0)
    cache.put(b"a", 7, -1, 100.0)
    cache.put(b"b", 7, 2, 100.0)
    assert cache.get(b"a", 7, 105.0) == -1 and cache.get(b"b", 7, 105.0) == 2
    assert cache.get(b"c", 7, 105.0) is None
    cache.put(b"a", 8, 0, 106.0)  # half a window later: a new generation starts
    assert cache.get(b"a", 7, 109.0) == -1  # still found in the old one
    assert cache.get(b"a", 7, 110.5) is None  # past the window
    cache.put(b"a", 9, 0, 112.0)
    assert cache.get(b"b", 7, 112.0) is None and cache.get(b"a", 8, 112.0) == 0


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=8), st.integers(0, 2**32 - 1),
                          st.integers(-1, 2)), max_size=200))
def test_what_is_found_is_what_was_put(items: list[tuple[bytes, int, int]]) -> None:
    cache: DuplicateCache = DuplicateCache(window=1e6, max_entries=10_000)
    last: dict[tuple[bytes, int], int] = {}
    for host, e2e, outcome in items:
        cache.put(host, e2e, outcome, 1.0)
        last[(host, e2e)] = outcome
    hashed: dict[int, int] = {}
    for host, e2e in last:
        k = cache_key(host, e2e)
        hashed[k] = hashed.get(k, 0) + 1
    for (host, e2e), outcome in last.items():
        if hashed[cache_key(host, e2e)] == 1:  # no hash collision
            assert cache.get(host, e2e, 2.0) == outcome


@given(st.binary(max_size=300), st.integers(0, 2**32 - 1))
def test_keys_stay_small_ints(host: bytes, e2e: int) -> None:
    """Below 2^62 (mypyc's unboxed range) a put does no big-int arithmetic; the End-to-End-Id
    is kept whole, so two requests of one peer never share a key."""
    k = cache_key(host, e2e)
    assert 0 <= k < 2**61 and k & 0xFFFFFFFF == e2e

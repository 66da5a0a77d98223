"""RecentMap, the bounded map behind the Redis store's cache and the device-signal detector:
never more than its bound, never a stale value, and the recently written always kept."""

from __future__ import annotations

import sys

from hypothesis import given
from hypothesis import strategies as st

from eir_server.recent import SHARDS, RecentMap

OPS = st.lists(st.tuples(st.sampled_from(["put", "discard"]), st.integers(0, 60),
                         st.integers(0, 5)), max_size=400)


@given(OPS, st.integers(2, 40))
def test_against_a_model(ops: list[tuple[str, int, int]], bound: int) -> None:
    m: RecentMap[int] = RecentMap(bound)
    last: dict[int, int] = {}  # the model: last value written, for keys not discarded since
    new_keys: list[int] = []  # keys in the order they entered the young generation
    for op, key, value in ops:
        if op == "put":
            m.put(key, value)
            last[key] = value
            new_keys.append(key)
        elif key == 0:  # now and then: forget everything
            m.forget()
            last.clear()
        else:
            m.discard(key)
            last.pop(key, None)
        assert len(m) <= bound
        for k in range(61):
            got = m.get(k, None)
            if got is not None:
                assert k in last and got == last[k]  # never stale, never resurrected
    # The keys written most recently (the last half-bound of them) are all still there.
    recent = [k for k in reversed(new_keys) if k in last][: bound // 2]
    for k in recent:
        assert m.get(k) == last[k]


def test_values_and_defaults() -> None:
    m: RecentMap[str] = RecentMap(10)
    m.put("a", "x")
    m.put("a", "y")
    assert m.get("a") == "y" and m.get("b", 7) == 7 and "a" in m
    m.clear()
    assert len(m) == 0 and m.get("a") is None


def test_forgets_by_generations_and_counts_evictions() -> None:
    m: RecentMap[None] = RecentMap(100)
    for i in range(1000):
        m.put(i, None)
    assert len(m) <= 100 and m.evicted >= 800
    assert all(i in m for i in range(950, 1000)) and 0 not in m


@given(OPS, OPS, st.integers(2, 40))
def test_get_or_is_get_then_get(a_ops: list[tuple[str, int, int]],
                                b_ops: list[tuple[str, int, int]], bound: int) -> None:
    a: RecentMap[int] = RecentMap(bound)
    b: RecentMap[int] = RecentMap(bound)
    for m, ops in ((a, a_ops), (b, b_ops)):
        for op, key, value in ops:
            if op == "put":
                m.put(key, value)
            else:
                m.discard(key)
    for k in range(61):
        want = a.get(k, "absent")
        if want == "absent":
            want = b.get(k, "absent")
        assert a.get_or(b, k, "absent") == want


@given(st.lists(st.integers(0, 60), max_size=300), st.integers(2, 40))
def test_put_many_is_put_each(keys: list[int], bound: int) -> None:
    a: RecentMap[None] = RecentMap(bound)
    b: RecentMap[None] = RecentMap(bound)
    for k in keys:
        a.put(k, None)
    b.put_many(keys, None)
    assert [k in a for k in range(61)] == [k in b for k in range(61)]
    assert (a.young, a.evicted, len(a)) == (b.young, b.evicted, len(b))


@given(OPS, st.integers(2, 40))
def test_swap_is_get_then_put(ops: list[tuple[str, int, int]], bound: int) -> None:
    a: RecentMap[int] = RecentMap(bound)
    b: RecentMap[int] = RecentMap(bound)
    for op, key, value in ops:
        if op == "put":
            before = a.get(key, "absent")
            a.put(key, value)
            assert b.swap(key, value, "absent") == before
        else:
            a.discard(key)
            b.discard(key)
        assert (a.young, a.evicted, len(a)) == (b.young, b.evicted, len(b))
    assert [a.get(k) for k in range(61)] == [b.get(k) for k in range(61)]


def test_keys_in_sequence_grow_one_shard_at_a_time() -> None:
    """End-to-End-Ids and blocks of IMEIs come in sequence. Shards with even shares of them all
    reached their next table size within the same SHARDS writes: one rehash of the whole map
    (19 ms at 350k keys). Shards' uneven shares spread those growths out."""
    m: RecentMap[None] = RecentMap(2_000_000)
    sizes = [sys.getsizeof(d) for d in m._young]
    window: list[tuple[int, int]] = []  # (write, keys rehashed) of growths in the last SHARDS
    worst = 0.0  # most keys rehashed within SHARDS writes, as a share of the map
    for i in range(1, 300_001):
        m.put(35_209_900_000_000 + i, None)
        if i % 16 == 0:  # every shard's table size, sampled
            now = [sys.getsizeof(d) for d in m._young]
            window = [g for g in window if g[0] > i - SHARDS]
            window += [(i, len(d)) for d, a, b in zip(m._young, now, sizes, strict=True) if a != b]
            sizes = now
            if i >= 10_000:
                worst = max(worst, sum(n for _, n in window) / i)
    assert sum(len(d) for d in m._young) == 300_000
    assert worst <= 0.1, worst  # even shares: 1.0, the whole map at each doubling


def test_a_dropped_generation_is_freed_a_shard_at_a_time() -> None:
    m: RecentMap[None] = RecentMap(2 * 64 * 1024)  # half: 65,536 keys
    for i in range(65_536):
        m.put(i * 7919, None)
    m.put(-1, None)  # the turn: the first generation becomes old
    for i in range(65_536):
        m.put(i * 7919 + 1, None)
    m.put(-2, None)  # the second turn: the first generation is dropped
    assert len(m._dying) == SHARDS
    freed_at = []
    for i in range(65_536 // 4 + 1):
        before = len(m._dying)
        m.put(i * 7919 + 2, None)
        if len(m._dying) < before:
            freed_at.append(i)
    assert not m._dying  # all gone within a quarter of the generation's writes
    gaps = [b - a for a, b in zip(freed_at, freed_at[1:], strict=False)]
    assert min(gaps) >= 200  # never two shards freed close together


def test_forget_drops_every_key_at_once_and_frees_them_later() -> None:
    m: RecentMap[int] = RecentMap(1000)
    for i in range(700):
        m.put(i, i)
    m.forget()
    assert len(m) == 0 and all(m.get(i) is None for i in range(700))
    assert len(m._dying) >= 2 * SHARDS  # held, to be freed a shard at a time
    for i in range(700, 1400):
        m.put(i, i)
    assert m.get(1399) == 1399 and m.get(5) is None

"""RecentMap, the bounded map behind the Redis store's cache and the device-signal detector:
never more than its bound, never a stale value, and the recently written always kept."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from eir_server.recent import RecentMap

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

"""The log limiter: first line, then a count per period; bounded keys."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from eir_server.obs.ratelimit import OVERFLOW, LogLimiter


def test_first_line_then_summary() -> None:
    lim = LogLimiter(period=60)
    key = ("10.0.0.1", 3003)
    assert lim.hit(key, 0.0) == (True, 0)
    assert [lim.hit(key, t / 10) for t in range(1, 101)] == [(False, 0)] * 100
    assert lim.hit(("10.0.0.2", 3003), 1.0) == (True, 0)  # other peer: own key
    assert lim.hit((key[0], 5004), 1.0) == (True, 0)  # other code: own key
    assert lim.due(59.0) == []
    assert lim.due(60.0) == [(key, 100)]  # the periodic summary
    assert lim.due(61.0) == []
    assert lim.hit(key, 70.0) == (False, 0)
    assert lim.hit(key, 120.0) == (True, 1)  # a line after the period carries the count
    assert lim.suppressed_total == 101
    assert lim.due(200.0) == []  # quiet keys are forgotten
    assert len(lim) == 0
    lim.hit(key, 300.0)
    lim.hit(key, 301.0)
    assert lim.flush() == [(key, 1)]  # at shutdown, whatever the period


def test_keys_are_bounded() -> None:
    lim = LogLimiter(period=60, max_keys=3)
    for port in range(10_000):
        lim.hit(("10.0.0.1", port), 1.0)
    assert len(lim) == 4  # three keys and the overflow key
    assert lim.due(61.0) == [(OVERFLOW, 9_996)]


@given(st.lists(st.tuples(st.integers(0, 5), st.floats(0, 1000)), max_size=300))
def test_every_hit_is_logged_or_counted_once(hits: list[tuple[int, float]]) -> None:
    lim = LogLimiter(period=10, max_keys=4)
    logged = counted = 0
    now = 0.0
    for key, dt in hits:
        now += dt / 100
        ok, suppressed = lim.hit(key, now)
        logged += ok
        counted += suppressed
        counted += sum(n for _, n in lim.due(now))
    counted += sum(n for _, n in lim.due(now + 1e9))
    assert logged + counted == len(hits)

"""The N5g-eir fuzz harness (fuzz/harness_n5g.py, run at scale by `make fuzz` with atheris)
under hypothesis: mutated seed frames and arbitrary bytes through HPACK, an HTTP/2 server
connection and the router, with the harness's invariants (nothing raises, every byte sent is a
whole frame, nothing is answered after a connection error)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.harness_n5g import run_one
from fuzz.make_corpus import n5g_seeds

SEEDS = n5g_seeds()
SEED_DIR = Path(__file__).resolve().parents[2] / "fuzz" / "seeds_n5g"


def test_checked_in_seeds_are_current() -> None:
    assert {p.stem: p.read_bytes() for p in SEED_DIR.glob("*.bin")} == SEEDS


def test_every_seed_is_served() -> None:
    for data in SEEDS.values():
        run_one(data)


edits = st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(SEEDS)), edits, st.integers(0, 500), st.sampled_from(sorted(SEEDS)))
def test_mutated_frames(name: str, changes: list[tuple[int, int]], cut: int, tail: str) -> None:
    data = bytearray(SEEDS[name])
    for i, v in changes:
        if i < len(data):
            data[i] = v
    run_one(bytes(data[:cut]) if cut < len(data) else bytes(data) + SEEDS[tail])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes(data: bytes) -> None:
    run_one(data)

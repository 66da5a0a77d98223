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
from tests.mutations import mutated

SEEDS = n5g_seeds()
SEED_DIR = Path(__file__).resolve().parents[2] / "fuzz" / "seeds_n5g"


def test_checked_in_seeds_are_current() -> None:
    assert {p.stem: p.read_bytes() for p in SEED_DIR.glob("*.bin")} == SEEDS


def test_every_seed_is_served() -> None:
    for data in SEEDS.values():
        run_one(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(SEEDS, 400))
def test_mutated_frames(data: bytes) -> None:
    run_one(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes(data: bytes) -> None:
    run_one(data)

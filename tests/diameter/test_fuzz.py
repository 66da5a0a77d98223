"""The fuzz harness (fuzz/harness.py, run at scale by `make fuzz` with atheris) under hypothesis:
mutated real frames and arbitrary bytes through framing, both decoders, a live connection and
the S13 parse, with the harness's invariants (fast path accepts only what the decoder accepts,
every byte sent is a whole answer, nothing raises)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.harness import run_one
from fuzz.make_corpus import seeds
from tests.mutations import mutated

SEEDS = seeds()
SEED_DIR = Path(__file__).resolve().parents[2] / "fuzz" / "seeds"


def test_checked_in_seeds_are_current() -> None:
    # The corpus `make fuzz` starts from is what make_corpus.py writes.
    on_disk = {p.stem: p.read_bytes() for p in SEED_DIR.glob("*.bin")}
    assert on_disk == SEEDS


def test_every_seed_passes() -> None:
    for data in SEEDS.values():
        run_one(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(SEEDS, 600))
def test_mutated_frames(data: bytes) -> None:
    run_one(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes(data: bytes) -> None:
    run_one(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=20, max_size=300))
def test_arbitrary_bodies_behind_a_valid_header(body: bytes) -> None:
    # Random AVP bytes behind a plausible ECR header reach the AVP walkers, not just framing.
    n = 20 + len(body) - len(body) % 4
    head = bytes([1]) + n.to_bytes(3, "big") + bytes([0xC0]) + (324).to_bytes(3, "big") + \
        (16777252).to_bytes(4, "big") + b"\0\0\0\1\0\0\0\1"
    run_one(head + body[:n - 20])

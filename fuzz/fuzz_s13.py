"""Coverage-guided fuzzing (atheris, libFuzzer) of everything a peer's bytes reach: framing,
the general decoder, the fast path and its layout cache, a live connection, the S13 parse.
The invariants are in `harness.py`; any exception is a crash and libFuzzer writes the input.

    make fuzz                                   # FUZZ_SECONDS=600 by default
    .venv/bin/python fuzz/fuzz_s13.py -max_total_time=60 .fuzz-corpus fuzz/seeds
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["eir_server", "fuzz"]):
    from fuzz.harness import run_one


def main() -> None:
    atheris.Setup(sys.argv, run_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

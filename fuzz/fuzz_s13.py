"""Coverage-guided fuzzing (atheris, libFuzzer) of everything a peer's bytes reach: framing,
the general decoder, the fast path and its layout cache, a live connection, the S13 parse.
The invariants are in `harness.py`; any exception is a crash and libFuzzer writes the input.

    make fuzz                                   # FUZZ_SECONDS=600 by default
    .venv/bin/python fuzz/fuzz_s13.py -max_total_time=60 .fuzz-corpus fuzz/seeds
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz.target import fuzz  # noqa: E402

if __name__ == "__main__":
    fuzz("fuzz.harness")

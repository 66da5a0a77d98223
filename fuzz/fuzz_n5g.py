"""Coverage-guided fuzzing (atheris, libFuzzer) of what an N5g-eir consumer's bytes reach: HPACK,
the HTTP/2 server connection, the request router. Invariants in `harness_n5g.py`.

    make fuzz                                   # both targets, FUZZ_SECONDS each
    .venv/bin/python fuzz/fuzz_n5g.py -max_total_time=60 .fuzz/corpus-n5g fuzz/seeds_n5g
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz.target import fuzz  # noqa: E402

if __name__ == "__main__":
    fuzz("fuzz.harness_n5g")

"""The README is the operator's manual: every serve option must be in its table, and its two
set-up commands must exist."""

from __future__ import annotations

import re
from pathlib import Path

from eir_server.config import OPTIONS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_serve_option_is_documented() -> None:
    missing = [f.name for f in OPTIONS
               if f"--{f.name.replace('_', '-')}`" not in README
               or f"`EIR_{f.name.upper()}`" not in README]
    assert missing == []


def test_the_two_commands_exist() -> None:
    assert "make run" in README and "make test" in README
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()

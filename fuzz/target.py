"""The atheris entry point both fuzz targets share: instrument our code, import the harness
module, hand its `run_one` to libFuzzer (argv: libFuzzer's options and corpus directories)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fuzz(harness: str) -> None:
    with atheris.instrument_imports(include=["eir_server", "fuzz"]):
        run_one = importlib.import_module(harness).run_one
    atheris.Setup(sys.argv, run_one)
    atheris.Fuzz()

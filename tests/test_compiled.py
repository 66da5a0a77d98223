"""The optional mypyc build (setup.py, EIR_MYPYC=1). `make test` runs the suite on the working
tree (pure Python), then builds the extensions in a copy of the tree and runs the tests of the
request path there with EIR_EXPECT_COMPILED=1 (`make test-compiled`)."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import eir_server
from eir_server import build_kind

ROOT = Path(__file__).resolve().parents[1]
EXPECT_COMPILED = os.environ.get("EIR_EXPECT_COMPILED") == "1"


def compiled_modules() -> list[str]:
    """setup.py's COMPILED list, as module names."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    [paths] = [ast.literal_eval(n.value) for n in tree.body
               if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "COMPILED"]
    assert paths and all(p.endswith(".py") for p in paths)
    return [p.removesuffix(".py").replace("/", ".") for p in paths]


def test_every_compiled_module_is_type_checked_strictly() -> None:
    """mypyc trusts the annotations (a wrong one raises TypeError at run time), so every module
    it compiles is in `make test`'s `mypy --strict` run."""
    recipe = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    [strict] = [line for line in recipe.splitlines() if "mypy --strict" in line]
    checked = [w.removesuffix("/") for w in strict.split() if w.startswith("eir_server")]
    for name in compiled_modules():
        path = name.replace(".", "/")
        assert any(path == c.removesuffix(".py") or path.startswith(c + "/") for c in checked), (
            f"{path}.py is compiled but not in the Makefile's mypy --strict run")


def test_no_interpreted_class_extends_a_compiled_one() -> None:
    """mypyc refuses an interpreted subclass of a compiled class when it is instantiated, which
    only the compiled build would show: check it on the pure one too."""
    compiled = set(compiled_modules())
    offenders = []
    for info in pkgutil.walk_packages(eir_server.__path__, "eir_server."):
        module = importlib.import_module(info.name)
        if info.name in compiled:
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != info.name:
                continue
            for base in cls.__mro__[1:]:
                if base.__module__ in compiled:
                    offenders.append(f"{cls.__module__}.{cls.__qualname__} < "
                                     f"{base.__module__}.{base.__qualname__}")
    assert not offenders, offenders
    assert len(compiled) > 20


def test_the_build_under_test_is_the_one_expected() -> None:
    """With EIR_EXPECT_COMPILED=1 every listed module is an extension; otherwise none is (a
    stray in-place build would shadow the sources and every edit to them)."""
    for name in compiled_modules():
        where = importlib.import_module(name).__file__ or ""
        assert where.endswith(tuple(EXTENSION_SUFFIXES)) is EXPECT_COMPILED, where
    assert build_kind() == ("mypyc" if EXPECT_COMPILED else "python")


def test_code_that_branches_on_the_build_knows_which_runs() -> None:
    """`imei._check_digit` has a branch for each build (each the faster there); the property
    tests of tests/policy/test_imei.py then cover the one this build takes."""
    from eir_server.policy import imei

    assert imei._COMPILED is EXPECT_COMPILED


def test_the_cli_says_which_build_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "eir_server.cli", "--version"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert re.fullmatch(rf"eir-server {re.escape(eir_server.__version__)} \((mypyc|python)\)\n",
                        out), out
    assert f"({build_kind()})" in out

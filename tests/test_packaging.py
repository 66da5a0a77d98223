"""What `pip install .` ships: every package, and the Diameter dictionaries as package data
(found without the source tree)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "eir_server").rglob("__init__.py")}
    assert listed == found | {"eir_server.dictionaries"}


def test_wheel_carries_the_dictionaries_and_loads_them(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(ROOT), "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("eir_server-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(site)
    for f in ("base_rfc6733.xml", "s13_ts29272.xml", "drmp_rfc7944.xml", "doic_rfc7683.xml"):
        assert f"eir_server/dictionaries/{f}" in names
    # Outside the source tree, the installed copy is what gets loaded.
    out = subprocess.run(
        [sys.executable, "-c",
         "import sys; sys.path.insert(0, sys.argv[1]); "
         "from eir_server.diameter.dictionary import DEFAULT_DIR, load_dictionary; "
         "print(DEFAULT_DIR); print(len(load_dictionary().avps))", str(site)],
        cwd=tmp_path, capture_output=True, text=True, check=True, timeout=60)
    where, count = out.stdout.split()
    assert Path(where) == site / "eir_server" / "dictionaries"
    assert int(count) > 60

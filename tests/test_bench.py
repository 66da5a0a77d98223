"""The benchmark suite: a smoke run proves every suite starts and writes a well-formed report on
tiny inputs (no figure is judged: benchmarks never run in the test suite), --compare reads two
reports, and the README's performance table is exactly the committed results file's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "latest.json"
sys.path.insert(0, str(ROOT))

from benchmarks import suite  # noqa: E402


def check_report(res: dict, names: list[str]) -> None:
    assert set(res["suites"]) == set(names)
    m = res["machine"]
    for key in ("cpu", "cores", "python", "uvloop", "redis"):
        assert m[key], key
    for name, s in res["suites"].items():
        assert s["status"] in ("ok", "skipped"), (name, s)
        if s["status"] == "skipped":
            assert s["reason"], name
            continue
        assert s["figures"], name
        for key, fig in s["figures"].items():
            assert key.startswith(name + ".")
            assert set(fig) >= {"value", "unit", "better", "label"}, key
            assert fig["value"] is None or isinstance(fig["value"], int | float), key


@pytest.mark.timeout(600)
def test_smoke_every_suite(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--profile", "smoke",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=590)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    res = json.loads(out.read_text())
    check_report(res, list(suite.SUITES))
    # The suites this machine has every tool for really ran (CI installs Erlang and Redis).
    for name in ("codec", "policy", "ecr", "otp", "register", "during_load", "storm"):
        assert res["suites"][name]["status"] == "ok", name
    e = res["suites"]["ecr"]["figures"]
    assert e["ecr.memory.w1.closed.errors"]["value"] == 0
    assert e["ecr.memory.w1.closed.answers_per_s"]["value"] > 0
    assert out.with_suffix(".md").read_text().startswith("Profile `smoke`")
    for png in res["plots"]:
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG", png
    assert {"ecr.png", "otp.png", "during_load.png", "storm.png"} <= set(res["plots"])
    cmp = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--compare", str(out),
                          str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert cmp.returncode == 0, cmp.stderr
    assert "ecr.memory.w1.closed.answers_per_s" in cmp.stdout and "+0.0 %" in cmp.stdout


def test_compare_says_better_or_worse():
    def res(v: float) -> dict:
        return {"suites": {"ecr": {"figures": {
            "ecr.x.answers_per_s": {"value": v, "unit": "/s", "better": "higher", "label": ""},
            "ecr.x.p99_ms": {"value": 10 / v, "unit": "ms", "better": "lower", "label": ""}}}}}

    text = suite.compare(res(100.0), res(150.0))
    lines = {ln.split()[0]: ln for ln in text.splitlines()[1:]}
    assert "+50.0 % better" in lines["ecr.x.answers_per_s"]
    assert "-33.3 % better" in lines["ecr.x.p99_ms"]
    text = suite.compare(res(150.0), res(100.0))
    assert "-33.3 % worse" in text and "+50.0 % worse" in text


def test_readme_table_is_the_results_file():
    res = json.loads(RESULTS.read_text())
    check_report(res, list(suite.SUITES))
    readme = (ROOT / "README.md").read_text()
    a = readme.index(suite.README_BEGIN)
    b = readme.index(suite.README_END) + len(suite.README_END)
    assert readme[a:b] == suite.readme_section(res), (
        "README performance table differs from benchmarks/results/latest.json: run "
        "`make bench` (or `python -m benchmarks.suite ... --readme`) instead of editing it")
    assert RESULTS.with_suffix(".md").read_text() == suite.markdown(res)
    for png in res["plots"]:
        assert (RESULTS.parent / png).is_file(), png
    # Every target the suite defines is shown next to its figure.
    shown = [f for s in res["suites"].values() for f in s["figures"].values() if "target" in f]
    assert shown and all(f"| {suite.target_text(f)} |" in readme for f in shown)

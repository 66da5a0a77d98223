"""The benchmark suite: a smoke run proves every suite starts and writes a well-formed report on
tiny inputs (no figure is judged: benchmarks never run in the test suite), naming the build it
measured, --compare reads two reports, and the README's performance table is exactly the
committed results file's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "latest.json"
sys.path.insert(0, str(ROOT))
# The build of this tree, as tests/test_compiled.py has it (make test-compiled sets it there).
BUILD = "mypyc" if os.environ.get("EIR_EXPECT_COMPILED") == "1" else "python"
OTHER_BUILD = {"mypyc": "python", "python": "mypyc"}[BUILD]

from benchmarks import suite  # noqa: E402


def check_report(res: dict, names: list[str]) -> None:
    assert set(res["suites"]) == set(names)
    assert res["build"] in suite.BUILD_TEXT
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
    assert res["build"] == BUILD
    assert res["eir_server_version"].endswith(f" ({BUILD})")
    # The suites this machine has every tool for really ran (CI installs Erlang and Redis).
    for name in ("codec", "policy", "ecr", "otp", "register", "during_load", "storm"):
        assert res["suites"][name]["status"] == "ok", name
    e = res["suites"]["ecr"]["figures"]
    assert e["ecr.memory.w1.closed.errors"]["value"] == 0
    assert e["ecr.memory.w1.closed.answers_per_s"]["value"] > 0
    assert out.with_suffix(".md").read_text().startswith(
        f"Profile `smoke`, {suite.BUILD_TEXT[BUILD]}, ")
    for png in res["plots"]:
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG", png
    assert {"ecr.png", "otp.png", "during_load.png", "storm.png"} <= set(res["plots"])
    cmp = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--compare", str(out),
                          str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert cmp.returncode == 0, cmp.stderr
    assert "ecr.memory.w1.closed.answers_per_s" in cmp.stdout and "+0.0 %" in cmp.stdout
    assert "different builds" not in cmp.stdout


def test_a_run_meant_for_the_other_build_records_nothing(tmp_path):
    """`make bench COMPILED=1` passes --expect-build mypyc: were the suite to run the sources
    (or the reverse), it must stop before measuring rather than file figures under a wrong
    build."""
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--profile", "smoke",
                        "--suite", "codec", "--expect-build", OTHER_BUILD, "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert f"measuring the {OTHER_BUILD} build" in p.stderr, p.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_server_of_the_wrong_build_is_refused():
    """What a started server has loaded is checked, not only what its command says."""
    server = suite.Server()
    try:
        assert suite.process_build(server.proc.pid) == server.build == BUILD
    finally:
        server.stop()

    def children() -> set[int]:
        return set(suite._tree_stats(os.getpid())) - {os.getpid()}

    before = children()
    with pytest.raises(suite.BuildMismatch, match=f"runs {BUILD}"):
        suite.Server(expect=OTHER_BUILD)
    assert children() == before  # the refused server was stopped


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
    assert "build" not in text


def test_compare_says_when_the_builds_differ():
    def res(build: str | None) -> dict:
        r: dict = {"suites": {"codec": {"figures": {"codec.x_us": {
            "value": 1.0, "unit": "µs", "better": "lower", "label": ""}}}}}
        if build is not None:
            r["build"] = build
        return r

    text = suite.compare(res("python"), res("mypyc"))
    assert text.splitlines()[0] == ("different builds: old pure-Python build, "
                                    "new compiled (mypyc) build")
    assert "build not recorded" in suite.compare(res(None), res("python"))
    assert "different builds" not in suite.compare(res("mypyc"), res("mypyc"))


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


def test_a_failed_suite_leaves_the_readme_alone(tmp_path, monkeypatch, capsys):
    """A run where a suite failed exits 1 and does not replace the README's recorded table
    with its failure row (it did: a crash in one suite overwrote the whole table)."""
    def boom(ctx: suite.Ctx, f: suite.Figures) -> None:
        raise RuntimeError("broken suite")

    monkeypatch.setattr(suite, "SUITES", {"codec": boom})
    monkeypatch.setattr(suite, "check_build", lambda expect: ("python", "eir-server (python)"))
    readme = tmp_path / "README.md"
    before = f"# x\n{suite.README_BEGIN}\nrecorded table\n{suite.README_END}\n"
    readme.write_text(before)
    out = suite.readme_results(readme)
    assert suite.main(["--profile", "smoke", "--out", str(out), "--readme", str(readme)]) == 1
    assert readme.read_text() == before
    assert "not updating the README: codec failed" in capsys.readouterr().err
    # Nor does it replace the results file the table shows: its results go beside it.
    assert not out.exists()
    staged = out.parent / suite.UNRECORDED / out.name
    assert json.loads(staged.read_text())["suites"]["codec"]["status"] == "failed"


def test_only_a_whole_run_replaces_the_recorded_results(tmp_path, monkeypatch, capsys):
    """`make bench SUITES=otp` (or a suite run without --readme) once overwrote the
    latest.json the README's table shows, and the table no longer matched its file."""
    def codec(ctx: suite.Ctx, f: suite.Figures) -> None:
        f.add("x_us", 1.0, "µs", "lower", "a figure")

    def policy(ctx: suite.Ctx, f: suite.Figures) -> None:
        f.add("y_us", 2.0, "µs", "lower", "another figure")

    monkeypatch.setattr(suite, "SUITES", {"codec": codec, "policy": policy})
    monkeypatch.setattr(suite, "check_build", lambda expect: ("python", "eir-server (python)"))
    monkeypatch.setattr(suite, "ROOT", tmp_path)  # whose README a run without --readme means
    readme = tmp_path / "README.md"
    before = f"# x\n{suite.README_BEGIN}\nrecorded table\n{suite.README_END}\n"
    readme.write_text(before)
    out = suite.readme_results(readme)
    staged = out.parent / suite.UNRECORDED / out.name
    for argv in (["--suite", "codec", "--readme", str(readme)], []):  # partial; no --readme
        assert suite.main(["--profile", "smoke", "--out", str(out), *argv]) == 0
        assert not out.exists() and readme.read_text() == before
        assert set(json.loads(staged.read_text())["suites"]) == (
            {"codec"} if argv else {"codec", "policy"})
    assert "results in " in capsys.readouterr().err
    assert suite.main(["--profile", "smoke", "--out", str(out), "--readme", str(readme)]) == 0
    res = json.loads(out.read_text())
    assert set(res["suites"]) == {"codec", "policy"} and not staged.parent.exists()
    assert out.with_suffix(".md").read_text() == suite.markdown(res)
    assert suite.readme_section(res) in readme.read_text()

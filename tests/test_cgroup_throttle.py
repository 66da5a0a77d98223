"""The overload tick's reading of the cgroup's throttled time (a file kept open, re-found)."""

from __future__ import annotations

from pathlib import Path

from eir_server.io.diameter_server import CgroupThrottle, _cgroup_cpu_stat


def _stat(path: Path, usec: int) -> None:
    path.write_text(f"usage_usec 123\nnr_throttled 4\nthrottled_usec {usec}\nnr_bursts 0\n")


def test_reads_the_open_file_again_each_time_and_finds_it_again(tmp_path: Path) -> None:
    now = [0.0]
    where = [tmp_path / "a.stat"]
    _stat(where[0], 2_500_000)
    t = CgroupThrottle(clock=lambda: now[0],
                       locate=lambda: (str(where[0]), b"throttled_usec", 1e-6))
    assert t.seconds() == 2.5
    _stat(where[0], 3_000_000)  # rewritten in place: the open file shows it
    assert t.seconds() == 3.0
    where[0] = tmp_path / "b.stat"  # moved to another cgroup
    _stat(where[0], 7_000_000)
    assert t.seconds() == 3.0  # not looked up again yet
    now[0] += CgroupThrottle.RESOLVE_EVERY
    assert t.seconds() == 7.0
    t.close()


def test_no_cgroup_file_is_zero(tmp_path: Path) -> None:
    assert CgroupThrottle(locate=lambda: None).seconds() == 0.0
    gone = CgroupThrottle(locate=lambda: (str(tmp_path / "none"), b"throttled_usec", 1e-6))
    assert gone.seconds() == 0.0
    (tmp_path / "odd").write_text("nr_throttled_usec 5\n")  # a key that only ends like ours
    odd = CgroupThrottle(locate=lambda: (str(tmp_path / "odd"), b"throttled_usec", 1e-6))
    assert odd.seconds() == 0.0
    odd.close()


def test_this_process_reads_what_its_cgroup_file_says() -> None:
    found = _cgroup_cpu_stat()
    t = CgroupThrottle()
    got = t.seconds()
    t.close()
    if found is None:
        assert got == 0.0
        return
    path, key, scale = found
    try:
        text = Path(path).read_text()
    except OSError:
        assert got == 0.0
        return
    values = [int(v) for k, _, v in (row.partition(" ") for row in text.splitlines())
              if k == key.decode()]
    # throttled time only grows: what we read first is at most what the file says now
    assert values and 0.0 <= got <= values[0] * scale


def test_the_key_is_found_after_a_longer_one(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("nr_throttled_usec 5\nthrottled_usec 9000000\n")
    t = CgroupThrottle(locate=lambda: (str(tmp_path / "s"), b"throttled_usec", 1e-6))
    assert t.seconds() == 9.0
    t.close()

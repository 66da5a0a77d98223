"""The CPU quota a worker reads from its cgroup, to tell a throttled loop from an idle one
(eir_server.io.diameter_server: _quota_share, CgroupThrottle.share): the files as the kernel
writes them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from eir_server.io.diameter_server import CgroupThrottle, _quota_share


@pytest.mark.parametrize(("cpu_max", "share"), [
    ("25000 100000\n", 0.25), ("2500 10000\n", 0.25), ("150000 100000\n", 1.5),
    ("max 100000\n", math.inf)])
def test_cgroup_v2_cpu_max(tmp_path: Path, cpu_max: str, share: float) -> None:
    (tmp_path / "cpu.max").write_text(cpu_max)
    assert _quota_share(str(tmp_path), v2=True) == share


@pytest.mark.parametrize(("quota", "period", "share"), [
    ("2500\n", "10000\n", 0.25), ("50000\n", "100000\n", 0.5), ("-1\n", "100000\n", math.inf)])
def test_cgroup_v1_cfs_quota(tmp_path: Path, quota: str, period: str, share: float) -> None:
    (tmp_path / "cpu.cfs_quota_us").write_text(quota)
    (tmp_path / "cpu.cfs_period_us").write_text(period)
    assert _quota_share(str(tmp_path), v2=False) == share


def test_no_quota_file_or_garbage_is_no_quota(tmp_path: Path) -> None:
    assert _quota_share(str(tmp_path), v2=True) == math.inf
    assert _quota_share(str(tmp_path), v2=False) == math.inf
    (tmp_path / "cpu.max").write_text("garbage\n")
    assert _quota_share(str(tmp_path), v2=True) == math.inf
    (tmp_path / "cpu.cfs_quota_us").write_text("1000\n")
    (tmp_path / "cpu.cfs_period_us").write_text("0\n")
    assert _quota_share(str(tmp_path), v2=False) == math.inf


def test_the_share_is_read_with_the_stat_file_and_again_when_it_moves(tmp_path: Path) -> None:
    now = [0.0]
    a, b = tmp_path / "a", tmp_path / "b"
    for d, cpu_max in ((a, "25000 100000\n"), (b, "max 100000\n")):
        d.mkdir()
        (d / "cpu.stat").write_text("usage_usec 1\nthrottled_usec 2000000\n")
        (d / "cpu.max").write_text(cpu_max)
    where = [a]
    t = CgroupThrottle(clock=lambda: now[0],
                       locate=lambda: (str(where[0] / "cpu.stat"), b"throttled_usec", 1e-6))
    assert t.seconds() == 2.0 and t.share == 0.25
    where[0] = b  # moved to a cgroup without a quota
    now[0] += CgroupThrottle.RESOLVE_EVERY
    assert t.seconds() == 2.0 and t.share == math.inf
    t.close()
    assert CgroupThrottle(locate=lambda: None).share == math.inf

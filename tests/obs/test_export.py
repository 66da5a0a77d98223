from __future__ import annotations

import argparse
import csv
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from eir_server.obs.audit import AuditRecorder, JsonlDirSink, RedisStreamSink
from eir_server.obs.export import add_export_parser, parse_time, run_export
from eir_server.obs.metrics import Metrics
from eir_server.policy.types import CheckRequest, EquipmentStatus, Verdict

WHITE = Verdict(EquipmentStatus.WHITELISTED, "default")
DAY1 = 1_714_521_600.0  # 2024-05-01T00:00:00Z
DAY2 = DAY1 + 86400


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eir-server")
    add_export_parser(p.add_subparsers(dest="command"))
    return p


def checks() -> list[tuple[float, CheckRequest, str]]:
    a = CheckRequest("35000000000001", "07", "001010000000001", "15550001")
    return [
        (DAY1 - 5, CheckRequest("35000000000009", None, "001010000000009"), "s13"),  # before
        (DAY1 + 10, a, "s13"),
        (DAY1 + 20, a, "s13"),  # same triplet, same day: one row
        (DAY1 + 30, CheckRequest("35000000000002", None, "001010000000002"), "s13"),
        (DAY1 + 40, CheckRequest("3500000000000310", None, "001010000000003"), "n5g_eir"),
        (DAY1 + 50, CheckRequest("35000000000004"), "s13"),  # no IMSI: skipped
        (DAY2 + 10, a, "s13"),  # same triplet, next day: another row
        (DAY2 + 86400 + 5, a, "s13"),  # after --until
    ]


EXPECTED = [
    ["date", "imei", "imsi", "msisdn", "rat"],
    ["20240501", "35000000000001", "001010000000001", "15550001", "006"],
    ["20240501", "35000000000002", "001010000000002", "", "006"],
    ["20240501", "35000000000003", "001010000000003", "", ""],
    ["20240502", "35000000000001", "001010000000001", "15550001", "006"],
]


async def record_all(sink: object) -> None:
    rec = AuditRecorder(Metrics(), sink)  # type: ignore[arg-type]
    for when, r, iface in checks():
        rec.record(when, r, WHITE, "mme1", iface)
    await rec.flush()


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


async def test_export_from_redis_stream(obs_redis, obs_redis_url: str, tmp_path: Path, capsys) -> None:
    # Stream ids are write times, so these checks happen "now" as they would in production.
    now = time.time()
    a = CheckRequest("35000000000001", "07", "001010000000001", "15550001")
    client = aioredis.Redis.from_url(obs_redis_url)
    rec = AuditRecorder(Metrics(), RedisStreamSink(client, "eir:audit"))
    rec.record(now - 7200, CheckRequest("35000000000009", None, "001010000000009"), WHITE, "m", "s13")
    rec.record(now - 60, a, WHITE, "mme1", "s13")
    rec.record(now - 50, a, WHITE, "mme1", "s13")
    rec.record(now - 40, CheckRequest("3500000000000310", None, "001010000000003"), WHITE, "amf", "n5g_eir")
    rec.record(now - 30, CheckRequest("35000000000004"), WHITE, "mme1", "s13")
    await rec.flush()
    await client.aclose()
    out = tmp_path / "dump.csv"
    args = parser().parse_args(
        ["export", "--since", "1h", "--format", "csv", "--store", obs_redis_url, "-o", str(out)]
    )
    assert args.func is run_export
    assert run_export(args) == 0

    def day(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).strftime("%Y%m%d")

    assert read_csv(out) == [
        ["date", "imei", "imsi", "msisdn", "rat"],
        [day(now - 60), "35000000000001", "001010000000001", "15550001", "006"],
        [day(now - 40), "35000000000003", "001010000000003", "", ""],
    ]
    assert "2 rows to " in (err := capsys.readouterr().err) and "1 checks without IMSI" in err


async def test_export_dedupes_per_day_and_filters_by_time(tmp_path: Path, capsys) -> None:
    await record_all(JsonlDirSink(str(tmp_path / "audit"), keep_days=100_000))
    out = tmp_path / "dump.csv"
    args = parser().parse_args(
        ["export", "--since", "2024-05-01", "--until", "20240503", "--format", "csv",
         "--audit-dir", str(tmp_path / "audit"), "-o", str(out)]
    )
    assert run_export(args) == 0
    assert read_csv(out) == EXPECTED
    assert "4 rows to " in (err := capsys.readouterr().err) and "1 checks without IMSI" in err


async def test_export_from_audit_dir_with_rat_override(tmp_path: Path) -> None:
    await record_all(JsonlDirSink(str(tmp_path / "audit"), keep_days=100_000))
    out = tmp_path / "dump.csv"
    args = parser().parse_args(
        ["export", "--since", "2024-05-01T00:00:00Z", "--until", "2024-05-03",
         "--audit-dir", str(tmp_path / "audit"), "--rat", "s13=001|006", "--rat",
         "n5g_eir=006", "-o", str(out)]
    )
    assert run_export(args) == 0
    got = read_csv(out)
    assert [row[4] for row in got[1:]] == ["001|006", "001|006", "006", "001|006"]
    assert [row[:4] for row in got] == [row[:4] for row in EXPECTED]


def test_export_without_a_readable_source_fails_cleanly(capsys) -> None:
    args = parser().parse_args(["export", "--since", "7d", "--store", "memory://"])
    assert run_export(args) == 2
    assert "needs --store redis://" in capsys.readouterr().err


def test_export_reports_unreachable_redis(capsys) -> None:
    args = parser().parse_args(["export", "--since", "1d", "--store", "redis://127.0.0.1:1/0"])
    assert run_export(args) == 1
    assert "ConnectionError" in capsys.readouterr().err


def test_parse_time_forms() -> None:
    assert parse_time("20240501") == DAY1
    assert parse_time("2024-05-01") == DAY1
    assert parse_time("2024-05-01T02:00:00+02:00") == DAY1
    assert parse_time(str(int(DAY1))) == DAY1
    assert parse_time("2d", now=DAY2 + 86400) == DAY1
    assert parse_time("90m", now=DAY1 + 5400) == DAY1
    with pytest.raises(argparse.ArgumentTypeError):
        parse_time("yesterday")

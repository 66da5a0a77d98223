"""`eir-server export` against what DIRBS Core's operator import accepts.

The rules below restate DIRBS-Core's etc/schema/OperatorImportSchema_v2.csvs (5 columns,
header names case-insensitive; date YYYYMMDD from 2000; imei 1-16 hex digits or * #; imsi and
msisdn 1-15 digits, optional; rat '|'-separated codes 001-007 or 101-105, optional) and its
importer's file checks (importer_utils: `<operator>_<YYYYMMDD>_<YYYYMMDD>.zip`, start <= end,
end not in the future, exactly one member named like the zip; every row's date inside the
file name's range)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import re
import stat
import time
import zipfile
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
import structlog

from eir_server.obs.audit import AuditRecorder, DeviceChangeDetector, JsonlDirSink, make_sink
from eir_server.obs.export import add_export_parser, run_export
from eir_server.obs.metrics import Metrics
from eir_server.policy.types import CheckRequest, EquipmentStatus, Verdict

WHITE = Verdict(EquipmentStatus.WHITELISTED, "default")
DAY1 = 1_714_521_600.0  # 2024-05-01T00:00:00Z

DIRBS_DATE = re.compile(r"^(20[0-9]{2}((0[13578]|1[02])31|(01|0[3-9]|1[0-2])(29|30)|"
                        r"(0[1-9]|1[0-2])(0[1-9]|1[0-9]|2[0-8]))|20([02468][048]|[13579][26])0229)$")
DIRBS_IMEI = re.compile(r"^[0-9A-Fa-f\*\#]{1,16}$")
DIRBS_DIGITS = re.compile(r"^[0-9]{1,15}$")
DIRBS_RAT = re.compile(r"^(00[1-7]|10[1-5])(\|(00[1-7]|10[1-5]))*$")
DIRBS_NAME = re.compile(r"^(?P<op>.+)_(?P<start>\d{8})_(?P<end>\d{8})$")


def dirbs_accepts(zip_path: Path) -> list[dict[str, str]]:
    """What the DIRBS operator import would check, as the schema and importer state it."""
    base = zip_path.name.removesuffix(".zip")
    assert zip_path.name.endswith(".zip")
    m = DIRBS_NAME.match(base)
    assert m, zip_path.name
    start = datetime.strptime(m["start"], "%Y%m%d").date()
    end = datetime.strptime(m["end"], "%Y%m%d").date()
    assert start <= end <= date.today()
    with zipfile.ZipFile(zip_path) as zf:
        [member] = zf.namelist()
        assert Path(member).name == base + ".csv"
        text = zf.read(member).decode()
    rows = list(csv.reader(io.StringIO(text)))
    assert [h.lower() for h in rows[0]] == ["date", "imei", "imsi", "msisdn", "rat"]
    out = []
    for row in rows[1:]:
        assert len(row) == 5, row
        d, imei, imsi, msisdn, rat = row
        assert DIRBS_DATE.match(d), row
        assert start <= datetime.strptime(d, "%Y%m%d").date() <= end, row
        assert not imei or DIRBS_IMEI.match(imei), row
        assert not imsi or DIRBS_DIGITS.match(imsi), row
        assert not msisdn or DIRBS_DIGITS.match(msisdn), row
        assert not rat or DIRBS_RAT.match(rat), row
        out.append(dict(zip(("date", "imei", "imsi", "msisdn", "rat"), row, strict=True)))
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eir-server")
    add_export_parser(p.add_subparsers(dest="command"))
    return p


async def record(sink: object, checks: list[tuple[float, CheckRequest, str]]) -> None:
    rec = AuditRecorder(Metrics(), sink)  # type: ignore[arg-type]
    for when, r, iface in checks:
        rec.record(when, r, WHITE, "mme1", iface)
    await rec.flush()


CHECKS = [
    (DAY1 + 10, CheckRequest("35209900176148", "07", "001010000000001", "+15550001"), "s13"),
    (DAY1 + 20, CheckRequest("35209900176155", None, "001010000000002"), "s13"),
    (DAY1 + 30, CheckRequest("3520990017616210", None, "001010000000003"), "n5g_eir"),
    (DAY1 + 40, CheckRequest("35209900176171", None, "00101abc"), "s13"),  # IMSI DIRBS refuses
    (DAY1 + 86400 + 5, CheckRequest("35209900176148", None, "001010000000001", "15550001"),
     "s13"),
]


def _zip_export(tmp_path: Path, until: str) -> Path:
    """`eir-server export --format zip --operator op1` of tmp_path/audit from 2024-05-01 up to
    `until`: the one file it writes."""
    out = tmp_path / "out"
    out.mkdir()
    args = parser().parse_args(
        ["export", "--since", "2024-05-01", "--until", until, "--format", "zip",
         "--operator", "op1", "--audit-dir", str(tmp_path / "audit"), "-o", str(out)])
    assert run_export(args) == 0
    [z] = out.iterdir()
    return z


async def test_zip_export_is_what_the_dirbs_operator_import_accepts(tmp_path: Path,
                                                                   capsys) -> None:
    await record(JsonlDirSink(str(tmp_path / "audit"), keep_days=100_000), CHECKS)
    z = _zip_export(tmp_path, "2024-05-03")
    assert z.name == "op1_20240501_20240502.zip"
    rows = dirbs_accepts(z)
    assert rows == [
        {"date": "20240501", "imei": "35209900176148", "imsi": "001010000000001",
         "msisdn": "15550001", "rat": "006"},  # E-UTRAN; MSISDN as carried, digits only
        {"date": "20240501", "imei": "35209900176155", "imsi": "001010000000002",
         "msisdn": "", "rat": "006"},
        {"date": "20240501", "imei": "35209900176162", "imsi": "001010000000003",
         "msisdn": "", "rat": ""},  # N5g-eir: DIRBS has no NR code
        {"date": "20240502", "imei": "35209900176148", "imsi": "001010000000001",
         "msisdn": "15550001", "rat": "006"},
    ]
    assert "1 with values DIRBS refuses skipped" in capsys.readouterr().err


async def test_export_writes_the_14_digit_imei(tmp_path: Path) -> None:
    """docs/operations.md: the dump's IMEI is the 14-digit IMEI. The audit keeps a 15-digit
    IMEI as received (check digit); with it exported as such, one device seen with and
    without its check digit became two devices in DIRBS's pairing data."""
    await record(JsonlDirSink(str(tmp_path / "audit"), keep_days=100_000), [
        (DAY1 + 10, CheckRequest("352099001761481", None, "001010000000001"), "s13"),
        (DAY1 + 20, CheckRequest("35209900176148", None, "001010000000001"), "s13"),
        (DAY1 + 30, CheckRequest("490154203237518", None, "001010000000002"), "s13"),
    ])
    # a row another writer stored with a 16-digit IMEISV as its IMEI
    [f] = (tmp_path / "audit").iterdir()
    with f.open("a") as out:
        out.write(json.dumps({"t": f"{DAY1 + 40:.3f}", "imei": "4901542032375107",
                              "imsi": "001010000000003", "interface": "s13"}) + "\n")
    z = _zip_export(tmp_path, "2024-05-02")
    assert [(r["imei"], r["imsi"]) for r in dirbs_accepts(z)] == [
        ("35209900176148", "001010000000001"),  # one row for the 15- and 14-digit sightings
        ("49015420323751", "001010000000002"),
        ("49015420323751", "001010000000003"),
    ]


async def test_zip_naming_and_options_are_checked(tmp_path: Path, capsys) -> None:
    await record(JsonlDirSink(str(tmp_path / "audit"), keep_days=100_000), CHECKS[:1])
    base = ["export", "--since", "2024-05-01", "--until", "2024-05-02", "--audit-dir",
            str(tmp_path / "audit")]
    for extra in (["--format", "zip"],  # no operator
                  ["--format", "zip", "--operator", "Op1"],  # DIRBS wants lower case
                  ["--format", "zip", "--operator", "op1", "-o", str(tmp_path / "dump.zip")],
                  ["--rat", "s13=4G"], ["--rat", "s13=008"]):
        assert run_export(parser().parse_args(base + extra)) == 2, extra
    good = tmp_path / "op1_20240501_20240501.zip"
    assert run_export(parser().parse_args(
        base + ["--format", "zip", "--operator", "op1", "-o", str(good), "--rat",
                "s13=001|006"])) == 0
    assert [r["rat"] for r in dirbs_accepts(good)] == ["001|006"]
    # a range reaching into the future ends today: DIRBS refuses end dates after today
    assert run_export(parser().parse_args(
        ["export", "--since", "1d", "--until", str(int(time.time()) + 5 * 86400), "--format",
         "zip", "--operator", "op1", "--audit-dir", str(tmp_path / "audit"), "-o",
         str(tmp_path)])) == 0
    today = datetime.now(UTC).strftime("%Y%m%d")
    assert any(p.name.endswith(f"_{today}.zip") for p in tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["sentinel", "cluster"])
async def test_export_from_sentinel_and_cluster_stores(kind: str, request, tmp_path: Path) -> None:
    url = request.getfixturevalue("redis_sentinel" if kind == "sentinel" else "redis_cluster_url")
    stream = f"eir:audit:test:{kind}:{time.time_ns()}"
    now = time.time()
    sink = make_sink(url, stream=stream)  # what serve's --audit on builds for this store
    await record(sink, [(now - 30, CheckRequest("35209900176148", None, "001010000000001",
                                                 "15550001"), "s13")])
    await sink.redis.aclose()  # type: ignore[attr-defined]
    out = tmp_path / "out"
    out.mkdir()
    assert run_export(parser().parse_args(
        ["export", "--since", "1h", "--format", "zip", "--operator", "op1", "--store", url,
         "--stream", stream, "-o", str(out)])) == 0
    [z] = out.iterdir()
    rows = dirbs_accepts(z)
    assert [(r["imei"], r["msisdn"], r["rat"]) for r in rows] == [
        ("35209900176148", "15550001", "006")]


async def test_audit_files_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        await record(JsonlDirSink(str(tmp_path / "audit"), keep_days=100_000), CHECKS[:1])
    finally:
        os.umask(old)
    [f] = (tmp_path / "audit").iterdir()
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "audit").stat().st_mode) == 0o700


@pytest.mark.parametrize("identities", [False, True])
def test_device_signal_lines_carry_identities_only_when_asked(identities: bool) -> None:
    d = DeviceChangeDetector(Metrics(), max_imsis=1, log_identities=identities)
    with structlog.testing.capture_logs() as logs:
        d.observe(DAY1, "35209900176148", "001010000000001")
        d.observe(DAY1 + 1, "35209900176148", "001010000000002")
    [line] = [x for x in logs if x["event"] == "device_signal"]
    assert line["log_level"] == "info"
    if identities:
        assert line["imei"] == "35209900176148" and line["imsi"] == "001010000000002"
    else:
        assert line["imei"] == "35209900******" and line["imsi"] == "00101**********"
        assert "176148" not in str(line) and "0000000002" not in str(line)
    logging.getLogger().handlers[:]  # noqa: B018 - nothing else to clean up

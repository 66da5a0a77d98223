"""`eir-server export`: the (IMEI, IMSI, MSISDN) triplets seen, as a DIRBS operator data dump.

What DIRBS Core's operator import accepts (its OperatorImportSchema_v2 and importer):
- CSV, 5 columns, header `date,imei,imsi,msisdn,rat`; date YYYYMMDD (UTC day of the check);
  imei 1-16 hex digits (we write the 14-digit IMEI); imsi and msisdn 1-15 digits (MSISDN
  written when the request carried one, digits only); rat a `|`-separated list of 3GPP RAT
  codes 001-007 or 101-105: S13 answers MMEs, so E-UTRAN `006` by default; DIRBS has no NR
  code, so N5g-eir rows carry an empty rat unless `--rat n5g_eir=CODE` says otherwise.
- `--format zip --operator ID`: `<ID>_<YYYYMMDD>_<YYYYMMDD>.zip` (first and last day of the
  data, the last not in the future) holding exactly one `<same name>.csv`.
One row per distinct (date, imei, imsi, msisdn, rat); rows by date, then first-seen order.
Checks without an IMSI, or with a value DIRBS would refuse, are skipped and counted on stderr.

Source: the audit Redis Stream of `--store` (redis://, rediss://, unix://, redis+sentinel://,
redis+cluster://; default $EIR_STORE), or the daily files of `--audit-dir` (EIR_AUDIT_DIR)
written when the store is embedded.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
import time
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

from eir_server.obs.audit import DEFAULT_STREAM, Row

# 3GPP RAT-Type codes as DIRBS numbers them: 006 E-UTRAN (the MMEs S13 serves); none for NR.
DEFAULT_RAT = {"s13": "006", "n5g_eir": ""}
RAT_RE = re.compile(r"(00[1-7]|10[1-5])(\|(00[1-7]|10[1-5]))*")
IMEI_RE = re.compile(r"[0-9A-Fa-f*#]{1,16}")
DIGITS15_RE = re.compile(r"[0-9]{1,15}")
OPERATOR_RE = re.compile(r"[a-z0-9][a-z0-9-]*")
HEADER = ("date", "imei", "imsi", "msisdn", "rat")
_RELATIVE = re.compile(r"^(\d+)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, *, now: float | None = None) -> float:
    """Unix seconds from: 7d / 24h / 30m (ago), unix seconds, YYYYMMDD, or ISO 8601 (UTC if no
    offset)."""
    text = text.strip()
    m = _RELATIVE.match(text)
    if m:
        base = time.time() if now is None else now
        return base - int(m.group(1)) * _UNIT_S[m.group(2)]
    if re.fullmatch(r"\d{8}", text):
        return datetime.strptime(text, "%Y%m%d").replace(tzinfo=UTC).timestamp()
    if re.fullmatch(r"\d{9,}(\.\d+)?", text):
        return float(text)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"cannot read time {text!r} (use 2024-05-01, 20240501, 2024-05-01T10:00Z, 7d)"
        ) from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def _rat_map(pairs: list[str] | None) -> dict[str, str]:
    rat = dict(DEFAULT_RAT)
    for pair in pairs or ():
        iface, sep, value = pair.partition("=")
        if not sep or not iface or not value:
            raise argparse.ArgumentTypeError(f"--rat expects INTERFACE=RAT, got {pair!r}")
        if value != "-" and not RAT_RE.fullmatch(value):
            raise argparse.ArgumentTypeError(
                f"--rat {pair!r}: DIRBS accepts RAT codes 001-007 and 101-105, '|'-separated "
                "(006 E-UTRAN), or '-' for none")
        rat[iface] = "" if value == "-" else value
    return rat


def add_export_parser(subparsers: Any) -> None:
    """Register `export` on the CLI's subparsers (`parser.add_subparsers()`)."""
    p = subparsers.add_parser(
        "export",
        help="write the (IMEI, IMSI, MSISDN) triplets seen as a DIRBS operator dump",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--since",
        required=True,
        type=parse_time,
        help="start: 2024-05-01, 20240501, ISO datetime, unix seconds, or 7d/24h ago",
    )
    p.add_argument("--until", type=parse_time, default=None, help="end (exclusive); default now")
    p.add_argument("--format", choices=("csv", "zip"), default="csv",
                   help="csv (to -o or stdout), or zip: the DIRBS operator import file "
                   "<operator>_<first day>_<last day>.zip (needs --operator)")
    p.add_argument("--operator", help="DIRBS operator id (lower case) for --format zip")
    p.add_argument(
        "--store",
        default=os.environ.get("EIR_STORE", ""),
        help="redis://... holding the audit stream (default: $EIR_STORE)",
    )
    p.add_argument(
        "--audit-dir",
        default=os.environ.get("EIR_AUDIT_DIR", ""),
        help="read the daily audit-*.jsonl files here instead of Redis",
    )
    p.add_argument("--stream", default=DEFAULT_STREAM, help="audit stream key")
    p.add_argument(
        "--rat",
        action="append",
        metavar="INTERFACE=RAT",
        help="RAT codes per interface as DIRBS numbers them (default s13=006 E-UTRAN; "
        "n5g_eir: none, DIRBS has no NR code); '-' for none; repeatable",
    )
    p.add_argument("-o", "--output", default="-",
                   help="csv: output file (default stdout); zip: a directory (default .) or "
                   "a file named as DIRBS expects")
    p.set_defaults(func=run_export)


def _from_redis(
    url: str, stream: str, since: float, until: float, slack: float = 3600.0
) -> Iterator[Row]:
    from eir_server.store.urls import parse_store_url, sync_client

    # every store URL serve takes: single node, TLS, unix socket, Sentinel, Cluster
    client = sync_client(parse_store_url(url), 30.0)
    # Entry ids are the Redis server's clock at write time, a flush interval after the check
    # (plus any clock skew between nodes and Redis): select ids with `slack` either side, then
    # filter on the recorded check time `t`.
    lo: str = str(max(0, int((since - slack) * 1000)))
    hi = str(int((until + slack) * 1000))
    try:
        while True:
            batch = client.xrange(stream, min=lo, max=hi, count=10_000)
            if not batch:
                return
            for _id, fields in batch:
                yield {k.decode() if isinstance(k, bytes) else k:
                       v.decode() if isinstance(v, bytes) else v for k, v in fields.items()}
            last = batch[-1][0]
            lo = "(" + (last.decode() if isinstance(last, bytes) else last)  # Redis >= 6.2
    finally:
        client.close()


def _from_dir(directory: str, since: float, until: float) -> Iterator[Row]:
    first = datetime.fromtimestamp(since, UTC).strftime("%Y%m%d")
    last = datetime.fromtimestamp(until, UTC).strftime("%Y%m%d")
    for name in sorted(os.listdir(directory)):
        if not (name.startswith("audit-") and name.endswith(".jsonl")):
            continue
        if not first <= name[6:14] <= last:
            continue
        with open(os.path.join(directory, name)) as f:
            for line in f:
                line = line.strip()
                if line:
                    yield json.loads(line)


def dump_rows(
    rows: Iterator[Row], *, since: float, until: float, rat: dict[str, str]
) -> tuple[list[tuple[str, str, str, str, str]], dict[str, int]]:
    """Distinct rows DIRBS accepts, by date then first seen; and what was skipped, why."""
    seen: dict[tuple[str, str, str, str, str], None] = {}  # insertion-ordered set
    skipped = {"no_imsi": 0, "bad_value": 0}
    for r in rows:
        t = float(r.get("t") or 0)
        if not since <= t < until:
            continue
        imsi = r.get("imsi", "")
        if not imsi:
            skipped["no_imsi"] += 1
            continue
        imei = r.get("imei", "")
        if len(imei) in (15, 16) and imei.isdigit():
            imei = imei[:14]  # the 14-digit IMEI (docs/operations.md): no check digit or SVN
        msisdn = r.get("msisdn", "").lstrip("+")
        if not (IMEI_RE.fullmatch(imei) and DIGITS15_RE.fullmatch(imsi)
                and (not msisdn or DIGITS15_RE.fullmatch(msisdn))):
            skipped["bad_value"] += 1
            continue
        day = datetime.fromtimestamp(t, UTC).strftime("%Y%m%d")
        iface = r.get("interface", "")
        seen[(day, imei, imsi, msisdn, rat.get(iface, ""))] = None
    return sorted(seen, key=lambda k: k[0]), skipped  # stable: first-seen order within a day


def write_dump(
    rows: Iterator[Row], out: TextIO, *, since: float, until: float, rat: dict[str, str]
) -> tuple[int, int]:
    """Write the CSV; returns (rows written, observations skipped)."""
    keys, skipped = dump_rows(rows, since=since, until=until, rat=rat)
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows(keys)
    return len(keys), sum(skipped.values())


def dirbs_file_name(operator: str, since: float, until: float) -> str:
    """<operator>_<first day>_<last day> (until is exclusive), as DIRBS's importer parses it."""
    first = datetime.fromtimestamp(since, UTC).strftime("%Y%m%d")
    last = datetime.fromtimestamp(max(since, until - 1e-3), UTC).strftime("%Y%m%d")
    return f"{operator}_{first}_{last}"


def run_export(args: argparse.Namespace) -> int:
    # DIRBS refuses a dump whose last day lies in the future: never export past now.
    until = min(args.until, time.time()) if args.until is not None else time.time()
    try:
        rat = _rat_map(args.rat)
    except argparse.ArgumentTypeError as exc:
        print(f"eir-server export: {exc}", file=sys.stderr)
        return 2
    if args.format == "zip" and not (args.operator and OPERATOR_RE.fullmatch(args.operator)):
        print("eir-server export: --format zip needs --operator ID (lower-case letters, digits, "
              "'-'), the operator id DIRBS imports it under", file=sys.stderr)
        return 2
    if args.audit_dir:
        rows = _from_dir(args.audit_dir, args.since, until)
    elif args.store.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://",
                                "redis+cluster://")):
        rows = _from_redis(args.store, args.stream, args.since, until)
    else:
        print(
            "eir-server export: needs --store redis://... or --audit-dir DIR "
            "(an in-memory audit cannot be read from another process)",
            file=sys.stderr,
        )
        return 2
    try:
        keys, skipped = dump_rows(rows, since=args.since, until=until, rat=rat)
    except Exception as exc:  # noqa: BLE001 - report store errors as one line, not a traceback
        print(f"eir-server export: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.format == "zip":
        name = dirbs_file_name(args.operator, args.since, until)
        target = args.output if args.output != "-" else "."
        if os.path.isdir(target):
            target = os.path.join(target, name + ".zip")
        elif os.path.basename(target) != name + ".zip":
            print(f"eir-server export: DIRBS expects the file to be named {name}.zip",
                  file=sys.stderr)
            return 2
        body = io.StringIO()
        writer = csv.writer(body, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows(keys)
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(name + ".csv", body.getvalue())
        where = target
    else:
        out: TextIO = sys.stdout if args.output == "-" else open(args.output, "w", newline="")
        try:
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(HEADER)
            writer.writerows(keys)
        finally:
            if out is not sys.stdout:
                out.close()
        where = args.output
    print(
        f"eir-server export: {len(keys)} rows to {where}, {skipped['no_imsi']} checks without "
        f"IMSI skipped, {skipped['bad_value']} with values DIRBS refuses skipped",
        file=sys.stderr,
    )
    return 0

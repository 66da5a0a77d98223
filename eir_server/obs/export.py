"""`eir-server export`: the (IMEI, IMSI, MSISDN) triplets seen, as a DIRBS operator data dump.

Output: CSV with header `date,imei,imsi,msisdn,rat`; date is the UTC day YYYYMMDD of the
check; rat comes from the interface (s13 -> 4G, n5g_eir -> 5G by default, overridable with
`--rat s13=...` for registers that expect their own RAT codes). One row per distinct
(date, imei, imsi, msisdn, rat); rows come out by date, then in first-seen order. Checks
without an IMSI are skipped (a DIRBS import rejects them) and counted on stderr.

Source: the audit Redis Stream of `--store redis://...` (default from EIR_STORE), or the
daily files of `--audit-dir` (EIR_AUDIT_DIR) written when the store is embedded.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

from eir_server.obs.audit import DEFAULT_STREAM, Row

DEFAULT_RAT = {"s13": "4G", "n5g_eir": "5G"}
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
        rat[iface] = value
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
    p.add_argument("--format", choices=("csv",), default="csv")
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
        help="RAT value per interface (default s13=4G, n5g_eir=5G); repeatable",
    )
    p.add_argument("-o", "--output", default="-", help="output file (default stdout)")
    p.set_defaults(func=run_export)


def _from_redis(
    url: str, stream: str, since: float, until: float, slack: float = 3600.0
) -> Iterator[Row]:
    import redis

    client = redis.Redis.from_url(url, decode_responses=True)
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
                yield fields
            lo = "(" + batch[-1][0]  # exclusive start (Redis >= 6.2)
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


def write_dump(
    rows: Iterator[Row], out: TextIO, *, since: float, until: float, rat: dict[str, str]
) -> tuple[int, int]:
    """Write the CSV; returns (rows written, observations skipped for lack of an IMSI)."""
    seen: dict[tuple[str, str, str, str, str], None] = {}  # insertion-ordered set
    skipped = 0
    for r in rows:
        t = float(r.get("t") or 0)
        if not since <= t < until:
            continue
        imsi = r.get("imsi", "")
        if not imsi:
            skipped += 1
            continue
        day = datetime.fromtimestamp(t, UTC).strftime("%Y%m%d")
        iface = r.get("interface", "")
        seen[(day, r.get("imei", ""), imsi, r.get("msisdn", ""), rat.get(iface, iface))] = None
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    keys = sorted(seen, key=lambda k: k[0])  # stable: first-seen order within a day
    writer.writerows(keys)
    return len(keys), skipped


def run_export(args: argparse.Namespace) -> int:
    until = args.until if args.until is not None else time.time()
    try:
        rat = _rat_map(args.rat)
    except argparse.ArgumentTypeError as exc:
        print(f"eir-server export: {exc}", file=sys.stderr)
        return 2
    if args.audit_dir:
        rows = _from_dir(args.audit_dir, args.since, until)
    elif args.store.startswith(("redis://", "rediss://", "unix://")):
        rows = _from_redis(args.store, args.stream, args.since, until)
    else:
        print(
            "eir-server export: needs --store redis://... or --audit-dir DIR "
            "(an in-memory audit cannot be read from another process)",
            file=sys.stderr,
        )
        return 2
    out: TextIO = sys.stdout if args.output == "-" else open(args.output, "w", newline="")
    try:
        written, skipped = write_dump(rows, out, since=args.since, until=until, rat=rat)
    except Exception as exc:  # noqa: BLE001 - report store errors as one line, not a traceback
        print(f"eir-server export: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if out is not sys.stdout:
            out.close()
    print(
        f"eir-server export: {written} rows, {skipped} checks without IMSI skipped", file=sys.stderr
    )
    return 0

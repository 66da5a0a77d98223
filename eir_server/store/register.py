"""DIRBS-style national register files: names, zips and CSV rows.

Used by `eir_server.sync` (Redis feed) and by `MemoryStore.load_register_dir` (embedded store),
so both read exactly the same things the same way. Standard library only.

Published files (one zip per list per run):
  <YYYYMMDD_HHMMSS>_blacklist.zip
  <YYYYMMDD_HHMMSS>_notifications_<operator>.zip
  <YYYYMMDD_HHMMSS>_exceptions_<operator>.zip
each holding the full list `<ts>_<list>.csv` and delta CSVs
`<ts>_<list>_delta_<base_run_id>_<run_id>_<reason>.csv` (same columns as the full list).
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, TYPE_CHECKING, cast
from zlib import error as zlib_error

from eir_server.policy.types import BlacklistEntry, ExceptionEntry, NotificationEntry

from .codec import FORBIDDEN, Listing

if TYPE_CHECKING:
    from _csv import Reader as _CsvReader


class RegisterError(Exception):
    """A register file is refused as a whole (nothing from it is applied)."""


class ListKind(StrEnum):
    BLACKLIST = "blacklist"
    NOTIFICATIONS = "notifications"
    EXCEPTIONS = "exceptions"


@dataclass(frozen=True, order=True, slots=True)
class ListName:
    kind: ListKind
    operator: str = ""

    def __str__(self) -> str:
        return self.kind.value if not self.operator else f"{self.kind.value}_{self.operator}"

    @classmethod
    def parse(cls, text: str) -> ListName:
        if text == "blacklist":
            return cls(ListKind.BLACKLIST)
        for kind in (ListKind.NOTIFICATIONS, ListKind.EXCEPTIONS):
            prefix = kind.value + "_"
            if text.startswith(prefix) and _OP_RE.fullmatch(text[len(prefix) :]):
                return cls(kind, text[len(prefix) :])
        raise ValueError(f"not a register list name: {text!r}")


_OP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-]*(?:_[A-Za-z0-9.\-]+)*")
_TS = r"(?P<ts>\d{8}_\d{6})"
_LIST = r"(?P<list>blacklist|(?:notifications|exceptions)_[A-Za-z0-9][A-Za-z0-9_.\-]*?)"
ZIP_RE = re.compile(rf"{_TS}_{_LIST}\.zip")
FULL_RE = re.compile(rf"{_TS}_{_LIST}\.csv")

# Delta reason -> operation. "upsert" replaces this list's entry for the IMEI (or the
# (operator, imsi) pair); "remove" deletes it.
REASONS: dict[ListKind, dict[str, str]] = {
    ListKind.BLACKLIST: {"blocked": "upsert", "changed": "upsert", "unblocked": "remove"},
    ListKind.NOTIFICATIONS: {
        "new": "upsert",
        "changed": "upsert",
        "resolved": "remove",
        "blacklisted": "remove",
        "no_longer_seen": "remove",
    },
    ListKind.EXCEPTIONS: {"added": "upsert", "removed": "remove"},
}
_ALL_REASONS = "|".join(sorted({r for m in REASONS.values() for r in m}, key=len, reverse=True))
DELTA_RE = re.compile(
    rf"{_TS}_{_LIST}_delta_(?P<base>[^_]+)_(?P<run>[^_]+)_(?P<reason>{_ALL_REASONS})\.csv"
)
# Removals first so an IMEI that moves between reasons in one run ends up added.
REASON_ORDER = {"remove": 0, "upsert": 1}


@dataclass(frozen=True, slots=True)
class DeltaMember:
    name: str
    base_run_id: str
    run_id: str
    reason: str
    op: str


@dataclass(frozen=True, slots=True)
class ListZip:
    """One published zip, checked for structure (not yet for CRCs: those are checked as read)."""

    path: Path
    ts: str
    list: ListName
    full_member: str
    deltas: tuple[DeltaMember, ...]

    @property
    def run_id(self) -> str:
        """DIRBS run id from the delta names; the timestamp when the zip has no deltas."""
        return self.deltas[0].run_id if self.deltas else self.ts

    @property
    def base_run_id(self) -> str | None:
        return self.deltas[0].base_run_id if self.deltas else None


def parse_zip_name(name: str) -> tuple[str, ListName] | None:
    m = ZIP_RE.fullmatch(name)
    if not m:
        return None
    try:
        return m["ts"], ListName.parse(m["list"])
    except ValueError:
        return None


def open_list_zip(path: Path) -> ListZip:
    """Check a zip's name and members; raise RegisterError if truncated or inconsistent."""
    parsed = parse_zip_name(path.name)
    if parsed is None:
        raise RegisterError(f"{path.name}: not a register zip name")
    ts, lname = parsed
    try:
        with zipfile.ZipFile(path) as zf:
            names = [i.filename for i in zf.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise RegisterError(f"{path.name}: unreadable or truncated zip ({e})") from e
    full = f"{ts}_{lname}.csv"
    deltas: list[DeltaMember] = []
    base = {Path(n).name: n for n in names}
    if full not in base:
        raise RegisterError(f"{path.name}: missing full list member {full}")
    for short, member in base.items():
        m = DELTA_RE.fullmatch(short)
        if not m:
            continue
        if m["ts"] != ts or m["list"] != str(lname):
            raise RegisterError(f"{path.name}: delta {short} belongs to another list or run")
        op = REASONS[lname.kind].get(m["reason"])
        if op is None:
            raise RegisterError(f"{path.name}: reason {m['reason']!r} not valid for {lname}")
        deltas.append(DeltaMember(member, m["base"], m["run"], m["reason"], op))
    if len({(d.base_run_id, d.run_id) for d in deltas}) > 1:
        raise RegisterError(f"{path.name}: delta members disagree on base/run ids")
    deltas.sort(key=lambda d: (REASON_ORDER[d.op], d.reason))
    return ListZip(path, ts, lname, base[full], tuple(deltas))


# ---------------------------------------------------------------------------------------------
# CSV rows

_COLUMNS: dict[ListKind, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # kind: (required columns in published order, optional trailing columns)
    ListKind.BLACKLIST: (("imei", "block_date", "reasons"), ()),
    ListKind.NOTIFICATIONS: (
        ("imei", "imsi", "msisdn", "block_date", "reasons"),
        ("amnesty_granted",),
    ),
    ListKind.EXCEPTIONS: (("imei", "imsi"), ("msisdn",)),
}
MAX_SAMPLES = 20
# Input bounds (sync --max-line-bytes / --max-reasons-bytes). A DIRBS row is well under 200
# bytes; a line past MAX_LINE is no register row (and would have to be buffered whole), so the
# file is refused at that line; a longer reasons field is a bad row.
MAX_LINE = 4096
MAX_REASONS = 1024


@dataclass(frozen=True, slots=True)
class Limits:
    max_line: int = MAX_LINE
    max_reasons: int = MAX_REASONS


DEFAULT_LIMITS = Limits()
_TRUE = frozenset({"true", "t", "1", "yes", "y"})
_FALSE = frozenset({"false", "f", "0", "no", "n", ""})


@dataclass(frozen=True, slots=True)
class BadRow:
    line: int
    reason: str


@dataclass(slots=True)
class CsvReport:
    """What reading one CSV found; bad rows are skipped, counted and sampled by line number."""

    source: str
    rows: int = 0
    bad: int = 0
    samples: list[BadRow] = field(default_factory=list)
    # Duplicate keys within the file: (key, line kept, line dropped), first MAX_SAMPLES.
    duplicates: int = 0
    dup_samples: list[tuple[str, int, int]] = field(default_factory=list)

    def add_duplicate(self, key: str, kept: int, dropped: int) -> None:
        self.duplicates += 1
        if len(self.dup_samples) < MAX_SAMPLES:
            self.dup_samples.append((key, kept, dropped))

    def add_bad(self, line: int, reason: str) -> None:
        self.bad += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(BadRow(line, reason))

    def check(self, max_bad_share: float) -> None:
        total = self.rows + self.bad
        if total and self.bad / total > max_bad_share:
            first = "; ".join(f"line {b.line}: {b.reason}" for b in self.samples[:5])
            raise RegisterError(
                f"{self.source}: {self.bad} of {total} rows are bad "
                f"(> {max_bad_share:.2%} allowed), file refused; {first}"
            )

    def as_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "rows": self.rows,
            "bad": self.bad,
            "bad_lines": [[b.line, b.reason] for b in self.samples],
            "duplicates": self.duplicates,
            "duplicate_lines": [list(d) for d in self.dup_samples],
        }


def split_reasons(raw: str) -> tuple[str, ...]:
    return tuple(r for r in (x.strip() for x in raw.split("|")) if r)


def valid_date(s: str) -> bool:
    if len(s) != 8 or not (s.isdigit() and s.isascii()):
        return False
    try:
        _dt.date(int(s[:4]), int(s[4:6]), int(s[6:]))
    except ValueError:
        return False
    return True


def _imei14(s: str) -> str | None:
    if not (14 <= len(s) <= 16 and s.isdigit() and s.isascii()):
        s = s.strip()
        if not (14 <= len(s) <= 16 and s.isdigit() and s.isascii()):
            return None
    return s[:14]


def _digits(s: str, lo: int, hi: int) -> str | None:
    s = s.strip()
    if lo <= len(s) <= hi and (not s or (s.isdigit() and s.isascii())):
        return s
    return None


class _BoundedLines(io.RawIOBase):
    """Passes a byte stream through, refusing it at the first physical line longer than
    `max_line` bytes: the text layer above reads whole lines, so without this one huge field
    (a 400 MB `reasons` in a small zip) would be read into memory before anything could object.
    """

    def __init__(self, stream: IO[bytes], max_line: int, source: str) -> None:
        self._s = stream
        self._max = max_line
        self._source = source
        self._run = 0  # bytes since the last newline
        self._line = 1
        self._first = True

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        data = self._s.read(min(len(b), 1 << 16))
        n = len(data)
        if not n:
            return 0
        if self._first:
            self._first = False
            if data.startswith(b"\xef\xbb\xbf"):
                self._run = -3  # the BOM is no part of the first line
        last = data.rfind(b"\n")
        if last < 0:
            self._run += n
            if self._run > self._max:
                self._refuse(self._line)
        else:
            first = data.find(b"\n")
            if self._run + first > self._max:
                self._refuse(self._line)
            if last > first + self._max:  # a whole line in between may be too long
                for k, part in enumerate(data[first + 1 : last].split(b"\n")):
                    if len(part) > self._max:
                        self._refuse(self._line + 1 + k)
            self._line += data.count(b"\n")
            self._run = n - last - 1
            if self._run > self._max:
                self._refuse(self._line)
        b[:n] = data
        return n

    def _refuse(self, line: int) -> None:
        raise RegisterError(
            f"{self._source}: line {line}: longer than {self._max} bytes "
            "(--max-line-bytes), file refused"
        )


def _text_rows(stream: IO[bytes], limits: Limits, source: str) -> _CsvReader:
    # utf-8-sig drops a BOM; newline="" lets csv handle CRLF and quoted newlines; undecodable
    # bytes become U+FFFD so the row fails validation instead of aborting the file.
    raw = io.BufferedReader(cast(io.RawIOBase, _BoundedLines(stream, limits.max_line, source)),
                            1 << 16)
    text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
    return csv.reader(text)


def reasons_too_long(reasons: str, limits: Limits) -> bool:
    return len(reasons) > limits.max_reasons // 4 and len(reasons.encode()) > limits.max_reasons


def iter_list_rows(
    kind: ListKind, stream: IO[bytes], report: CsvReport, limits: Limits = DEFAULT_LIMITS
) -> Iterator[tuple[str, tuple[str, str] | NotificationEntry | ExceptionEntry]]:
    """Yield (imei14, payload) for each good row. Blacklist payload: (block_date, raw reasons).

    Raises RegisterError for a broken zip member (CRC/truncation), an unusable header or a line
    over `limits.max_line`. The caller decides on the bad-row share with `report.check()` once
    the file is exhausted.
    """
    for _, imei, payload in iter_rows_numbered(kind, stream, report, limits):
        yield imei, payload


def iter_rows_numbered(
    kind: ListKind, stream: IO[bytes], report: CsvReport, limits: Limits = DEFAULT_LIMITS
) -> Iterator[tuple[int, str, tuple[str, str] | NotificationEntry | ExceptionEntry]]:
    """`iter_list_rows` with the line number (first physical line) of each row."""
    required, optional = _COLUMNS[kind]
    reader = _text_rows(stream, limits, report.source)
    idx: dict[str, int] = {c: i for i, c in enumerate(required)}
    counts = set(range(len(required), len(required) + len(optional) + 1))
    header_seen = False
    good_dates: set[str] = set()
    good_text: set[str] = set()
    last = 0  # physical lines read so far: a row is numbered by its first line
    try:
        for row in reader:
            line, last = last + 1, reader.line_num
            n = len(row)
            if n == 0 or (n == 1 and not row[0].strip()):
                continue  # blank line
            if not header_seen:
                header_seen = True
                names = [c.strip().lower() for c in row]
                if "imei" in names:  # a header: columns are matched by name, in any order
                    missing = [c for c in required if c not in names]
                    if missing:
                        raise RegisterError(f"{report.source}: header lacks {missing}")
                    idx = {c: names.index(c) for c in (*required, *optional) if c in names}
                    counts = {len(names)}
                    continue
            if n not in counts:
                report.add_bad(line, f"{n} columns")
                continue
            imei = _imei14(row[0] if idx["imei"] == 0 else row[idx["imei"]])
            if imei is None:
                report.add_bad(line, "bad IMEI")
                continue
            if kind is ListKind.BLACKLIST:
                date = row[idx["block_date"]].strip()
                if date not in good_dates:
                    if not valid_date(date):
                        report.add_bad(line, "bad block_date")
                        continue
                    good_dates.add(date)
                reasons = row[idx["reasons"]]
                if reasons not in good_text:
                    if FORBIDDEN.intersection(reasons):
                        report.add_bad(line, "control character in reasons")
                        continue
                    if reasons_too_long(reasons, limits):
                        report.add_bad(line, f"reasons longer than {limits.max_reasons} bytes")
                        continue
                    good_text.add(reasons)
                report.rows += 1
                yield line, imei, (date, reasons)
                continue
            imsi = _digits(row[idx["imsi"]], 5, 15)
            if not imsi:
                report.add_bad(line, "bad IMSI")
                continue
            msisdn = (
                _digits(row[idx["msisdn"]], 0, 15) if "msisdn" in idx and idx["msisdn"] < n else ""
            )
            if msisdn is None:
                report.add_bad(line, "bad MSISDN")
                continue
            if kind is ListKind.EXCEPTIONS:
                report.rows += 1
                yield line, imei, ExceptionEntry(imsi, msisdn)
                continue
            date = row[idx["block_date"]].strip()
            if not valid_date(date):
                report.add_bad(line, "bad block_date")
                continue
            reasons = row[idx["reasons"]]
            if FORBIDDEN.intersection(reasons):
                report.add_bad(line, "control character in reasons")
                continue
            if reasons_too_long(reasons, limits):
                report.add_bad(line, f"reasons longer than {limits.max_reasons} bytes")
                continue
            amnesty = False
            if "amnesty_granted" in idx and idx["amnesty_granted"] < n:
                a = row[idx["amnesty_granted"]].strip().lower()
                if a not in _TRUE and a not in _FALSE:
                    report.add_bad(line, "bad amnesty_granted")
                    continue
                amnesty = a in _TRUE
            report.rows += 1
            yield line, imei, NotificationEntry(imsi, msisdn, date, split_reasons(reasons), amnesty)
    except (zipfile.BadZipFile, EOFError, zlib_error) as e:
        raise RegisterError(f"{report.source}: corrupt data ({e})") from e
    except csv.Error as e:
        raise RegisterError(f"{report.source}: line {reader.line_num}: {e}") from e


def apply_row(listing: Listing, lname: ListName, op: str, payload: object) -> None:
    """Apply one list row (full-load rows are "upsert") to the merged listing of its IMEI."""
    kind = lname.kind
    if kind is ListKind.BLACKLIST:
        if op == "upsert":
            date, raw = cast(tuple[str, str], payload)
            listing.blacklist = BlacklistEntry(date, split_reasons(raw))
        else:
            listing.blacklist = None
        return
    key = (lname.operator, payload.imsi)  # type: ignore[attr-defined]
    table = listing.notifications if kind is ListKind.NOTIFICATIONS else listing.exceptions
    if op == "upsert":
        table[key] = payload  # type: ignore[assignment]
    else:
        table.pop(key, None)


# ---------------------------------------------------------------------------------------------
# Register directories (embedded store) and list discovery


@dataclass(frozen=True, slots=True)
class ListSource:
    """The newest full list found for one list name: a zip, or a bare `<ts>_<list>.csv`."""

    list: ListName
    ts: str
    path: Path
    member: str | None  # zip member of the full CSV, None for a bare CSV
    run_id: str


def discover(directory: Path) -> dict[ListName, list[Path]]:
    """Zips per list name, oldest first (by the timestamp in the name)."""
    found: dict[ListName, list[tuple[str, Path]]] = {}
    for p in directory.iterdir():
        parsed = parse_zip_name(p.name)
        if parsed and p.is_file():
            found.setdefault(parsed[1], []).append((parsed[0], p))
    return {k: [p for _, p in sorted(v)] for k, v in found.items()}


def latest_full_lists(directory: Path) -> dict[ListName, ListSource]:
    out: dict[ListName, ListSource] = {}
    for lname, paths in discover(directory).items():
        z = open_list_zip(paths[-1])
        out[lname] = ListSource(lname, z.ts, z.path, z.full_member, z.run_id)
    for p in directory.iterdir():
        m = FULL_RE.fullmatch(p.name)
        if not m or not p.is_file():
            continue
        try:
            lname = ListName.parse(m["list"])
        except ValueError:
            continue
        if lname not in out or out[lname].ts < m["ts"]:
            out[lname] = ListSource(lname, m["ts"], p, None, m["ts"])
    return out


def open_source(src: ListSource) -> IO[bytes]:
    if src.member is None:
        return open(src.path, "rb")  # noqa: SIM115 - caller closes
    try:
        zf = zipfile.ZipFile(src.path)
        return cast(IO[bytes], _ZipMember(zf, zf.open(src.member)))
    except (zipfile.BadZipFile, OSError, KeyError) as e:
        raise RegisterError(f"{src.path.name}: unreadable zip ({e})") from e


class _ZipMember(io.RawIOBase):
    """A zip member stream that also closes its ZipFile."""

    def __init__(self, zf: zipfile.ZipFile, member: IO[bytes]) -> None:
        self._zf, self._m = zf, member

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        data = self._m.read(len(b))
        b[: len(data)] = data
        return len(data)

    def read(self, n: int = -1) -> bytes:
        return self._m.read(n)

    def read1(self, n: int = -1) -> bytes:
        data: bytes = self._m.read1(n)  # type: ignore[attr-defined]
        return data

    def close(self) -> None:
        self._m.close()
        self._zf.close()
        super().close()


def read_full_lists(
    sources: dict[ListName, ListSource], max_bad_share: float, reports: list[CsvReport]
) -> dict[str, Listing]:
    """Merge full lists into {imei14: Listing}. Raises RegisterError on a refused file."""
    merged: dict[str, Listing] = {}
    for lname in sorted(sources):
        src = sources[lname]
        report = CsvReport(src.path.name if src.member is None else f"{src.path.name}:{src.member}")
        blacklist = lname.kind is ListKind.BLACKLIST
        first: dict[str, int] = {}
        with open_source(src) as stream:
            for line, imei, payload in iter_rows_numbered(lname.kind, stream, report):
                listing = merged.get(imei)
                if listing is None:
                    listing = merged[imei] = Listing()
                elif blacklist and listing.blacklist is not None:
                    # A duplicate: the earliest block_date wins (as in `eir-server sync`), so a
                    # later row with a future date never unblocks the device.
                    if payload[0] >= listing.blacklist.block_date:  # type: ignore[index]
                        report.add_duplicate(imei, first[imei], line)
                        continue
                    report.add_duplicate(imei, line, first[imei])
                if blacklist:
                    first[imei] = line
                apply_row(listing, lname, "upsert", payload)
        report.check(max_bad_share)
        reports.append(report)
    return merged


# ---------------------------------------------------------------------------------------------
# One line at a time, for the lines the sync's bytes-level blacklist path cannot take
# (eir_server/sync/blacklist.py).


def parse_line(kind: ListKind, line: str, lineno: int, report: CsvReport) -> list[str] | None:
    """csv-parse one logical line; None for blank lines. Counts nothing."""
    if not line.strip():
        return None
    try:
        return next(csv.reader([line.rstrip("\r")]))
    except (csv.Error, StopIteration) as e:
        report.add_bad(lineno, f"csv: {e}")
        return None


def check_blacklist_row(
    row: list[str],
    lineno: int,
    report: CsvReport,
    limits: Limits = DEFAULT_LIMITS,
    order: tuple[int, int, int] = (0, 1, 2),
) -> tuple[str, str, str] | None:
    """Validate a blacklist row -> (imei14, block_date, raw reasons) or None (bad). `order`:
    the positions of imei, block_date and reasons (from the header)."""
    if len(row) != 3:
        report.add_bad(lineno, f"{len(row)} columns")
        return None
    i, d, r = order
    imei = _imei14(row[i])
    if imei is None:
        report.add_bad(lineno, "bad IMEI")
        return None
    date = row[d].strip()
    if not valid_date(date):
        report.add_bad(lineno, "bad block_date")
        return None
    reasons = row[r]
    if FORBIDDEN.intersection(reasons):
        report.add_bad(lineno, "control character in reasons")
        return None
    if reasons_too_long(reasons, limits):
        report.add_bad(lineno, f"reasons longer than {limits.max_reasons} bytes")
        return None
    return imei, date, reasons

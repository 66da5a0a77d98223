"""Operator-local black / grey / white lists: exact IMEIs and IMEI ranges.

CSV file format (UTF-8, `#` comments and blank lines ignored, optional header row
`list,imei,imei_end,reason`):

    # list,imei,imei_end,reason
    black,352099001761481,,stolen - ticket 4711
    white,35209900*,,lab TAC: all our test handsets
    grey,35209900100000,35209900199999,"batch under investigation, see NOC-12"

* list: black | grey | white.
* imei: 14-digit body, 15-digit IMEI (Luhn checked) or 16-digit IMEISV (SVN dropped); or a
  prefix of 1-13 digits followed by `*` meaning every IMEI starting with it.
* imei_end: optional; when given, the entry is the inclusive range imei..imei_end.
* reason: optional free text, shown in the verdict's reasons.

Resolution: an exact entry beats any range; among ranges covering an IMEI the narrowest wins,
ties go to the more severe list (black > grey > white). The same exact IMEI listed twice is
a bad line.
"""

from __future__ import annotations

import csv
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, cast

from .common import BadLine, LoadError, clip
from .imei import Malformed, normalize_imei

ListKind = Literal["black", "grey", "white"]
KINDS: Final[tuple[str, ...]] = ("black", "grey", "white")
_SEVERITY: Final[dict[str, int]] = {"black": 0, "grey": 1, "white": 2}


@dataclass(frozen=True, slots=True)
class LocalEntry:
    """One list entry: inclusive 14-digit range start..end (start == end for an exact IMEI).
    `pattern` is the entry as written, for explanations; `line` 0 when built in code."""

    kind: ListKind
    start: str
    end: str
    reason: str = ""
    pattern: str = ""
    line: int = 0

    @property
    def exact(self) -> bool:
        return self.start == self.end and "*" not in self.pattern

    def describe(self) -> str:
        where = self.pattern or (self.start if self.start == self.end else f"{self.start}-{self.end}")
        return f"{where}: {self.reason}" if self.reason else where


def _body(value: str) -> str:
    r = normalize_imei(value)
    if isinstance(r, Malformed):
        # A lab list may legitimately hold test/zero TACs or IMEIs with a bad check digit.
        if r.imei14 is not None and r.reason != "bad_check_digit":
            return r.imei14
        raise ValueError(f"{value!r} is not a valid IMEI ({r.description})")
    return r.imei14


def make_entry(
    kind: str, imei: str, imei_end: str = "", reason: str = "", *, line: int = 0
) -> LocalEntry:
    """Build one entry from CSV-style fields; ValueError with a short message when invalid."""
    kind = kind.strip().lower()
    if kind not in _SEVERITY:
        raise ValueError(f"list must be black, grey or white, got {kind!r}")
    imei, imei_end = imei.strip(), imei_end.strip()
    if imei.endswith("*"):
        prefix = imei[:-1]
        if imei_end:
            raise ValueError("a prefix* entry takes no imei_end")
        if not (1 <= len(prefix) <= 13 and prefix.isascii() and prefix.isdigit()):
            raise ValueError(f"prefix must be 1-13 digits before '*', got {imei!r}")
        start, end = prefix.ljust(14, "0"), prefix.ljust(14, "9")
    else:
        start = _body(imei)
        end = _body(imei_end) if imei_end else start
        if end < start:
            raise ValueError(f"range end {end} is before its start {start}")
    pattern = imei if not imei_end else f"{start}-{end}"
    return LocalEntry(cast(ListKind, kind), start, end, reason.strip(), pattern, line)


class LocalLists:
    """Compiled operator lists: a dict of exact IMEIs plus disjoint sorted range segments
    (overlaps resolved once, here), so a lookup is one dict get and one bisect."""

    __slots__ = ("entries", "bad_lines", "source", "exact", "seg_starts", "seg_ends", "seg_entries")

    def __init__(
        self, entries: Iterable[LocalEntry] = (), *, bad_lines: tuple[BadLine, ...] = (),
        source: str = "",
    ) -> None:
        self.entries: tuple[LocalEntry, ...] = tuple(entries)
        self.source = source
        bad = list(bad_lines)
        self.exact: dict[str, LocalEntry] = {}
        ranges: list[LocalEntry] = []
        for e in self.entries:
            if not e.exact:
                ranges.append(e)
            elif e.start in self.exact:
                first = self.exact[e.start]
                if e.line or first.line:
                    bad.append(BadLine(e.line, f"IMEI already listed ({first.kind}, line "
                                                f"{first.line})", e.pattern))
                else:
                    raise ValueError(f"IMEI {e.start} listed twice")
            else:
                self.exact[e.start] = e
        self.bad_lines = tuple(sorted(bad, key=lambda b: b.line))
        self.seg_starts, self.seg_ends, self.seg_entries = _flatten(ranges)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return (f"LocalLists({len(self.exact)} exact, {len(self.seg_starts)} range segments, "
                f"{len(self.bad_lines)} bad lines)")

    def lookup(self, imei14: str) -> LocalEntry | None:
        """The entry deciding this 14-digit IMEI, or None."""
        e = self.exact.get(imei14)
        if e is None and self.seg_starts:
            i = bisect_right(self.seg_starts, imei14) - 1
            if i >= 0 and imei14 <= self.seg_ends[i]:
                e = self.seg_entries[i]
        return e

    @classmethod
    def parse_csv(
        cls, lines: Iterable[str], *, source: str = "<local lists>", strict: bool = True
    ) -> LocalLists:
        """Parse the CSV format in the module docstring. strict (the default: these lists are
        operator-written and a dropped stolen-phone line should not go unnoticed) raises
        LoadError listing every bad line; strict=False keeps the good lines and reports the
        bad ones in `bad_lines`."""
        entries: list[LocalEntry] = []
        bad: list[BadLine] = []
        first = True
        for lineno, line in enumerate(lines, 1):
            text = line.lstrip("\ufeff").strip()
            if not text or text.startswith("#"):
                continue
            try:
                row = next(csv.reader([text]))
            except csv.Error as exc:
                bad.append(BadLine(lineno, str(exc), clip(text)))
                continue
            row = [c.strip() for c in row]
            if first and row and row[0].lower() == "list":
                first = False
                continue  # header row
            first = False
            if not 2 <= len(row) <= 4:
                bad.append(BadLine(lineno, f"expected 2-4 fields, got {len(row)}", clip(text)))
                continue
            row += [""] * (4 - len(row))
            try:
                entries.append(make_entry(row[0], row[1], row[2], row[3], line=lineno))
            except ValueError as exc:
                bad.append(BadLine(lineno, str(exc), clip(text)))
        lists = cls(entries, bad_lines=tuple(bad), source=source)
        if strict and lists.bad_lines:
            raise LoadError(source, lists.bad_lines)
        return lists

    @classmethod
    def load_csv(cls, path: str | Path, *, strict: bool = True) -> LocalLists:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return cls.parse_csv(f, source=str(path), strict=strict)


def _flatten(
    ranges: list[LocalEntry],
) -> tuple[list[str], list[str], list[LocalEntry]]:
    """Overlapping ranges -> disjoint sorted segments, each owned by its winning entry."""
    if not ranges:
        return [], [], []
    bounds = sorted({int(e.start) for e in ranges} | {int(e.end) + 1 for e in ranges})
    owner: list[LocalEntry | None] = [None] * (len(bounds) - 1)
    # next_free[i]: first unpainted segment index >= i (path-compressed), so painting the
    # ranges in priority order costs about O(segments + ranges log ranges).
    next_free = list(range(len(owner) + 1))

    def find(i: int) -> int:
        root = i
        while next_free[root] != root:
            root = next_free[root]
        while next_free[i] != root:
            next_free[i], i = root, next_free[i]
        return root

    def priority(e: LocalEntry) -> tuple[int, int, int]:
        return int(e.end) - int(e.start), _SEVERITY[e.kind], e.line

    for e in sorted(ranges, key=priority):
        lo = bisect_right(bounds, int(e.start)) - 1
        hi = bisect_right(bounds, int(e.end))  # segments lo..hi-1 lie inside e
        i = find(lo)
        while i < hi:
            owner[i] = e
            next_free[i] = i + 1
            i = find(i + 1)
    starts: list[str] = []
    ends: list[str] = []
    owners: list[LocalEntry] = []
    for i, found in enumerate(owner):
        if found is None:
            continue
        e = found
        s, t = bounds[i], bounds[i + 1] - 1
        if owners and owners[-1] is e and int(ends[-1]) + 1 == s:
            ends[-1] = f"{t:014d}"  # merge neighbours owned by the same entry
        else:
            starts.append(f"{s:014d}")
            ends.append(f"{t:014d}")
            owners.append(e)
    return starts, ends, owners

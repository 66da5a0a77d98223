"""TAC rules: the GSMA TAC database (allocation), barred TACs and per-TAC SVN rules."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .common import BadLine, LoadError, clip
from .types import EquipmentStatus


def _is_tac(s: str) -> bool:
    return len(s) == 8 and s.isascii() and s.isdigit()


@dataclass(frozen=True, slots=True)
class TacInfo:
    """What the GSMA database says about one TAC (shown by `explain`)."""

    manufacturer: str = ""
    model_name: str = ""
    bands: str = ""
    allocation_date: str = ""


@dataclass(frozen=True, slots=True)
class SvnRule:
    """Devices of `tac` running a software version in `svns` get `status`.

    Example: SvnRule("35209900", frozenset({"01", "02"}), EquipmentStatus.GREYLISTED,
    "firmware with known baseband vulnerability"). Only applied when the request carries an SVN
    (Software-Version AVP, or the IMEISV's last two digits).
    """

    tac: str
    svns: frozenset[str]
    status: EquipmentStatus | None = EquipmentStatus.BLACKLISTED
    reason: str = ""

    def __post_init__(self) -> None:
        if not _is_tac(self.tac):
            raise ValueError(f"svn rule: TAC must be 8 digits, got {self.tac!r}")
        if not self.svns:
            raise ValueError(f"svn rule for TAC {self.tac}: empty SVN set")
        for svn in self.svns:
            if not (len(svn) == 2 and svn.isascii() and svn.isdigit()):
                raise ValueError(f"svn rule for TAC {self.tac}: SVN must be 2 digits, got {svn!r}")


def parse_svns(items: Iterable[str]) -> frozenset[str]:
    """["01", "05-07"] -> {"01", "05", "06", "07"}; ValueError on anything else."""
    out: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"SVN must be a string like '01' or '03-05', got {item!r}")
        lo, sep, hi = item.strip().partition("-")
        hi = hi if sep else lo
        if not all(len(x) == 2 and x.isascii() and x.isdigit() for x in (lo, hi)) or lo > hi:
            raise ValueError(f"SVN must be 'NN' or 'NN-NN' (2 digits), got {item!r}")
        out.update(f"{i:02d}" for i in range(int(lo), int(hi) + 1))
    return frozenset(out)


def _norm_header(name: str) -> str:
    return "".join(ch for ch in name.strip().lower() if ch.isalnum())


class TacDatabase:
    """TAC allocations (from the GSMA file) plus barred TACs and per-TAC SVN rules.

    `allocations` None means "no allocation data": the tac_unallocated rule then never fires
    (otherwise every TAC would look unallocated). Immutable after construction; to reload,
    build a new one and a new `Policy`.
    """

    __slots__ = ("allocations", "barred", "svn_rules", "bad_lines", "source")

    def __init__(
        self,
        allocations: Mapping[str, TacInfo] | Iterable[str] | None = None,
        *,
        barred: Mapping[str, str] | Iterable[str] = (),
        svn_rules: Iterable[SvnRule] = (),
        bad_lines: tuple[BadLine, ...] = (),
        source: str = "",
    ) -> None:
        if allocations is None:
            alloc: dict[str, TacInfo] | None = None
        elif isinstance(allocations, Mapping):
            alloc = dict(allocations)
        else:
            empty = TacInfo()
            alloc = dict.fromkeys(allocations, empty)
        if alloc is not None:
            for tac in alloc:
                if not _is_tac(tac):
                    raise ValueError(f"TAC must be 8 digits, got {tac!r}")
        barred_map = dict(barred) if isinstance(barred, Mapping) else dict.fromkeys(barred, "")
        for tac in barred_map:
            if not _is_tac(tac):
                raise ValueError(f"barred TAC must be 8 digits, got {tac!r}")
        self.allocations = alloc
        self.barred: dict[str, str] = barred_map
        self.svn_rules: tuple[SvnRule, ...] = tuple(svn_rules)
        self.bad_lines = bad_lines
        self.source = source

    def __len__(self) -> int:
        return 0 if self.allocations is None else len(self.allocations)

    def __repr__(self) -> str:
        return (
            f"TacDatabase({len(self)} allocations, {len(self.barred)} barred, "
            f"{len(self.svn_rules)} svn rules, {len(self.bad_lines)} bad lines)"
        )

    def info(self, tac: str) -> TacInfo | None:
        return None if self.allocations is None else self.allocations.get(tac)

    def with_rules(
        self, *, barred: Mapping[str, str] | Iterable[str] = (), svn_rules: Iterable[SvnRule] = ()
    ) -> TacDatabase:
        """A copy with extra barred TACs / SVN rules added (the allocations are shared)."""
        more = dict(barred) if isinstance(barred, Mapping) else dict.fromkeys(barred, "")
        db = TacDatabase(None, barred={**self.barred, **more},
                         svn_rules=(*self.svn_rules, *svn_rules),
                         bad_lines=self.bad_lines, source=self.source)
        db.allocations = self.allocations
        return db

    @classmethod
    def parse_gsma(
        cls, lines: Iterable[str], *, source: str = "<gsma>", strict: bool = False
    ) -> TacDatabase:
        """Parse the GSMA pipe-delimited TAC file.

        The first non-blank line is the header; columns are found by name (case, spaces and
        underscores ignored): TAC (required), Manufacturer, Model_Name (or Marketing Name),
        Bands, Allocation_Date; others are ignored. BOM and CRLF are tolerated. A line with the
        wrong number of fields, a TAC that is not 8 digits, or a duplicate TAC is recorded in
        `bad_lines` (first occurrence kept); strict=True raises LoadError instead.
        """
        it = iter(enumerate(lines, 1))
        header: list[str] | None = None
        for _lineno, line in it:
            line = line.lstrip("\ufeff").rstrip("\r\n")
            if line.strip():
                header = [_norm_header(h) for h in line.split("|")]
                break
        if header is None:
            raise LoadError(source, (), "empty file (no header line)")
        if "tac" not in header:
            raise LoadError(source, (), f"header has no TAC column: {header!r}")
        width = len(header)

        def col(*names: str) -> int | None:
            return next((header.index(n) for n in names if n in header), None)

        i_tac = header.index("tac")
        i_man, i_mod = col("manufacturer"), col("modelname", "marketingname")
        i_bands, i_date = col("bands"), col("allocationdate")
        alloc: dict[str, TacInfo] = {}
        first_seen: dict[str, int] = {}
        bad: list[BadLine] = []
        intern = sys.intern  # a few thousand manufacturers shared by ~10^5 rows
        for lineno, line in it:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("|")
            if len(fields) != width:
                bad.append(BadLine(lineno, f"expected {width} fields, got {len(fields)}", clip(line)))
                continue
            tac = fields[i_tac].strip()
            if not _is_tac(tac):
                bad.append(BadLine(lineno, "TAC is not 8 digits", clip(line)))
                continue
            if tac in alloc:
                bad.append(BadLine(lineno, f"duplicate TAC (first on line {first_seen[tac]})",
                                   clip(line)))
                continue
            first_seen[tac] = lineno
            alloc[tac] = TacInfo(
                intern(fields[i_man].strip()) if i_man is not None else "",
                fields[i_mod].strip() if i_mod is not None else "",
                intern(fields[i_bands].strip()) if i_bands is not None else "",
                intern(fields[i_date].strip()) if i_date is not None else "",
            )
        if strict and bad:
            raise LoadError(source, tuple(bad))
        return cls(alloc, bad_lines=tuple(bad), source=source)

    @classmethod
    def load_gsma(cls, path: str | Path, *, strict: bool = False) -> TacDatabase:
        """Read a GSMA TAC file (UTF-8, undecodable bytes replaced). See `parse_gsma`."""
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
            return cls.parse_gsma(f, source=str(path), strict=strict)

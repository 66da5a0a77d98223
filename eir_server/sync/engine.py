"""One sync run: plan (noop / delta / full), build a new version beside the live one, switch.

Invariants:
- Nothing a reader can see changes until the single CAS on N:cur; a failure or crash before it
  leaves the previous version serving, and its half-written keys are deleted by the next run's
  GC (every version id is registered in N:versions before its first key is written).
- The applied run id of every list is stored in the version's meta, so "what is served" and
  "what was applied" cannot disagree; re-running the same files is a no-op.
- A delta applies only on top of the run id it names as base; any gap means a full load built
  from the newest full list of every list name.
"""

from __future__ import annotations

import gc
import io
import json
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from eir_server.policy import LoadError, TacDatabase
from eir_server.policy.types import NotificationEntry
from eir_server.store import layout
from eir_server.store.codec import Listing, decode_listing, encode_blacklist
from eir_server.store.register import (
    DEFAULT_LIMITS,
    CsvReport,
    Limits,
    ListKind,
    ListName,
    ListZip,
    RegisterError,
    apply_row,
    iter_rows_numbered,
    open_list_zip,
    parse_zip_name,
    split_reasons,
)

from .blacklist import BlacklistParser, NeedGeneric, iter_blocks
from .columnar import ColumnarParser, dedupe, restore_commands, small_pages
from .progress import BAD_ROWS, DUP_ROWS, IMEIS, Progress
from .redis_db import BulkWriter, Current, RegisterDB, bulk
from .source import Source, file_sha256, read_tac_text

log = structlog.get_logger("eir.sync")


@dataclass(slots=True)
class SyncOptions:
    max_bad_share: float = 0.01
    bucket_size: int | None = None  # target entries per bucket; None: 3/4 the listpack limit
    compact_threshold: int = 200_000  # overlay entries beyond which a delta becomes a full load
    flush_rows: int | None = None  # rows buffered per write round (None: from bucket count)
    max_records: int = 65_536  # distinct shared blacklist records per version
    read_block: int = 1 << 20  # bytes per read of the full blacklist (tests use tiny blocks)
    # Write a full load's buckets as whole listpacks (RESTORE, see sync/listpack.py) when the
    # server takes them (Redis >= 7.0); else with HSETs.
    restore: bool = True
    grace: float = 2.0  # seconds between the switch and deleting the old version
    force_full: bool = False
    allow_missing_lists: bool = False
    # A list whose entries drop by more than this share versus the served version is refused
    # (an empty or header-only full list is the extreme case), unless allow_shrink.
    max_shrink: float = 0.10
    allow_shrink: bool = False
    limits: Limits = DEFAULT_LIMITS  # line / reasons length bounds
    # Zip bomb guard: a member inflating to more than this, or by more than MAX_RATIO once
    # over RATIO_FLOOR bytes, is refused before it is read.
    max_member_bytes: int = 16 << 30
    progress: Progress | None = None
    tac_hook: Callable[[Path], None] | None = None
    # Test hook: called with a stage name at each step; raising there simulates a crash.
    checkpoint: Callable[[str], None] = lambda stage: None


@dataclass(slots=True)
class RunResult:
    mode: str  # "noop" | "delta" | "full" | "failed"
    version: str | None
    previous: str | None
    lists: dict[str, dict[str, Any]] = field(default_factory=dict)
    imeis: int = 0
    rows: int = 0
    bad_rows: int = 0
    duration_s: float = 0.0
    error: str | None = None
    # list name -> why its new file was refused; the list kept its previous version
    refused: dict[str, str] = field(default_factory=dict)
    tac: dict[str, Any] | None = None  # the GSMA TAC file seen: file, sha256, rows, bad, ...
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def as_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "mode": self.mode,
            "version": self.version,
            "previous": self.previous,
            "lists": self.lists,
            "imeis": self.imeis,
            "rows": self.rows,
            "bad_rows": self.bad_rows,
            "duration_s": round(self.duration_s, 3),
            "rows_per_s": round(self.rows / self.duration_s) if self.duration_s > 0 else 0,
            "error": self.error,
            "refused": self.refused,
            "gsma_tac": self.tac,
            "finished": time.time(),
        }


def _ts(name: str) -> str:
    return name[:15]


# Register CSVs inflate ~3-5x (random IMEIs); 200x on a member over 64 MB is a zip bomb.
MAX_RATIO = 200
RATIO_FLOOR = 64 << 20
_PIN_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    zlib.error,
    NotImplementedError,  # compression method
    RuntimeError,  # encrypted member
    KeyError,
    UnicodeError,
)
_ZIP_ERRORS = (*_PIN_ERRORS, OSError)  # where only the file is read (not Redis sockets)


def check_members(path: Path, max_bytes: int) -> None:
    """Refuse a zip whose members would inflate past `max_bytes` or by a bomb-like ratio."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except _ZIP_ERRORS as e:
        raise RegisterError(f"{path.name}: unreadable or truncated zip ({e})") from e
    for i in infos:
        if i.file_size > max_bytes:
            raise RegisterError(
                f"{path.name}: member {i.filename} inflates to {i.file_size} bytes "
                f"(> {max_bytes}, --max-member-bytes), refused"
            )
        if i.file_size > RATIO_FLOOR and i.file_size > MAX_RATIO * max(i.compress_size, 1):
            raise RegisterError(
                f"{path.name}: member {i.filename} inflates {i.file_size // max(i.compress_size, 1)}"
                f"x ({i.compress_size} -> {i.file_size} bytes): refused as a zip bomb"
            )


def restrictive_blacklist(old: tuple[str, str], new: tuple[str, str]) -> bool:
    """Whether a duplicate blacklist row `new` replaces `old` (same IMEI, same list): the most
    restrictive wins, i.e. the earliest block_date (the device is blocked from the earliest
    date any row gives); on the same date the first row stays."""
    return new[0] < old[0]


def restrictive_notification(old: NotificationEntry, new: NotificationEntry) -> bool:
    """Duplicate (IMEI, IMSI) notification rows: no amnesty beats amnesty, then the earliest
    block_date; otherwise the first row stays."""
    return (new.amnesty_granted, new.block_date) < (old.amnesty_granted, old.block_date)


def entries_of(listing: Listing, lname: ListName) -> int:
    """How many entries of list `lname` a merged listing holds (for the shrink guard)."""
    if lname.kind is ListKind.BLACKLIST:
        return int(listing.blacklist is not None)
    table = listing.notifications if lname.kind is ListKind.NOTIFICATIONS else listing.exceptions
    return sum(1 for op, _ in table if op == lname.operator)


class NeedFull(Exception):
    pass


class ListRefused(RegisterError):
    """One list's file is refused (bad rows, corrupt zip, checksum): the run can go on with that
    list kept at its previous version."""

    def __init__(self, lname: ListName, message: str) -> None:
        super().__init__(message)
        self.list = lname


class _Pinned:
    """Turns a RegisterError raised while handling one list's file into ListRefused."""

    def __init__(self, lname: ListName) -> None:
        self.lname = lname

    def __enter__(self) -> None:
        return None

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: Any) -> None:
        if isinstance(e, RegisterError) and not isinstance(e, ListRefused):
            raise ListRefused(self.lname, str(e)) from e
        if isinstance(e, _PIN_ERRORS):
            # zipfile's own errors (encrypted member, unknown compression, bad CRC): the file
            # is refused like any other bad input, never a traceback.
            raise ListRefused(self.lname, f"{self.lname}: unreadable zip data ({e!r})") from e


class SyncRun:
    def __init__(self, source: Source, db: RegisterDB, opts: SyncOptions) -> None:
        self.source = source
        self.db = db
        self.opts = opts
        self.progress = opts.progress or Progress("never")
        self.reports: list[CsvReport] = []
        self._zips: dict[str, ListZip] = {}
        # Lists whose new file was refused in this run -> the zip name they keep being served
        # from (None: the list was never served, leave it out).
        self.pinned: dict[ListName, str | None] = {}
        # Buckets a full load wrote a field into (by suffix): the others get a marker field, so
        # that every bucket key of the load exists (see layout.MARKER_FIELD).
        self._written = bytearray()

    # -- planning ------------------------------------------------------------------------------
    def _zip(self, name: str) -> ListZip:
        z = self._zips.get(name)
        if z is None:
            parsed = parse_zip_name(name)
            assert parsed is not None
            with _Pinned(parsed[1]):
                path = self.source.fetch(name)
                check_members(path, self.opts.max_member_bytes)
                z = self._zips[name] = open_list_zip(path)
        return z

    def plan(
        self, cur: Current
    ) -> tuple[dict[ListName, list[str]], dict[ListName, list[ListZip]], bool]:
        """-> (available names per list, delta chains per changed list, full load needed)."""
        available = self.source.list_zips()
        for lname, keep in self.pinned.items():
            if keep is None:
                available.pop(lname, None)
            else:  # as if nothing newer than the served file were published
                available[lname] = [n for n in available.get(lname, []) if n < keep] + [keep]
        applied = cur.lists
        missing = [n for n in applied if ListName.parse(n) not in available]
        if missing and not self.opts.allow_missing_lists:
            raise RegisterError(
                f"lists {missing} are served but no longer published by the source; "
                "refusing to drop them (use --allow-missing-lists)"
            )
        chains: dict[ListName, list[ListZip]] = {}
        full = self.opts.force_full or cur.version is None or bool(missing)
        full = self._served_load_lost_buckets(cur) or full
        for lname, names in sorted(available.items()):
            a = applied.get(str(lname))
            if a is not None and a["file"] == names[-1]:
                continue  # this list is up to date
            if a is None:
                full = True
                chains[lname] = []
                continue
            newer = [self._zip(n) for n in names if _ts(n) > a["ts"]]
            prev = a["run_id"]
            ok = bool(newer)
            for z in newer:
                if z.base_run_id != prev:
                    ok = False
                    break
                prev = z.run_id
            if not ok:
                log.info("delta chain broken, full load", list=str(lname), applied=a["run_id"])
                full = True
            chains[lname] = newer
        return available, chains, full

    def _served_load_lost_buckets(self, cur: Current) -> bool:
        """Whether buckets of the served full load are gone from Redis (a Cluster primary
        back without its data): lookups of their IMEIs get the fallback until a full load
        writes them again, so this run makes one whatever the lists say."""
        b = cur.buckets
        if b is None:
            return False
        lost = self.db.missing_buckets(b)
        if not lost:
            return False
        log.error("register incomplete in Redis: buckets of the served full load are missing; "
                  "loading the register in full to restore them", missing=lost,
                  buckets=10**b.k, base=b.base)
        return True

    # -- run -----------------------------------------------------------------------------------
    def run(self) -> RunResult:
        t0 = time.monotonic()
        cur = self.db.current()
        result = RunResult("noop", cur.version, cur.version)
        try:
            tac = self._stage_tac(result)
            while True:
                try:
                    self._attempt(cur, result)
                    break
                except ListRefused as e:
                    self._pin(cur, e, result)
            if tac is not None:
                self.db.switch_tac(*tac)
                assert result.tac is not None
                result.tac["switched"] = True
                log.info("GSMA TAC file switched", sha256=tac[0], **tac[1])
        except BaseException as e:
            result.mode = "failed"
            result.version = cur.version
            result.error = f"{type(e).__name__}: {e}"
            raise
        finally:
            result.duration_s = time.monotonic() - t0
            result.bad_rows = sum(r.bad for r in self.reports)
            BAD_ROWS.inc(result.bad_rows)
            DUP_ROWS.inc(sum(r.duplicates for r in self.reports))
            for r in self.reports:
                if r.bad:  # docs/sync.md: bad rows reported by line in the run record and log
                    log.warning(
                        "bad rows skipped",
                        source=r.source,
                        bad=r.bad,
                        rows=r.rows,
                        first=[f"line {b.line}: {b.reason}" for b in r.samples],
                    )
                name = r.source.split(":")[0][16:-4]
                result.lists.setdefault(name, {}).setdefault("files", []).append(r.as_dict())
            if result.refused and result.error is None:
                result.error = "; ".join(f"{k}: {v}" for k, v in sorted(result.refused.items()))
            try:
                self.db.record_run(result.as_dict())
            except Exception as e:  # noqa: BLE001 - the run's own outcome matters more
                log.warning("could not record sync run", error=repr(e))
        return result

    def _attempt(self, cur: Current, result: RunResult) -> None:
        self.reports = []
        available, chains, full = self.plan(cur)
        self.opts.checkpoint("planned")
        if not available and cur.version is None:
            full = False  # every list refused on an empty store: no empty version to serve
        if not chains and not full:
            result.mode = "noop"
            result.lists = cur.lists
            result.imeis = int(cur.meta.get("count", 0))
            return
        if not full:
            try:
                self._delta(cur, chains, result)
                return
            except NeedFull:
                log.info(
                    "overlay over compact threshold, full load",
                    threshold=self.opts.compact_threshold,
                )
        self._full(cur, available, result)

    def _pin(self, cur: Current, e: ListRefused, result: RunResult) -> None:
        """Keep a refused list at its served file and plan again without its new files."""
        name = str(e.list)
        if e.list in self.pinned:
            keep = self.pinned[e.list]
            raise RegisterError(
                f"{e} (while keeping {name} at its served file {keep}: nothing applied)"
            ) from e
        self.pinned[e.list] = keep = cur.lists.get(name, {}).get("file")
        result.refused[name] = str(e)
        log.error(
            "list file refused; the list keeps its previous version, the others go on",
            list=name,
            kept=keep,
            error=str(e),
        )
        self.db.gc()  # keys of a version this attempt may have started writing

    def _stage_tac(self, result: RunResult) -> tuple[str, dict[str, Any]] | None:
        """Validate a new GSMA TAC file and store its text (not served yet).

        Returns (sha256, info) to switch to once the lists are done, or None when there is no
        TAC file, it is the one served, or it was refused (recorded in `result.refused`, the
        served TAC file stays).
        """
        tac = self.source.tac_file()
        if tac is None:
            return None
        sha = file_sha256(tac)
        info: dict[str, Any] = {"file": tac.name, "sha256": sha}
        result.tac = info
        served = self.db.tac_current().get("sha256")
        if served == sha:
            info["unchanged"] = True
            return None
        try:
            text = read_tac_text(tac)
            db = TacDatabase.parse_gsma(
                io.StringIO(text.decode("utf-8-sig", errors="replace"), newline=""),
                source=tac.name,
            )
        except (LoadError, RegisterError) as e:
            return self._refuse_tac(result, info, str(e))
        rows, bad = len(db), len(db.bad_lines)
        info.update(rows=rows, bad=bad, bad_lines=[[b.line, b.reason] for b in db.bad_lines[:20]])
        if rows + bad == 0:
            return self._refuse_tac(result, info, f"{tac.name}: no TAC rows")
        if bad / (rows + bad) > self.opts.max_bad_share:
            first = "; ".join(f"line {b.line}: {b.reason}" for b in db.bad_lines[:5])
            return self._refuse_tac(
                result,
                info,
                f"{tac.name}: {bad} of {rows + bad} rows are bad "
                f"(> {self.opts.max_bad_share:.2%} allowed), file refused; {first}",
            )
        if self.opts.tac_hook is not None:
            self.opts.tac_hook(tac)
        info["replaced"] = served is not None  # readers of the old text need the grace
        stored = {"file": tac.name, "rows": rows, "bad": bad, "loaded": round(time.time(), 3)}
        self.db.put_tac(sha, text, stored)
        return sha, stored

    def _refuse_tac(self, result: RunResult, info: dict[str, Any], error: str) -> None:
        info["refused"] = True
        result.refused["gsma_tac"] = error
        log.error("GSMA TAC file refused; the served TAC file stays", error=error)
        return None

    def _switch(self, cur: Current, ver: str, result: RunResult, count: int) -> None:
        self.db.switch(cur.version, ver)
        result.version = ver
        result.imeis = count
        IMEIS.set(count)
        self.opts.checkpoint("switched")
        log.info(
            "register version switched",
            version=ver,
            previous=cur.version,
            mode=result.mode,
            imeis=count,
            rows=result.rows,
        )

    def _read_rows(
        self, z: ListZip, member: str, report: CsvReport, full: bool = False
    ) -> Iterator[tuple[int, str, Any]]:
        """(line, imei14, payload) of each good row; a full list must not be empty."""
        with _Pinned(z.list):
            zf = zipfile.ZipFile(z.path)
            try:
                with zf.open(member) as stream:
                    yield from iter_rows_numbered(z.list.kind, stream, report, self.opts.limits)
            finally:
                zf.close()
            report.check(self.opts.max_bad_share)
            if full:
                self._check_not_empty(z, report)
        self.reports.append(report)

    def _check_not_empty(self, z: ListZip, report: CsvReport) -> None:
        if report.rows + report.bad == 0 and not self.opts.allow_shrink:
            raise ListRefused(
                z.list,
                f"{report.source}: no rows (a 0-byte or header-only file); an empty full list "
                "is refused (--allow-shrink accepts it)",
            )

    def _check_shrink(self, cur: Current, lname: ListName, entries: int) -> None:
        """Refuse a list whose entries drop by more than --max-shrink versus the served one."""
        served = cur.lists.get(str(lname), {}).get("entries")
        if self.opts.allow_shrink or served is None or cur.version is None:
            return
        if entries < served * (1 - self.opts.max_shrink):
            drop = 1 - entries / served if served else 0.0
            raise ListRefused(
                lname,
                f"{lname}: {entries} entries where {served} are served, a drop of {drop:.1%} "
                f"(> {self.opts.max_shrink:.0%} allowed by --max-shrink); refused "
                "(--allow-shrink accepts it)",
            )

    @staticmethod
    def _replaces(lname: ListName, old: Any, new: Any) -> bool:
        if lname.kind is ListKind.BLACKLIST:
            return restrictive_blacklist(old, new)
        if lname.kind is ListKind.NOTIFICATIONS:
            return restrictive_notification(old, new)
        return False

    def _log_duplicates(self, report: CsvReport) -> None:
        if report.duplicates:
            log.warning(
                "duplicate IMEIs in one list: the most restrictive row was kept",
                source=report.source,
                duplicates=report.duplicates,
                first=[
                    f"{k}: kept line {a}, dropped line {b}" for k, a, b in report.dup_samples[:5]
                ],
            )

    # -- full load -----------------------------------------------------------------------------
    def _full(self, cur: Current, available: dict[ListName, list[str]], result: RunResult) -> None:
        result.mode = "full"
        latest = {lname: self._zip(names[-1]) for lname, names in available.items()}
        lists_meta: dict[str, dict[str, Any]] = {}
        extras: dict[str, Listing] = {}
        rows = 0
        for lname, z in sorted(latest.items()):
            lists_meta[str(lname)] = {"file": z.path.name, "ts": z.ts, "run_id": z.run_id}
            if lname.kind is ListKind.BLACKLIST:
                continue
            report = CsvReport(f"{z.path.name}:{z.full_member}")
            seen: dict[tuple[str, str], int] = {}  # (imei, imsi) -> line of the row kept
            notif = lname.kind is ListKind.NOTIFICATIONS
            for line, imei, payload in self._read_rows(z, z.full_member, report, full=True):
                listing = extras.get(imei)
                if listing is None:
                    listing = extras[imei] = Listing()
                key = (imei, payload.imsi)
                kept = seen.get(key)
                if kept is not None:
                    table = listing.notifications if notif else listing.exceptions
                    old = table[(lname.operator, payload.imsi)]
                    if notif and restrictive_notification(old, payload):  # type: ignore[arg-type]
                        seen[key] = line
                        report.add_duplicate(f"{imei}/{payload.imsi}", line, kept)
                    else:
                        report.add_duplicate(f"{imei}/{payload.imsi}", kept, line)
                        continue
                else:
                    seen[key] = line
                apply_row(listing, lname, "upsert", payload)
            self._log_duplicates(report)
            rows += report.rows
            lists_meta[str(lname)].update(rows=report.rows, entries=len(seen))
            self._check_shrink(cur, lname, len(seen))
        bl = latest.get(ListName(ListKind.BLACKLIST))
        with _Pinned(ListName(ListKind.BLACKLIST)):
            est = len(extras) + (self._estimate_rows(bl) if bl else 0)
        # Average bucket well under the listpack limit, so Poisson spread never tips one over.
        per_bucket = self.opts.bucket_size or max(8, self.db.hash_limits() * 3 // 4)
        k = layout.digits_for(est, per_bucket)
        ver = self.db.new_version(k, full=True)
        self.opts.checkpoint("version-created")
        buckets = layout.Buckets(self.db.ns, ver, k)
        writer = self.db.writer()
        table: dict[int, bytes] = {}
        self._written = bytearray(10**k)
        try:
            if bl is not None:
                with _Pinned(bl.list):
                    n, entries = self._write_blacklist(bl, buckets, writer, extras, table)
                rows += n
                lists_meta["blacklist"].update(rows=n, entries=entries)
                self._check_shrink(cur, bl.list, entries)
            cut = 14 - k
            for imei, listing in extras.items():
                if listing.is_empty():
                    continue
                key, f = buckets.locate(imei)
                writer.hset(key, {f: listing.encode()})
                self._written[int(imei[cut:])] = 1
            count = writer.flush()  # IMEIs: HSET replies count fields created, markers not yet
            self._write_markers(buckets, writer)
            self._write_table_meta(
                writer,
                ver,
                table,
                base=ver,
                k=k,
                kind="full",
                count=count,
                lists=lists_meta,
                overlay=0,
                markers=1,
            )
            writer.flush()
        finally:
            writer.close()
        result.rows = rows
        result.lists = {k: dict(v) for k, v in lists_meta.items()}
        self.opts.checkpoint("written")
        self._switch(cur, ver, result, count)

    def _write_markers(self, buckets: layout.Buckets, writer: BulkWriter) -> None:
        """The marker field in every bucket no IMEI fell into (few: k keeps buckets full)."""
        written = self._written
        i = written.find(0)
        while i >= 0:
            writer.hset(layout.bucket_key(buckets.ns, buckets.base, i, buckets.k),
                        {layout.MARKER_FIELD: b"1"})
            i = written.find(0, i + 1)

    def _estimate_rows(self, z: ListZip) -> int:
        """Rows in the blacklist from its size and the mean length of its first lines."""
        try:
            with zipfile.ZipFile(z.path) as zf:
                info = zf.getinfo(z.full_member)
                with zf.open(info) as f:
                    head = f.read(1 << 16)
        except _ZIP_ERRORS as e:
            raise RegisterError(f"{z.path.name}: corrupt data ({e})") from e
        if not head.strip(b"\xef\xbb\xbf\r\n\t "):
            if not self.opts.allow_shrink:
                raise RegisterError(
                    f"{z.path.name}:{z.full_member}: no rows (a 0-byte file); an empty full "
                    "list is refused (--allow-shrink accepts it)"
                )
            return 0
        lines = max(head.count(b"\n"), 1)
        return int(info.file_size / (len(head) / lines)) + 1

    def _value_of(
        self, table: dict[int, bytes]
    ) -> tuple[Callable[[str, str], bytes], Callable[[str, str], bytes]]:
        """-> (stored value, RESP `\\r\\n` + bulk of it) for a blacklist (date, raw reasons):
        a record id in the version's shared table while it has room, else the record."""
        values: dict[tuple[str, str], bytes] = {}
        max_records = self.opts.max_records

        def stored(date: str, raw: str) -> bytes:
            v = values.get((date, raw))
            if v is None:
                v = encode_blacklist(date, split_reasons(raw))
                if len(table) < max_records:
                    rid = len(table) + 1
                    table[rid] = v
                    v = b"%d" % rid
                values[(date, raw)] = v
            return v

        def resp(date: str, raw: str) -> bytes:
            return b"\r\n" + bulk(stored(date, raw))

        return stored, resp

    def _write_blacklist(
        self,
        z: ListZip,
        buckets: layout.Buckets,
        writer: BulkWriter,
        extras: dict[str, Listing],
        table: dict[int, bytes],
    ) -> tuple[int, int]:
        """The 10M-row path (see sync/blacklist.py): bytes-level runs of plain lines, the csv
        module only for the lines that need it; buckets flushed as one HSET each per round.
        -> (good rows, distinct IMEIs)."""
        k = buckets.k
        if self.opts.restore and self.db.restore_works(
            layout.overlay_key(buckets.ns, buckets.base)
        ):
            return self._write_blacklist_restore(z, buckets, writer, extras, table)
        report = CsvReport(f"{z.path.name}:{z.full_member}")
        stored, value_of = self._value_of(table)
        parser = BlacklistParser(k, report, value_of, extras, self.opts.limits)
        keys = [f"{buckets.ns}:{buckets.base}:b:{i:0{k}d}" for i in range(10**k)]
        heads = [b"$%d\r\n%s\r\n" % (len(key), key.encode()) for key in keys]
        sent = [0] * 10**k  # fields sent per bucket: a bucket holding fewer has duplicates
        # Rows buffered before writing: more rows per bucket per HSET means less Redis work.
        # 24 per bucket: ~2.4M rows (~170 MB of fragments) per round at k=5.
        chunk = self.opts.flush_rows or max(200_000, min(3_000_000, 10**k * 24))
        flushed = 0
        first_flush = True
        self.progress.start(z.path.name, self._estimate_rows(z))
        gc_was = gc.isenabled()
        gc.disable()  # millions of short-lived objects, nothing cyclic: skip the collector
        try:
            with zipfile.ZipFile(z.path) as zf, zf.open(z.full_member) as stream:
                for lineno, data in iter_blocks(
                    stream, report.source, self.opts.read_block, self.opts.limits.max_line
                ):
                    parser.feed(lineno, data)
                    self.progress.update(parser.rows)
                    if parser.rows - flushed >= chunk:
                        self._flush_groups(parser, keys, heads, writer, sent)
                        flushed = parser.rows
                        if first_flush:
                            first_flush = False
                            self.opts.checkpoint("buckets-partial")
                parser.finish()
        except NeedGeneric:
            return self._write_blacklist_generic(z, buckets, writer, extras, table)
        finally:
            if gc_was:
                gc.enable()
        self._flush_groups(parser, keys, heads, writer, sent)
        report.rows = parser.rows
        report.check(self.opts.max_bad_share)
        self._check_not_empty(z, report)
        self.progress.update(parser.rows)
        self.progress.finish()
        entries = self._resolve_duplicates(z, buckets, writer, sent, extras, stored, report)
        self.reports.append(report)
        return parser.rows, entries + parser.extra_entries

    def _write_blacklist_restore(
        self,
        z: ListZip,
        buckets: layout.Buckets,
        writer: BulkWriter,
        extras: dict[str, Listing],
        table: dict[int, bytes],
    ) -> tuple[int, int]:
        """`_write_blacklist` with the rows parsed as columns (sync/columnar.py) and each
        bucket written once, as a RESTOREd listpack, after the whole file is read and checked.
        -> (good rows, distinct IMEIs)."""
        report = CsvReport(f"{z.path.name}:{z.full_member}")
        k = buckets.k
        stored, _ = self._value_of(table)
        expect = self._estimate_rows(z)
        parser = ColumnarParser(k, report, stored, extras, self.opts.limits, expect)
        self.progress.start(z.path.name, expect)
        with small_pages():
            return self._restore_rows(z, buckets, writer, extras, table, report, parser)

    def _restore_rows(
        self,
        z: ListZip,
        buckets: layout.Buckets,
        writer: BulkWriter,
        extras: dict[str, Listing],
        table: dict[int, bytes],
        report: CsvReport,
        parser: ColumnarParser,
    ) -> tuple[int, int]:
        """The body of `_write_blacklist_restore` (numpy's huge pages off)."""
        k = buckets.k
        gc_was = gc.isenabled()
        gc.disable()  # nothing cyclic is made here: skip the collector
        try:
            with zipfile.ZipFile(z.path) as zf, zf.open(z.full_member) as stream:
                for lineno, data in iter_blocks(
                    stream, report.source, self.opts.read_block, self.opts.limits.max_line
                ):
                    parser.feed(lineno, data)
                    self.progress.update(parser.rows)
                parser.finish()
        except NeedGeneric:
            return self._write_blacklist_generic(z, buckets, writer, extras, table)
        finally:
            if gc_was:
                gc.enable()
        report.rows = parser.rows
        report.check(self.opts.max_bad_share)
        self._check_not_empty(z, report)
        self.progress.update(parser.rows)
        self.progress.finish()
        rows = dedupe(parser, report)
        self._log_duplicates(report)

        written = self._written

        def key_of(i: int) -> str:
            written[i] = 1
            return layout.bucket_key(buckets.ns, buckets.base, i, k)

        first = True
        for cmds in restore_commands(rows, parser.values, k, key_of):
            for key, head, body in cmds:
                writer.raw_parts(key, head, body)
            if first:
                first = False
                writer.flush()
                self.opts.checkpoint("buckets-partial")
        writer.flush()
        # RESTORE replies +OK: count the fields it created like HSET's replies are counted.
        writer.total += len(rows.key)
        self.reports.append(report)
        return parser.rows, len(rows.key) + parser.extra_entries

    @staticmethod
    def _flush_groups(
        parser: BlacklistParser,
        keys: list[str],
        heads: list[bytes],
        writer: BulkWriter,
        sent: list[int],
    ) -> None:
        fpre = parser.fpre
        hset = b"*%d\r\n$4\r\nHSET\r\n"
        raw = writer.raw_parts
        for i, frags in enumerate(parser.groups):
            if frags:
                n = len(frags)
                sent[i] += n
                raw(keys[i], b"".join((hset % (2 + 2 * n), heads[i], fpre)), fpre.join(frags))
                frags.clear()

    def _resolve_duplicates(
        self,
        z: ListZip,
        buckets: layout.Buckets,
        writer: BulkWriter,
        sent: list[int],
        extras: dict[str, Listing],
        stored: Callable[[str, str], bytes],
        report: CsvReport,
    ) -> int:
        """After the blacklist's bucket writes: the number of distinct IMEIs written.

        Redis counts the fields each HSET created, so duplicates cost nothing to detect; only
        when there are some, the buckets holding fewer fields than were sent are found (HLEN)
        and the file is read again (csv path) for the rows of those buckets, to keep the most
        restrictive row of each duplicated IMEI (`restrictive_blacklist`) and report the lines.
        """
        written = self._written
        for i, n in enumerate(sent):
            if n:
                written[i] = 1
        created = writer.flush()
        total = sum(sent)
        if created >= total:
            return created
        pipe = self.db.client.pipeline(transaction=False)
        nonempty = [i for i, n in enumerate(sent) if n]
        for i in nonempty:
            pipe.hlen(layout.bucket_key(buckets.ns, buckets.base, i, buckets.k))
        lens = pipe.execute()
        dup_buckets = {i for i, n in zip(nonempty, lens, strict=True) if n < sent[i]}
        cut = 14 - buckets.k
        seen: dict[str, tuple[int, str, str]] = {}  # imei -> (line, date, raw) kept
        fix: set[str] = set()
        again = CsvReport(report.source)
        with zipfile.ZipFile(z.path) as zf, zf.open(z.full_member) as stream:
            for line, imei, payload in iter_rows_numbered(
                ListKind.BLACKLIST, stream, again, self.opts.limits
            ):
                if int(imei[cut:]) not in dup_buckets or imei in extras:
                    continue
                prev = seen.get(imei)
                date, raw = payload  # type: ignore[misc]
                if prev is None:
                    seen[imei] = (line, date, raw)
                elif restrictive_blacklist(prev[1:], (date, raw)):
                    report.add_duplicate(imei, line, prev[0])
                    seen[imei] = (line, date, raw)
                    fix.add(imei)
                else:
                    report.add_duplicate(imei, prev[0], line)
                    fix.add(imei)
        # The last row of each duplicated IMEI is what Redis holds: write the kept one over it.
        for imei in sorted(fix):
            _, date, raw = seen[imei]
            key, f = buckets.locate(imei)
            writer.hset(key, {f: stored(date, raw)})
        writer.flush()
        self._log_duplicates(report)
        return created

    def _write_blacklist_generic(
        self,
        z: ListZip,
        buckets: layout.Buckets,
        writer: BulkWriter,
        extras: dict[str, Listing],
        table: dict[int, bytes],
    ) -> tuple[int, int]:
        """A header with other or extra columns (matched by name): the csv path for every row."""
        blk = ListName(ListKind.BLACKLIST)
        stored, _ = self._value_of(table)
        report = CsvReport(f"{z.path.name}:{z.full_member}")
        sent = [0] * 10**buckets.k
        cut = 14 - buckets.k
        extra_lines: dict[str, int] = {}
        n = 0
        for line, imei, payload in self._read_rows(z, z.full_member, report, full=True):
            n += 1
            listing = extras.get(imei)
            if listing is not None:
                kept = extra_lines.get(imei)
                if kept is not None:
                    old = listing.blacklist
                    assert old is not None
                    if not restrictive_blacklist((old.block_date, ""), payload):
                        report.add_duplicate(imei, kept, line)
                        continue
                    report.add_duplicate(imei, line, kept)
                extra_lines[imei] = line
                apply_row(listing, blk, "upsert", payload)
                continue
            date, raw = payload
            key, f = buckets.locate(imei)
            sent[int(imei[cut:])] += 1
            writer.hset(key, {f: stored(date, raw)})
        self.reports.remove(report)  # re-added below with the duplicates found
        entries = self._resolve_duplicates(z, buckets, writer, sent, extras, stored, report)
        self.reports.append(report)
        return n, entries + len(extra_lines)

    def _write_table_meta(
        self,
        writer: BulkWriter,
        ver: str,
        table: dict[int, bytes],
        *,
        lists: dict[str, dict[str, Any]],
        **meta: Any,
    ) -> None:
        tkey = layout.table_key(self.db.ns, ver)
        items = list(table.items())
        for start in range(0, len(items), 1000):
            writer.hset(tkey, {str(k): v for k, v in items[start : start + 1000]})
        m = {k: str(v) for k, v in meta.items()}
        m.update(
            lists=json.dumps(lists, sort_keys=True),
            records=str(len(table)),
            created=str(time.time()),
        )
        writer.hset(layout.meta_key(self.db.ns, ver), m)  # type: ignore[arg-type]

    # -- delta ---------------------------------------------------------------------------------
    def _delta(
        self, cur: Current, chains: dict[ListName, list[ListZip]], result: RunResult
    ) -> None:
        result.mode = "delta"
        assert cur.version is not None and cur.buckets is not None
        ops: list[tuple[str, ListName, str, Any]] = []
        lists_meta = {k: dict(v) for k, v in cur.lists.items()}
        rows = 0
        for lname, zips in sorted(chains.items()):
            counts: dict[str, int] = {}
            for z in zips:
                # Upserts of one key repeated within one published run (in one delta member or
                # across its reasons): the most restrictive row is applied, the rest reported.
                upserts: dict[tuple[str, str], tuple[int, int, CsvReport]] = {}
                for d in z.deltas:
                    report = CsvReport(f"{z.path.name}:{d.name}")
                    for line, imei, payload in self._read_rows(z, d.name, report):
                        if d.op == "upsert":
                            key = (imei, "" if lname.kind is ListKind.BLACKLIST else payload.imsi)
                            prev = upserts.get(key)
                            if prev is not None:
                                j, kept, _ = prev
                                if self._replaces(lname, ops[j][3], payload):
                                    report.add_duplicate("/".join(key).rstrip("/"), line, kept)
                                    ops[j] = (imei, lname, d.op, payload)
                                    upserts[key] = (j, line, report)
                                else:
                                    report.add_duplicate("/".join(key).rstrip("/"), kept, line)
                                continue
                            upserts[key] = (len(ops), line, report)
                        ops.append((imei, lname, d.op, payload))
                    self._log_duplicates(report)
                    counts[d.reason] = counts.get(d.reason, 0) + report.rows
                    rows += report.rows
            last = zips[-1]
            lists_meta[str(lname)] = {
                "file": last.path.name,
                "ts": last.ts,
                "run_id": last.run_id,
                "delta": counts,
            }
        old_overlay = self.db.read_hash(layout.overlay_key(self.db.ns, cur.version))
        touched = {op[0] for op in ops}
        if len(old_overlay.keys() | {i.encode() for i in touched}) > self.opts.compact_threshold:
            raise NeedFull
        raw_table = self.db.read_hash(layout.table_key(self.db.ns, cur.version))
        table = {int(k): v for k, v in raw_table.items()}
        current = self.db.read_listings(cur, touched, old_overlay, table)
        before = {i: not listing.is_empty() for i, listing in current.items()}
        changed = sorted(chains)
        entries_before = {ln: sum(entries_of(x, ln) for x in current.values()) for ln in changed}
        for imei, lname, op, payload in ops:
            apply_row(current[imei], lname, op, payload)
        for ln in changed:
            served = cur.lists.get(str(ln), {}).get("entries")
            if served is None:
                continue
            after = served + sum(entries_of(x, ln) for x in current.values()) - entries_before[ln]
            self._check_shrink(cur, ln, after)
            lists_meta[str(ln)]["entries"] = after
        by_value = {v: k for k, v in table.items()}
        overlay = dict(old_overlay)
        count = int(cur.meta.get("count", 0))
        for imei, listing in current.items():
            count += int(not listing.is_empty()) - int(before[imei])
            if listing.is_empty():
                value = b""  # tombstone: hides the full load's entry
            elif listing.blacklist_only():
                enc = listing.encode()
                rid = by_value.get(enc)
                if rid is None and len(table) < self.opts.max_records:
                    rid = max(table, default=0) + 1
                    table[rid] = enc
                    by_value[enc] = rid
                value = b"%d" % rid if rid is not None else enc
            else:
                value = listing.encode()
            overlay[imei.encode()] = value
        ver = self.db.new_version(0, full=False)
        self.opts.checkpoint("version-created")
        writer = self.db.writer()
        try:
            okey = layout.overlay_key(self.db.ns, ver)
            items = list(overlay.items())
            for start in range(0, len(items), 1000):
                writer.hset(okey, dict(items[start : start + 1000]))  # type: ignore[arg-type]
            b = cur.buckets
            self._write_table_meta(
                writer,
                ver,
                table,
                base=b.base,
                k=b.k,
                kind="delta",
                count=count,
                lists=lists_meta,
                overlay=len(overlay),
            )
            writer.flush()
        finally:
            writer.close()
        result.rows = rows
        result.lists = lists_meta
        self.opts.checkpoint("written")
        self._switch(cur, ver, result, count)


def run_once(source: Source, db: RegisterDB, opts: SyncOptions) -> RunResult:
    """Lock, run, and after the grace period delete versions nobody serves any more."""
    db.acquire_lock()
    try:
        db.gc()  # leftovers of crashed runs (never the current version or its base)
        db.gc_tac()
        result = SyncRun(source, db, opts).run()
        switched = result.mode in ("full", "delta") or (result.tac or {}).get("switched")
        # Readers of the old version need the grace; a first load replaced nothing.
        had_previous = result.previous is not None or (result.tac or {}).get("replaced")
        if switched and had_previous and opts.grace > 0:
            time.sleep(opts.grace)  # let every node's poller move off the old version
        db.gc()
        db.gc_tac()
        return result
    finally:
        db.release_lock()


def decode_value(v: bytes, table: dict[int, bytes]) -> Listing:
    return decode_listing(table[int(v)] if v[:1].isdigit() else v)

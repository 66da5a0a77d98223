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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from eir_server.policy import LoadError, TacDatabase
from eir_server.store import layout
from eir_server.store.codec import Listing, decode_listing, encode_blacklist
from eir_server.store.register import (
    CsvReport,
    ListKind,
    ListName,
    ListZip,
    RegisterError,
    apply_row,
    iter_list_rows,
    open_list_zip,
    parse_zip_name,
    split_reasons,
)

from .blacklist import BlacklistParser, NeedGeneric, iter_blocks
from .progress import BAD_ROWS, IMEIS, Progress
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
    grace: float = 2.0  # seconds between the switch and deleting the old version
    force_full: bool = False
    allow_missing_lists: bool = False
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

    # -- planning ------------------------------------------------------------------------------
    def _zip(self, name: str) -> ListZip:
        z = self._zips.get(name)
        if z is None:
            parsed = parse_zip_name(name)
            assert parsed is not None
            with _Pinned(parsed[1]):
                z = self._zips[name] = open_list_zip(self.source.fetch(name))
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
            for r in self.reports:
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
        if self.db.tac_current().get("sha256") == sha:
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

    def _read_rows(self, z: ListZip, member: str, report: CsvReport) -> Iterable[tuple[str, Any]]:
        with _Pinned(z.list):
            zf = zipfile.ZipFile(z.path)
            try:
                with zf.open(member) as stream:
                    yield from iter_list_rows(z.list.kind, stream, report)
            finally:
                zf.close()
            report.check(self.opts.max_bad_share)
        self.reports.append(report)

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
            for imei, payload in self._read_rows(z, z.full_member, report):
                listing = extras.get(imei)
                if listing is None:
                    listing = extras[imei] = Listing()
                apply_row(listing, lname, "upsert", payload)
            rows += report.rows
            lists_meta[str(lname)]["rows"] = report.rows
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
        try:
            if bl is not None:
                with _Pinned(bl.list):
                    n = self._write_blacklist(bl, buckets, writer, extras, table)
                rows += n
                lists_meta["blacklist"]["rows"] = n
            for imei, listing in extras.items():
                if listing.is_empty():
                    continue
                key, f = buckets.locate(imei)
                writer.hset(key, {f: listing.encode()})
            count = writer.flush()
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
            )
            writer.flush()
        finally:
            writer.close()
        result.rows = rows
        result.lists = {k: dict(v) for k, v in lists_meta.items()}
        self.opts.checkpoint("written")
        self._switch(cur, ver, result, count)

    def _estimate_rows(self, z: ListZip) -> int:
        """Rows in the blacklist from its size and the mean length of its first lines."""
        try:
            with zipfile.ZipFile(z.path) as zf:
                info = zf.getinfo(z.full_member)
                with zf.open(info) as f:
                    head = f.read(1 << 16)
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
            raise RegisterError(f"{z.path.name}: corrupt data ({e})") from e
        lines = max(head.count(b"\n"), 1)
        return int(info.file_size / (len(head) / lines)) + 1

    def _write_blacklist(
        self,
        z: ListZip,
        buckets: layout.Buckets,
        writer: BulkWriter,
        extras: dict[str, Listing],
        table: dict[int, bytes],
    ) -> int:
        """The 10M-row path (see sync/blacklist.py): bytes-level runs of plain lines, the csv
        module only for the lines that need it; buckets flushed as one HSET each per round."""
        report = CsvReport(f"{z.path.name}:{z.full_member}")
        k = buckets.k
        values: dict[tuple[str, str], bytes] = {}
        max_records = self.opts.max_records

        def value_of(date: str, raw: str) -> bytes:
            vf = values.get((date, raw))
            if vf is None:
                enc = encode_blacklist(date, split_reasons(raw))
                if len(table) < max_records:
                    rid = len(table) + 1
                    table[rid] = enc
                    enc = b"%d" % rid
                vf = values[(date, raw)] = b"\r\n" + bulk(enc)
            return vf

        parser = BlacklistParser(k, report, value_of, extras)
        keys = [f"{buckets.ns}:{buckets.base}:b:{i:0{k}d}" for i in range(10**k)]
        heads = [b"$%d\r\n%s\r\n" % (len(key), key.encode()) for key in keys]
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
                for lineno, data in iter_blocks(stream, report.source, self.opts.read_block):
                    parser.feed(lineno, data)
                    self.progress.update(parser.rows)
                    if parser.rows - flushed >= chunk:
                        self._flush_groups(parser, keys, heads, writer)
                        flushed = parser.rows
                        self.db.refresh_lock()
                        if first_flush:
                            first_flush = False
                            self.opts.checkpoint("buckets-partial")
        except NeedGeneric:
            return self._write_blacklist_generic(z, buckets, writer, extras, table)
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
            raise RegisterError(f"{report.source}: corrupt data ({e})") from e
        finally:
            if gc_was:
                gc.enable()
        self._flush_groups(parser, keys, heads, writer)
        report.rows = parser.rows
        report.check(self.opts.max_bad_share)
        self.reports.append(report)
        self.progress.update(parser.rows)
        self.progress.finish()
        return parser.rows

    @staticmethod
    def _flush_groups(
        parser: BlacklistParser, keys: list[str], heads: list[bytes], writer: BulkWriter
    ) -> None:
        fpre = parser.fpre
        hset = b"*%d\r\n$4\r\nHSET\r\n"
        raw = writer.raw_parts
        for i, frags in enumerate(parser.groups):
            if frags:
                raw(
                    keys[i],
                    b"".join((hset % (2 + 2 * len(frags)), heads[i], fpre)),
                    fpre.join(frags),
                )
                frags.clear()

    def _write_blacklist_generic(
        self,
        z: ListZip,
        buckets: layout.Buckets,
        writer: BulkWriter,
        extras: dict[str, Listing],
        table: dict[int, bytes],
    ) -> int:
        """Any column order (named by the header): the csv path for every row."""
        blk = ListName(ListKind.BLACKLIST)
        by_value: dict[bytes, int] = {}
        report = CsvReport(f"{z.path.name}:{z.full_member}")
        n = 0
        for imei, payload in self._read_rows(z, z.full_member, report):
            listing = extras.get(imei)
            if listing is not None:
                apply_row(listing, blk, "upsert", payload)
                continue
            date, raw = payload  # type: ignore[misc]
            enc = encode_blacklist(date, split_reasons(raw))
            rid = by_value.get(enc)
            if rid is None and len(table) < self.opts.max_records:
                rid = by_value[enc] = len(table) + 1
                table[rid] = enc
            key, f = buckets.locate(imei)
            writer.hset(key, {f: b"%d" % rid if rid else enc})
            n += 1
        return n

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
                for d in z.deltas:
                    report = CsvReport(f"{z.path.name}:{d.name}")
                    for imei, payload in self._read_rows(z, d.name, report):
                        ops.append((imei, lname, d.op, payload))
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
        for imei, lname, op, payload in ops:
            apply_row(current[imei], lname, op, payload)
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
        if switched and opts.grace > 0:
            time.sleep(opts.grace)  # let every node's poller move off the old version
        db.gc()
        db.gc_tac()
        return result
    finally:
        db.release_lock()


def decode_value(v: bytes, table: dict[int, bytes]) -> Listing:
    return decode_listing(table[int(v)] if v[:1].isdigit() else v)

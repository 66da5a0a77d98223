"""The embedded register as one node-shared snapshot file: parsed once, mapped by every worker.

Why: with `--workers N` each worker used to parse the register directory into its own dicts
(~100 bytes per IMEI once loaded, several times that while parsing), so N workers held N copies.
Here one builder process (`eir_server.store.register_snapshot`'s `main`) parses the directory
with the same row parser as before (`register.iter_rows_numbered`, merged as
`register.read_full_lists` does) and writes snapshot.py's format: the
IMEIs as sorted 64-bit integers and a 32-bit value each, 12 bytes per IMEI, mapped read-only by
every worker. The pages are shared through the page cache: an extra worker costs its code and
caches, not another copy of the register. A separate process, not a thread: the parse would hold
the serving loop's GIL for seconds and leave the worker's heap grown by gigabytes.

File: snapshot.py's format with k = 0 (the key is the IMEI itself); every value is an extras
entry holding the encoded listing (codec.py; blacklist-only listings with equal date and reasons
share one entry); extras entry 0 is a JSON description (format, register version, list run ids,
CSV reports). Name: `register-<dir>-<key>.snap` in a private directory (`resolve_dir`), <dir> a
hash of the register directory's path, <key> a hash of what the register's lists are (names,
sizes, mtimes and inodes of the newest full list of each list) and of the parser (eir-server
version, its source files, max_bad_share): a changed register or eir-server builds a new file,
an unchanged one is reused, also across restarts. Written under a temporary name, fsynced and
renamed (snapshot.Writer): a reader sees a whole file or none. One builder at a time per
register directory (flock: released by the kernel if the builder's parent dies); the others wait
for it and map its file. After a build, the register's older files are deleted (workers still
mapping one keep its pages until they switch) and so are other registers' files whose register
directory is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import structlog

from eir_server import __version__
from eir_server.policy.types import ImeiRecord

from . import codec
from .codec import Listing, decode_listing, decode_record
from .register import (
    BadRow,
    CsvReport,
    ListKind,
    ListName,
    ListSource,
    RegisterError,
    apply_row,
    iter_rows_numbered,
    latest_full_lists,
    open_source,
    split_reasons,
)
from .snapshot import EXTRA, Snapshot, Writer

log = structlog.get_logger("eir.store")

FORMAT = "eir-register-snapshot-1"
# Builder exit codes (anything else: the snapshot could not be built, the worker loads itself).
EXIT_REFUSED = 3  # the register was refused (RegisterError / unreadable): the same as loading it
EXIT_CHANGED = 4  # the register's files changed while it was read: try again
REFUSED_PREFIX = "register refused: "
# The parser's own code: a new eir-server may read the same files differently.
_CODE = tuple(Path(__file__).with_name(n) for n in ("register.py", "codec.py", "snapshot.py",
                                                        "register_snapshot.py"))


class SnapshotUnavailable(Exception):
    """No snapshot here (directory not writable or not private, disk full, build failed): the
    caller loads the register in its own process instead, as without a snapshot."""


def resolve_dir(option: str) -> Path | None:
    """`--register-snapshot-dir` -> the private directory the files are kept in; None: off.

    Empty (the default) means the system temp directory. The files always go in a subdirectory
    `eir-register-<uid>` created 0700: the option may name a shared directory (/tmp, a
    Kubernetes emptyDir) without another user being able to plant a register there.
    """
    value = option.strip()
    if value.lower() == "off":
        return None
    parent = Path(value) if value else Path(tempfile.gettempdir())
    return parent / f"eir-register-{os.getuid()}"


def prepare_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(directory)
    except OSError as e:
        raise SnapshotUnavailable(f"{directory}: {e.strerror or e}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise SnapshotUnavailable(f"{directory}: not a directory")
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        # Someone else could replace our files with a register of their own.
        raise SnapshotUnavailable(f"{directory}: not owned by uid {os.getuid()} or writable by "
                                  "others")


def dir_tag(register_dir: Path) -> str:
    # abspath, not resolve(): a register directory that is a symlink swapped to a new target
    # (a Kubernetes ConfigMap/Secret volume does that) stays one register.
    return hashlib.sha256(os.path.abspath(register_dir).encode()).hexdigest()[:12]


def register_key(register_dir: Path, max_bad_share: float) -> str:
    """What the register directory's lists are now, as a short hash (stat only, no reading).

    Raises what loading would raise for an unreadable directory or a broken zip.
    """
    sources = latest_full_lists(register_dir)
    h = hashlib.sha256(f"{FORMAT}|{__version__}|{max_bad_share!r}\n".encode())
    for f in _CODE:
        with contextlib.suppress(OSError):
            st = f.stat()
            h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    for lname in sorted(sources):
        src = sources[lname]
        st = src.path.stat()
        h.update(f"{lname}|{src.path.name}|{src.member}|{src.ts}|{src.run_id}|{st.st_size}|"
                 f"{st.st_mtime_ns}|{st.st_ino}\n".encode())
    return h.hexdigest()[:24]


def file_name(register_dir: Path, key: str) -> str:
    return f"register-{dir_tag(register_dir)}-{key}.snap"


class RegisterView:
    """One mapped register snapshot: `get(imei14)` -> the ImeiRecord or None, as MemoryStore's
    dict would answer. Blacklist-only records are decoded once per distinct entry and shared
    (as MemoryStore shares them); records with notifications or exceptions, one IMEI each, are
    decoded per lookup rather than kept."""

    __slots__ = ("path", "meta", "version", "reports", "lists", "_snap", "_shared", "_keys",
                 "_vals", "_n")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._snap = Snapshot(path)  # ValueError: not a complete snapshot file
        try:
            meta = json.loads(self._snap.extra(0))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError("not an embedded register snapshot")
        except (ValueError, UnicodeDecodeError) as e:
            self._snap.close()
            raise ValueError(f"{path}: {e}") from e
        self.meta: dict[str, Any] = meta
        self.version: str | None = meta.get("version")
        self.lists: dict[str, str] = dict(meta.get("lists") or {})
        self.reports = [_report(r) for r in meta.get("reports") or ()]
        self._shared: dict[int, ImeiRecord] = {}
        snap = self._snap
        self._keys, self._vals, self._n = snap._keys, snap._vals, snap.n

    def __len__(self) -> int:
        return self._n

    def get(self, imei14: str) -> ImeiRecord | None:
        try:
            key = int(imei14)
        except ValueError:  # not digits: not a key the register can hold
            return None
        pos = self._snap.find(key)
        if pos < 0:
            return None
        v = self._vals[pos]
        rec = self._shared.get(v)
        if rec is None:
            rec = decode_record(self._snap.extra(v & ~EXTRA))
            if rec is None or rec.notifications or rec.exceptions:
                return rec
            self._shared[v] = rec
        return rec

    def records(self) -> dict[str, ImeiRecord]:
        """Every record, as MemoryStore's dict holds them (blacklist-only records shared)."""
        out: dict[str, ImeiRecord] = {}
        for key in self._keys:
            imei = f"{key:014d}"
            rec = self.get(imei)
            if rec is not None:
                out[imei] = rec
        return out

    def close(self) -> None:
        self._keys = self._vals = None  # type: ignore[assignment]
        self._snap.close()


def _report(d: dict[str, Any]) -> CsvReport:
    return CsvReport(
        str(d["source"]), int(d["rows"]), int(d["bad"]),
        [BadRow(int(line), str(reason)) for line, reason in d.get("bad_lines") or ()],
        int(d.get("duplicates") or 0),
        [(str(k), int(a), int(b)) for k, a, b in d.get("duplicate_lines") or ()],
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive flock on `path`: the kernel drops it when its holder dies, so a killed
    builder never leaves the others waiting for a stale lock."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise SnapshotUnavailable(f"{path}: {e.strerror or e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure(register_dir: Path, directory: Path, max_bad_share: float) -> Path:
    """The snapshot file of `register_dir` as it is now, built first if there is none.

    Blocks while another process builds it. Raises RegisterError (or OSError) when the
    register itself cannot be loaded, SnapshotUnavailable when only the snapshot cannot be had.
    """
    key = register_key(register_dir, max_bad_share)
    prepare_dir(directory)
    lock = directory / f"register-{dir_tag(register_dir)}.lock"
    for _ in range(5):
        path = directory / file_name(register_dir, key)
        if path.exists():
            return path
        with _locked(lock):
            if path.exists():  # built by the process we waited for
                return path
            started = time.monotonic()
            proc = subprocess.run(
                [sys.executable, *BUILDER, "--register",
                 str(register_dir), "--out", str(path), "--key", key, "--max-bad-share",
                 repr(max_bad_share)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                text=True, check=False)
            err = proc.stderr.strip()
            # The file, not the exit code, says it worked (a parent reaping every child
            # could take the exit status).
            if path.exists():
                log.info("register snapshot built", snapshot=str(path),
                         seconds=round(time.monotonic() - started, 2))
                return path
        if REFUSED_PREFIX in err:
            raise RegisterError(err.split(REFUSED_PREFIX, 1)[1].strip())
        if proc.returncode != EXIT_CHANGED:
            raise SnapshotUnavailable(f"snapshot build failed (exit {proc.returncode}): "
                                      f"{err[-500:]}")
        key = register_key(register_dir, max_bad_share)  # changed meanwhile: build the new one
    raise SnapshotUnavailable("the register kept changing while its snapshot was built")


def open_view(register_dir: Path, directory: Path, max_bad_share: float,
              current: RegisterView | None = None) -> RegisterView:
    """Map the snapshot of `register_dir` (building it if needed); `current` when unchanged."""
    for attempt in range(2):
        path = ensure(register_dir, directory, max_bad_share)
        if current is not None and current.path == path:
            return current
        try:
            return RegisterView(path)
        except (OSError, ValueError) as e:
            if attempt:
                raise SnapshotUnavailable(f"{path}: unreadable ({e})") from e
            with contextlib.suppress(OSError):
                path.unlink()  # e.g. cut short by a power loss: build it again
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# The builder process


def read_lists(sources: dict[ListName, ListSource], max_bad_share: float,
               reports: list[CsvReport]) -> tuple[dict[int, int], list[bytes],
                                                  dict[str, Listing]]:
    """`register.read_full_lists`, with the blacklist kept lean: {IMEI as int: line << 32 |
    entry id} over a table of distinct (date, reasons) encodings, instead of a Listing object
    per IMEI (a 10M-row blacklist: ~1.5 GB and half the time, instead of ~6 GB). Notification
    and exception lists, far smaller, are merged into Listings exactly as read_full_lists does.
    Same rows, same duplicate rule (the earliest block_date wins), same reports, same refusals.
    """
    blacklist: dict[int, int] = {}
    table: list[bytes] = []
    dates: list[str] = []
    ids: dict[tuple[str, str], int] = {}
    others: dict[str, Listing] = {}
    for lname in sorted(sources):
        src = sources[lname]
        report = CsvReport(src.path.name if src.member is None else f"{src.path.name}:{src.member}")
        with open_source(src) as stream:
            rows = iter_rows_numbered(lname.kind, stream, report)
            if lname.kind is ListKind.BLACKLIST:
                for line, imei, payload in rows:
                    date, raw = payload  # type: ignore[misc]
                    eid = ids.get(payload)  # type: ignore[arg-type]
                    if eid is None:
                        eid = ids[payload] = len(table)  # type: ignore[index]
                        table.append(codec.encode_blacklist(date, split_reasons(raw)))
                        dates.append(date)
                    key = int(imei)
                    had = blacklist.get(key)
                    if had is not None:
                        if date >= dates[had & 0xFFFFFFFF]:
                            report.add_duplicate(imei, had >> 32, line)
                            continue
                        report.add_duplicate(imei, line, had >> 32)
                    blacklist[key] = line << 32 | eid
            else:
                for _, imei, payload in rows:
                    listing = others.get(imei)
                    if listing is None:
                        listing = others[imei] = Listing()
                    apply_row(listing, lname, "upsert", payload)
        report.check(max_bad_share)
        reports.append(report)
    return blacklist, table, others


def build(register_dir: Path, out: Path, key: str, max_bad_share: float) -> int:
    """Parse `register_dir` and write its snapshot to `out`; the number of IMEIs."""
    sources = latest_full_lists(register_dir)
    reports: list[CsvReport] = []
    blacklist, table, others = read_lists(sources, max_bad_share, reports)
    if register_key(register_dir, max_bad_share) != key:
        raise _Changed
    listed = blacklist.keys() | {int(i) for i in others} if others else blacklist.keys()
    meta = {
        "format": FORMAT,
        "register": os.path.abspath(register_dir),
        "key": key,
        "version": max((s.ts for s in sources.values()), default=None),
        "lists": {str(k): v.run_id for k, v in sorted(sources.items())},
        "reports": [r.as_dict() for r in reports],
        "imeis": len(listed),
        "built": time.time(),
    }
    w = Writer(0)
    w.add_extra(json.dumps(meta).encode())
    offsets: dict[int, int] = {}  # blacklist entry id -> its extras offset, written once
    keys, vals = w.keys, w.vals
    for imei in sorted(listed):
        v = blacklist.get(imei)
        listing = others.get(f"{imei:014d}") if others else None
        if listing is None:
            assert v is not None
            eid = v & 0xFFFFFFFF
            off = offsets.get(eid)
            if off is None:
                off = offsets[eid] = w.add_extra(table[eid])
        else:
            if v is not None:
                listing.blacklist = decode_listing(table[v & 0xFFFFFFFF]).blacklist
            off = w.add_extra(listing.encode())
        keys.append(imei)
        vals.append(EXTRA | off)
    del blacklist, others, listed
    try:
        w.finish(out)
    except OSError as e:
        raise _NotWritten(str(e)) from e
    remove_stale(out)
    return len(keys)


class _Changed(Exception):
    pass


class _NotWritten(Exception):
    pass


_TMP_PID = re.compile(r"\.tmp(\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(keep: Path) -> None:
    """After building `keep`: delete its register's other snapshots, temporary files of
    builders that died, and snapshots of registers whose directory no longer exists."""
    directory = keep.parent
    own = keep.name.rsplit("-", 1)[0] + "-"  # register-<dir>-
    for p in directory.glob("register-*"):
        if p == keep:
            continue
        m = _TMP_PID.search(p.name)
        if m is not None:
            if not _alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    p.unlink()
            continue
        if not p.name.endswith(".snap"):
            continue
        if p.name.startswith(own):
            with contextlib.suppress(OSError):
                p.unlink()  # workers still mapping it keep its pages until they switch
            continue
        try:
            view = RegisterView(p)
        except (OSError, ValueError):
            continue  # not ours to judge
        try:
            orphan = not os.path.isdir(str(view.meta.get("register") or ""))
        finally:
            view.close()
        if orphan:
            with contextlib.suppress(OSError):
                p.unlink()


# See snapshot.BUILDER.
BUILDER: Final = ("-c", "import sys; from eir_server.store.register_snapshot import main; "
                  "sys.exit(main())")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="build the embedded register's snapshot file")
    ap.add_argument("--register", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--max-bad-share", type=float, required=True)
    a = ap.parse_args(argv)
    try:
        build(Path(a.register), Path(a.out), a.key, a.max_bad_share)
    except _Changed:
        print("register changed while it was read", file=sys.stderr)
        return EXIT_CHANGED
    except _NotWritten as e:
        print(f"snapshot not written: {e}", file=sys.stderr)
        return 1
    except (RegisterError, OSError) as e:  # reading the register: what loading it would say
        print(f"{REFUSED_PREFIX}{e}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as e:  # noqa: BLE001 - reported to the worker, which loads by itself
        print(f"snapshot build failed: {e!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

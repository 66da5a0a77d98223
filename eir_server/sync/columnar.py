"""The full blacklist load as columns: no Python work per row on the common path.

As in `BlacklistParser` (blacklist.py), plain lines (LINE_RE) take the fast path and every
other line goes the csv way, one by one, with its line number. Here LINE_RE is checked on all
the lines of a block at once with numpy (`_lines`: line ends, the two commas, digit words,
forbidden bytes; the same regex still decides for lines of blocks with quotes), and each plain
row becomes a sort key (the IMEI rotated so that its bucket digits come first) and a value id. A tail is checked (calendar date, reason text) and given a
value id once; later rows find it in a sorted table of tail hashes, and every hit is confirmed
by comparing the tail's bytes, so a hash collision can only send rows the slow way, never
give them another value. Rows that fail a check, or whose IMEI is on another list, go the csv
way in line order, as before.

At the end one sort puts the rows in bucket order; duplicates (equal neighbours) are resolved
as `_resolve_duplicates` does (most restrictive first, reported in file order) and each bucket
becomes one listpack, sent as a RESTORE payload (listpack.py).

10M rows on the shared 2-vCPU VM (docs/sync.md, "Speed"): the whole `sync --once` command
went from ~31 s of sync CPU and ~12.6 s of redis-server CPU to ~12 s and ~0.6 s. numpy is
a runtime dependency for this: no per-row Python is left on the common path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from eir_server.store.codec import FORBIDDEN, Listing
from eir_server.store.register import (
    DEFAULT_LIMITS,
    CsvReport,
    Limits,
    reasons_too_long,
    valid_date,
)

from .blacklist import BlacklistParser, _too_long
from .listpack import PAYLOAD_TAIL, crc64_many, entry, int32_entries, payload_head

U8 = npt.NDArray[np.uint8]

I64 = npt.NDArray[np.int64]
_WORDS = 5  # reasons up to 40 bytes are matched as words; longer ones row by row
_SHORT = 9 + 8 * _WORDS  # longest tail (date, comma, reasons) kept in the table
_COLS = (_SHORT + 7) // 8  # 8-byte words that cover a short tail
_MIX = np.array(
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
     0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9],
    dtype=np.uint64,
)  # fmt: skip
_MIX2 = np.uint64(0x9FB21C651E98DF25)  # the second way's slot: top bits of h * _MIX2
_MIN_ROWS = 1 << 16  # room for rows allocated at least (tests make it small)
_INVALID = -1
_EMPTY = -2
_SLOT_BITS = 18
_SLOT_SHIFT = np.uint64(64 - _SLOT_BITS)


def _madvise_switch() -> Callable[[bool], bool] | None:
    for mod in ("_core", "core"):  # numpy 2 / numpy 1.26
        multiarray = getattr(getattr(np, mod, None), "multiarray", None)
        f = getattr(multiarray, "_set_madvise_hugepage", None)
        if callable(f):
            return f  # type: ignore[no-any-return]
    return None


@contextmanager
def small_pages() -> Iterator[None]:
    """numpy's MADV_HUGEPAGE on large arrays off for the load, back as it was after.

    Why: the load allocates ~1 GB of short-lived arrays; on the 2-vCPU VM a first touch of a
    huge page costs ~10x the same memory in 4 KB pages (80 MB: ~0.4 s of system time against
    ~0.04 s), which was ~1.6 s of the ~3 s of system CPU of a 10M-row `sync --once`."""
    switch = _madvise_switch()
    was = switch(False) if switch else None
    try:
        yield
    finally:
        if switch and was is not None:
            switch(was)


_ASCII0 = np.uint64(0x3030303030303030)
_HI = np.uint64(0x8080808080808080)
_ADD = np.uint64(0x7676767676767676)


def _all_digits(w: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
    """Whether each word's 8 bytes are all ASCII digits (a byte x = b ^ 0x30 is a digit iff
    x <= 9, iff neither x nor x + 0x76 has bit 7 set; a carry only comes from a byte that
    already failed)."""
    x = w ^ _ASCII0
    out: npt.NDArray[np.bool_] = ((x | (x + _ADD)) & _HI) == 0
    return out


def _eight_digits(w: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The number written by each word's 8 ASCII digits (first digit in the low byte)."""
    x = w - _ASCII0
    x = ((x * np.uint64(10)) + (x >> np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)
    x = ((x * np.uint64(100)) + (x >> np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    return ((x * np.uint64(10000)) + (x >> np.uint64(32))) & np.uint64(0xFFFFFFFF)


def _slot(h: npt.NDArray[np.uint64], way: int) -> npt.NDArray[np.intp]:
    """Slot of tail hashes `h` in table way 0 or 1 (top bits of h, or of h * _MIX2)."""
    x = h if way == 0 else h * _MIX2
    out: npt.NDArray[np.intp] = (x >> _SLOT_SHIFT).astype(np.intp)
    return out


class _Rows:
    """(key, value id, line) of the rows kept so far, in arrays allocated once (from the
    expected row count; untouched capacity costs no memory) and grown by half when full:
    nothing to concatenate at the end, no array per block."""

    def __init__(self, capacity: int) -> None:
        self.n = 0
        self.key: I64 = np.empty(capacity, dtype=np.int64)
        self.vid: I64 = np.empty(capacity, dtype=np.int64)
        self.line: I64 = np.empty(capacity, dtype=np.int64)

    def _room(self, m: int) -> tuple[int, int]:
        n = self.n
        if n + m > len(self.key):
            cap = max(n + m, len(self.key) * 3 // 2)
            for name in ("key", "vid", "line"):
                new = np.empty(cap, dtype=np.int64)
                new[:n] = getattr(self, name)[:n]
                setattr(self, name, new)
        self.n = n + m
        return n, n + m

    def add(self, key: I64, vid: I64, idx: I64, first_line: int) -> None:
        """Rows `idx` of a block's `key` and `vid` columns; row r is line first_line + r."""
        a, b = self._room(len(idx))
        # mode="clip": with "raise" numpy writes to a temporary and copies (idx is in range)
        np.take(key, idx, out=self.key[a:b], mode="clip")
        np.take(vid, idx, out=self.vid[a:b], mode="clip")
        np.add(idx, first_line, out=self.line[a:b])

    def extend(self, key: list[int], vid: list[int], line: list[int]) -> None:
        a, b = self._room(len(key))
        self.key[a:b] = key
        self.vid[a:b] = vid
        self.line[a:b] = line


@dataclass(slots=True)
class _Lines:
    """One block's lines: start, end (the "\n"), content end (before a final "\r"), first
    comma, rotated IMEI key (valid where plain) and whether LINE_RE matches the line."""

    starts: I64
    nl: I64
    ce: I64
    c1: I64
    key: I64
    plain: npt.NDArray[np.bool_]


def _lines(buf: bytes, size: int, max_reasons: int, cut: int = 9) -> _Lines:
    """LINE_RE (`\\d{14,16},\\d{8},[^\\r\\n",\\x1e\\x1f]{0,max_reasons}\\r?`) on every line of
    `buf[:size]` (whole lines, no double quote), as arrays. `buf` has 64 spare bytes."""
    assert len(buf) - size >= 64
    a = np.frombuffer(buf, dtype=np.uint8, count=size)
    words = np.ndarray(shape=(len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))
    nl = np.flatnonzero(a == 10)
    n = len(nl)
    starts = np.empty(n, dtype=np.int64)
    starts[:1] = 0
    starts[1:] = nl[:-1] + 1
    cr = a[np.maximum(nl - 1, 0)] == 13
    ce = nl - (cr & (nl > starts))
    # The usual block: the commas where a plain line has them (after 14-16 digits, and 9 bytes
    # on), inside the line, and no other comma in the block: then they are the only two of each
    # line (found without listing every comma of the block).
    ab = np.frombuffer(buf, dtype=np.uint8)  # reads up to 25 bytes past a line stay in buf
    c1 = starts + 14
    c1 += ab[c1] != 44
    c1 += ab[c1] != 44
    c2 = c1 + 9
    if (
        np.count_nonzero(a == 44) == 2 * n
        and (ab[c1] == 44).all()
        and (ab[c2] == 44).all()
        and (c2 < nl).all()
    ):
        plain = np.ones(n, dtype=bool)
    else:
        com = np.flatnonzero(a == 44)
        li = np.searchsorted(nl, com)
        cnt = np.bincount(li, minlength=n)
        first = np.cumsum(cnt) - cnt
        plain = cnt == 2
        c1 = np.where(plain, com[np.minimum(first, len(com) - 1)] if len(com) else 0, starts)
        c2 = np.where(plain, com[np.minimum(first + 1, len(com) - 1)] if len(com) else 0, starts)
    ilen = c1 - starts
    plain &= (ilen >= 14) & (ilen <= 16) & (c2 - c1 == 9) & (ce - c2 - 1 <= max_reasons)
    w0 = words[starts]
    w6 = words[starts + 6]
    plain &= _all_digits(w0) & _all_digits(w6) & _all_digits(words[np.maximum(c1 - 8, 0)])
    plain &= _all_digits(words[c1 + 1])
    # reasons: no \r, \x1e, \x1f (no comma, newline or quote: counted or absent above)
    if b"\r" in buf or b"\x1e" in buf or b"\x1f" in buf:
        odd = np.flatnonzero((a == 13) | (a == 0x1E) | (a == 0x1F))
        at = np.searchsorted(nl, odd)
        inside = odd < ce[np.minimum(at, n - 1)]
        plain[at[inside]] = False
    # rotated key: bucket digits (14 - cut of them) first, then the prefix
    hi = _eight_digits(w0).view(np.int64)  # digits 0..7
    lo = (_eight_digits(w6).view(np.int64)) % 1_000_000  # digits 8..13
    imei14 = hi * 1_000_000 + lo
    p = 10 ** (14 - cut)
    key = (imei14 % p) * 10**cut + imei14 // p
    return _Lines(starts, nl, ce, c1, key, plain)


class ColumnarParser(BlacklistParser):
    """BlacklistParser keeping rows as columns: `columns()` -> (key, value id, line) arrays,
    key = the 14-digit IMEI rotated to `bucket * 10**cut + prefix`.

    `value_of(date, raw_reasons)` returns the stored value (record id or encoded listing);
    `values[vid]` is its listpack entry and `dates[vid]` its block_date.
    """

    def __init__(
        self,
        k: int,
        report: CsvReport,
        value_of: Callable[[str, str], bytes],
        extras: dict[str, Listing],
        limits: Limits = DEFAULT_LIMITS,
        expect_rows: int = 0,
    ) -> None:
        super().__init__(k, report, value_of, extras, limits)
        self.values: list[bytes] = []
        self.dates: list[str] = []
        self._vid_of: dict[bytes, int] = {}  # stored value -> value id
        self._tail_vid: dict[bytes, int] = {}  # tail (no \r) -> value id or _INVALID
        # Known tails, two ways: a tail has one slot in each (`_slot`), rows missing in the
        # first are looked for in the second, a tail whose two slots are taken is looked up in
        # `_tail_vid` (once per block). Per way: length, words (one array per word, so a lookup
        # gathers from contiguous columns), value id. An empty slot has length 0.
        self._tl = np.zeros((2, 1 << _SLOT_BITS), dtype=np.int64)
        self._tw = np.zeros((2, _COLS, 1 << _SLOT_BITS), dtype=np.uint64)
        self._tv = np.full((2, 1 << _SLOT_BITS), _EMPTY, dtype=np.int64)
        self._extras_arr = np.array(sorted(int(i) for i in extras), dtype=np.int64)
        self._kept = _Rows(expect_rows + expect_rows // 4 + _MIN_ROWS)
        self._py: tuple[list[int], list[int], list[int]] = ([], [], [])  # row by row
        self._pow = 10**self.cut
        self._kpow = 10**k
        self._max_reasons = max(0, min(limits.max_reasons, limits.max_line - 27))  # as LINE_RE

    @staticmethod
    def _new_groups(k: int) -> list[list[bytes]]:
        return []

    # -- values --------------------------------------------------------------------------------
    def _vid(self, date: str, raw: str) -> int:
        stored = self.value_of(date, raw)
        vid = self._vid_of.get(stored)
        if vid is None:
            vid = self._vid_of[stored] = len(self.values)
            self.values.append(entry(stored))
            self.dates.append(date)
        return vid

    def _tail(self, tail: bytes) -> int:
        """Value id of a `date,reasons` tail (no \\r; regex-checked shape), or _INVALID: the
        checks of `BlacklistParser._new_tail`, once per distinct tail."""
        vid = self._tail_vid.get(tail)
        if vid is None:
            date_b, _, raw_b = tail.partition(b",")
            date = date_b.decode("ascii")
            raw = raw_b.decode("utf-8", errors="replace")
            bad = not valid_date(date) or bool(FORBIDDEN.intersection(raw))
            if bad or reasons_too_long(raw, self.limits):
                vid = _INVALID
            else:
                vid = self._vid(date, raw)
            self._tail_vid[tail] = vid
        return vid

    # -- rows ----------------------------------------------------------------------------------
    def _keep(self, imei: str, date: str, reasons: str, lineno: int) -> None:
        keys, vids, lines = self._py
        keys.append(int(imei[self.cut :]) * self._pow + int(imei[: self.cut]))
        vids.append(self._vid(date, reasons))
        lines.append(lineno)

    def _run(self, lines: list[bytes], lineno: int) -> None:
        """Single plain lines (from blocks with quotes): row by row."""
        self.first_line = False
        for j, line in enumerate(lines):
            imei, _, tail = line.partition(b",")
            vid = self._tail(tail[:-1] if tail.endswith(b"\r") else tail)
            s = imei[:14].decode()
            if vid == _INVALID or s in self.extras:
                self._careful(line.decode("utf-8", errors="replace"), lineno + j)
                continue
            keys, vids, rows = self._py
            keys.append(int(s[self.cut :]) * self._pow + int(s[: self.cut]))
            vids.append(vid)
            rows.append(lineno + j)
            self.rows += 1

    def feed(self, lineno: int, data: bytes) -> None:
        """`BlacklistParser.feed` with LINE_RE checked on all lines of the block at once
        (`_lines`); runs of plain lines go `_rows`, every other line the csv way, in order."""
        if self._pending or self._order is not None or b'"' in data:
            self._feed_quoted(lineno, data)
            return
        buf = data + bytes(8 * (_COLS + 2))  # room for word reads past the end
        ln = _lines(buf, len(data), self._max_reasons, self.cut)
        bad = np.flatnonzero(~ln.plain).tolist()
        i = 0
        for j in [*bad, len(ln.nl)]:
            if j > i:
                self._rows(buf, ln, i, j, lineno)
            if j == len(ln.nl):
                break
            s, e = int(ln.starts[j]), int(ln.nl[j])
            if e - s > self.max_line:
                raise _too_long(self.report.source, lineno + j, self.max_line)
            self._careful(data[s:e].decode("utf-8", errors="replace"), lineno + j)
            i = j + 1
            if self._order is not None and e + 1 < len(data):  # a header in another order:
                self._feed_quoted(lineno + i, data[e + 1 :])  # the rest the csv way
                return

    def _rows(self, buf: bytes, ln: _Lines, i: int, j: int, lineno: int) -> None:
        """Lines i..j-1 of the block (all plain; the first is line number lineno + i)."""
        self.first_line = False
        keys = ln.key[i:j]
        vids = self._tail_ids(buf, ln.c1[i:j] + 1, ln.ce[i:j])
        careful = vids == _INVALID
        if len(self._extras_arr):
            imei14 = (keys % self._pow) * self._kpow + keys // self._pow
            careful |= np.isin(imei14, self._extras_arr)
        idx = np.flatnonzero(~careful)
        self._kept.add(keys, vids, idx, lineno + i)
        self.rows += len(idx)
        for r in np.flatnonzero(careful).tolist():
            line = buf[int(ln.starts[i + r]) : int(ln.nl[i + r])]
            self._careful(line.decode("utf-8", errors="replace"), lineno + i + r)

    def _tail_ids(self, buf: bytes, ts: I64, tend: I64) -> I64:
        """Value id (or _INVALID) of each row's tail `buf[ts:tend]` (date, comma, reasons).

        A tail of `tl` bytes (>= 9) is keyed by `tl` and its words at offsets
        `min(8 * j, tl - 8)` for `j < ceil(tl / 8)`: they cover the tail exactly, with no byte
        of the next line to mask off; words past those are 0 (the key of a tail is the same
        in every block)."""
        words = np.ndarray(shape=(len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))
        tl = tend - ts
        w = min(_COLS, (int(tl.max()) + 7) // 8)  # words of the longest (short) tail here
        last = tend - 8
        cols = [words[ts]]  # the 8 date digits
        for j in range(1, w):
            c = words[np.minimum(ts + 8 * j, last)]
            if j > 1:  # (every tail has a word 1: tl >= 9)
                c *= tl > 8 * j
            cols.append(c)
        h = tl.view(np.uint64) * _MIX[0]
        for j, c in enumerate(cols):
            h += c * _MIX[j + 1]
        # A hit needs the same length and words (the table holds short tails only).
        slot = _slot(h, 0)
        hit = self._tl[0][slot] == tl
        for j, c in enumerate(cols):
            hit &= self._tw[0, j][slot] == c
        out: I64 = self._tv[0][slot]
        if hit.all():
            return out
        out[~hit] = _INVALID
        miss = np.flatnonzero(~hit)
        slot = _slot(h[miss], 1)
        hit = self._tl[1][slot] == tl[miss]
        for j, c in enumerate(cols):
            hit &= self._tw[1, j][slot] == c[miss]
        out[miss[hit]] = self._tv[1][slot[hit]]
        miss = miss[~hit]
        if not len(miss):
            return out
        key = np.zeros((len(miss), _COLS + 1), dtype=np.uint64)
        key[:, 0] = tl[miss]
        for j, c in enumerate(cols):
            key[:, j + 1] = c[miss]
        self._misses(buf, ts, tend, key, h[miss], tl[miss] <= _SHORT, miss, out)
        return out

    def _misses(
        self,
        buf: bytes,
        ts: I64,
        tend: I64,
        key: npt.NDArray[np.uint64],
        h: npt.NDArray[np.uint64],
        short: npt.NDArray[np.bool_],
        miss: I64,
        out: I64,
    ) -> None:
        """Rows `miss` (their `key` (length, words), hash and `short` given in that order),
        whose tail is not in the table: one check per distinct tail, in the order the tails
        first appear (the order record ids are given in), then the new short tails are added
        to the table."""
        uh, first, inv = np.unique(h, return_index=True, return_inverse=True)
        rep = miss[first]
        exact = short & (key == key[first][inv]).all(axis=1)
        slow = miss[~exact]  # long reasons, or a hash two tails share: row by row
        todo = np.union1d(rep, slow)
        vid_of = {}
        for i in todo.tolist():
            vid_of[i] = self._tail(buf[int(ts[i]) : int(tend[i])])
        gv = np.array([vid_of[i] for i in rep.tolist()], dtype=np.int64)
        out[miss] = gv[inv]
        if len(slow):
            out[slow] = [vid_of[i] for i in slow.tolist()]
        new = short[first]  # new short tails: into a free slot of either way, if any
        for way in (0, 1):
            slot = _slot(uh, way)
            add = np.flatnonzero(new & (self._tv[way][slot] == _EMPTY))
            if len(add):
                add = add[np.unique(slot[add], return_index=True)[1]]  # one tail per free slot
                at = slot[add]
                self._tl[way][at] = key[first[add], 0].view(np.int64)
                self._tw[way][:, at] = key[first[add], 1:].T
                self._tv[way][at] = gv[add]
                new[add] = False

    def columns(self) -> tuple[I64, I64, I64]:
        """(key, value id, line) of every good row kept in the buckets: the rows of the
        vectorised path in file order, then those of the csv way (in file order)."""
        keys, vids, lines = self._py
        if keys:
            self._kept.extend(keys, vids, lines)
            self._py = ([], [], [])
        r = self._kept
        return r.key[: r.n], r.vid[: r.n], r.line[: r.n]


@dataclass(slots=True)
class Buckets:
    """Rows in bucket order, one per IMEI: `key` (rotated IMEI) and `vid` (value id)."""

    key: I64
    vid: I64


def dedupe(parser: ColumnarParser, report: CsvReport) -> Buckets:
    """Sort the rows by bucket and keep one row per IMEI: the most restrictive (earliest
    block_date, the first on the same date), each dropped row reported with the kept line in
    file order, as `SyncRun._resolve_duplicates` does."""
    keys, vids, lines = parser.columns()
    bits = max(len(parser.values), 1).bit_length()
    if bits <= 17:  # key < 10**14 < 2**47: key and value id fit one uint64, sorted in place
        comp = keys.view(np.uint64) << np.uint64(bits)
        comp |= vids.view(np.uint64)
        comp.sort()
        vid = (comp & np.uint64((1 << bits) - 1)).view(np.int64)
        comp >>= np.uint64(bits)
        key = comp.view(np.int64)
    else:
        order = np.argsort(keys, kind="stable")
        key, vid = keys[order], vids[order]
    same = key[1:] == key[:-1]
    if not same.any():
        return Buckets(key, vid)
    dup_keys = np.unique(key[1:][same])
    rows = np.flatnonzero(np.isin(keys, dup_keys))
    rows = rows[np.argsort(lines[rows], kind="stable")]
    kept: dict[int, tuple[int, int]] = {}  # key -> (line, vid) kept so far
    cut, pow_ = parser.cut, 10**parser.cut
    dates = parser.dates
    for r in rows.tolist():
        kk, line, v = int(keys[r]), int(lines[r]), int(vids[r])
        prev = kept.get(kk)
        if prev is None:
            kept[kk] = (line, v)
            continue
        imei = f"{kk % pow_:0{cut}d}{kk // pow_:0{14 - cut}d}"
        if dates[v] < dates[prev[1]]:  # restrictive_blacklist: the earlier date wins
            report.add_duplicate(imei, line, prev[0])
            kept[kk] = (line, v)
        else:
            report.add_duplicate(imei, prev[0], line)
    first = np.concatenate([[True], ~same])
    key, vid = key[first], vid[first]
    at = np.searchsorted(key, dup_keys)
    vid[at] = [kept[int(x)][1] for x in dup_keys.tolist()]
    return Buckets(key, vid)


def field_entries(prefix: I64, cut: int) -> tuple[U8, I64]:
    """Listpack entries of the bucket fields of these IMEI prefixes (`cut` digits, see
    layout): rows of a matrix, and the length of each."""
    n = len(prefix)
    if cut <= 9:  # "1" + digits: always a 32-bit integer entry
        return int32_entries(10**cut + prefix), np.full(n, 6, dtype=np.int64)
    nd = cut + (cut & 1)
    digits = np.empty((n, nd), dtype=np.uint8)
    rest = prefix.copy()
    for j in range(nd - 1, nd - cut - 1, -1):
        digits[:, j] = rest % 10
        rest //= 10
    if cut & 1:
        digits[:, 0] = 1
    m = nd // 2
    packed = digits[:, 0::2] * 16 + digits[:, 1::2]  # BCD
    mat = np.empty((n, m + 2), dtype=np.uint8)
    mat[:, 0] = 0x80 | m  # a short string entry
    mat[:, 1 : m + 1] = packed
    mat[:, m + 1] = m + 1
    lens = np.full(n, m + 2, dtype=np.int64)
    # Bytes that all are ASCII digits (no leading "0") read as a number: Redis stores those
    # as an integer entry, so do the same.
    num = ((packed >= 0x30) & (packed <= 0x39)).all(axis=1) & (packed[:, 0] != 0x30)
    for i in np.flatnonzero(num).tolist():
        e = entry(packed[i].tobytes())
        mat[i, : len(e)] = np.frombuffer(e, dtype=np.uint8)
        lens[i] = len(e)
    return mat, lens


def _gather(src: npt.NDArray[np.uint8], starts: I64, lens: I64) -> npt.NDArray[np.uint8]:
    """Concatenation of the segments `src[starts[i]:starts[i]+lens[i]]`."""
    total = int(lens.sum())
    ends = np.cumsum(lens)
    idx = np.arange(total, dtype=np.int64) + np.repeat(starts - (ends - lens), lens)
    out: U8 = src[idx]
    return out


def _at(buf: bytearray, dtype: str) -> npt.NDArray[np.unsignedinteger]:
    """`buf` as words of `dtype` starting at every byte offset (writable, unaligned)."""
    size = np.dtype(dtype).itemsize
    out: npt.NDArray[np.unsignedinteger] = np.ndarray(
        shape=(len(buf) - size + 1,), dtype=dtype, buffer=buf, strides=(1,)
    )
    return out


def restore_commands(
    b: Buckets, values: list[bytes], k: int, key_of: Callable[[int], str], batch: int = 8192
) -> Iterator[list[tuple[str, bytes, bytes]]]:
    """RESTORE commands (key, RESP head, body) of every non-empty bucket, `batch` buckets at a
    time."""
    cut = 14 - k
    pow_ = 10**cut
    bucket = b.key // pow_
    fields, flen = field_entries(b.key % pow_, cut)
    fw = fields.shape[1]
    fixed = bool((flen == fw).all())
    vw = max((len(x) for x in values), default=0)
    vmat = np.zeros((max(len(values), 1), vw), dtype=np.uint8)
    if vw <= 16:
        for i, x in enumerate(values):
            vmat[i, : len(x)] = np.frombuffer(x, dtype=np.uint8)
    vlen = np.array([len(v) for v in values], dtype=np.int64)
    # The usual case (6-byte field entries, value entries of <= 8 bytes): rows are written
    # into the batch buffer as little-endian words at their offsets, no byte matrix to mask.
    words = fixed and fw == 6 and vw <= 8
    if words:
        f4 = np.ascontiguousarray(fields[:, :4]).view("<u4").ravel()
        f2 = np.ascontiguousarray(fields[:, 4:]).view("<u2").ravel()
        v8 = np.zeros((len(vmat), 8), dtype=np.uint8)
        v8[:, :vw] = vmat
        vword = v8.view("<u8").ravel()
    vsrc = np.frombuffer(b"".join(values), dtype=np.uint8)
    voff = np.cumsum(vlen) - vlen
    counts = np.bincount(bucket, minlength=10**k)
    row_end = np.cumsum(counts)
    nonempty = np.flatnonzero(counts)
    for g in range(0, len(nonempty), batch):
        ids = nonempty[g : g + batch]
        r0 = int(row_end[ids[0]] - counts[ids[0]])
        r1 = int(row_end[ids[-1]])
        v = b.vid[r0:r1]
        m = r1 - r0
        # each row: its 6-byte field entry, then its value entry
        row_bytes = flen[r0:r1] + vlen[v]
        if words:
            start = np.cumsum(row_bytes) - row_bytes
            total = int(start[-1] + row_bytes[-1])
            buf = bytearray(total + 8)  # (the last value word may reach 6 bytes past the end)
            # The value word at +6 runs into the next row's field; the fields written after
            # it put those bytes right. Values never overlap each other (a row is >= 8 bytes).
            _at(buf, "<u8")[start + 6] = vword[v]
            _at(buf, "<u4")[start] = f4[r0:r1]
            _at(buf, "<u2")[start + 4] = f2[r0:r1]
            ent = bytes(memoryview(buf)[:total])
        elif vw <= 16:  # rows of a byte matrix, the unused tail of each masked out
            mat = np.empty((m, fw + vw), dtype=np.uint8)
            mat[:, :fw] = fields[r0:r1]
            fl = flen[r0:r1]
            if fixed:
                mat[:, fw:] = vmat[v]
            else:  # a field entry shorter than fw: its value entry follows it
                cols = np.arange(fw + vw)
                rel = cols[None, :] - fl[:, None]
                inside = (rel >= 0) & (rel < vw)
                mat[inside] = vmat[np.repeat(v, vw), rel[inside]]
            ent = mat[np.arange(fw + vw)[None, :] < row_bytes[:, None]].tobytes()
        else:  # a long value (records beyond --max-records are stored whole)
            src = np.concatenate([fields[r0:r1].ravel(), vsrc])
            starts = np.empty(2 * m, dtype=np.int64)
            lens = np.empty(2 * m, dtype=np.int64)
            starts[0::2] = np.arange(m, dtype=np.int64) * fw
            lens[0::2] = flen[r0:r1]
            starts[1::2] = fw * m + voff[v]
            lens[1::2] = vlen[v]
            ent = _gather(src, starts, lens).tobytes()
        per_bucket = np.add.reduceat(row_bytes, np.cumsum(counts[ids]) - counts[ids])
        cnt = counts[ids].tolist()
        pieces = []
        o = 0
        for nb, c in zip(per_bucket.tolist(), cnt, strict=True):
            pieces.append(payload_head(nb, 2 * c) + ent[o : o + nb] + PAYLOAD_TAIL)
            o += nb
        crcs = crc64_many(pieces)
        cmds = []
        for i, p, crc in zip(ids.tolist(), pieces, crcs, strict=True):
            key = key_of(i)
            kb = key.encode()
            head = b"*4\r\n$7\r\nRESTORE\r\n$%d\r\n%s\r\n$1\r\n0\r\n$%d\r\n" % (
                len(kb),
                kb,
                len(p) + 8,
            )
            cmds.append((key, head, p + crc.to_bytes(8, "little") + b"\r\n"))
        yield cmds

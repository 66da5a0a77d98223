"""The bytes-level blacklist path (sync/blacklist.py) agrees with the csv path (iter_list_rows).

Messy files (BOM, CRLF, quotes with newlines, blank lines, bad rows of every kind, non-UTF-8
bytes, duplicates, IMEIs also on other lists, over-long reasons and lines, the columns in any
order) are cut into tiny blocks so that block boundaries fall everywhere, including inside
quoted fields; both paths must keep the same rows (every one, in order, duplicates included)
with the same values, count the same bad rows at the same line numbers, and refuse the same
files at the same line.
"""

from __future__ import annotations

import csv
import io
import re
from binascii import hexlify

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eir_server.policy.types import BlacklistEntry
from eir_server.store.codec import Listing, encode_blacklist
from eir_server.store.register import (
    CsvReport,
    Limits,
    ListKind,
    RegisterError,
    iter_list_rows,
    iter_rows_numbered,
    split_reasons,
)
from eir_server.sync import columnar
from eir_server.sync.blacklist import BlacklistParser, BlockReader, NeedGeneric, quote_open
from eir_server.sync.columnar import ColumnarParser, dedupe
from eir_server.sync.redis_db import bulk

GOOD = [
    "35000000000001,20240101,stolen",
    "350000000000011,20240101,stolen",  # 15 digits: same key as the line above
    "3500000000000222,20231231,lost|stolen",
    "86000000000003,20240229,",  # empty reasons; leap day
    "01234567890123,20240101,caf\u00e9|vol",  # leading zero TAC, UTF-8 reason
    "35000000000004,20240101,stolen",
    "35000000000001,20240102,changed",  # duplicate IMEI (the engine keeps the earliest date)
    "99999999999999,20240101,a b|c",
    " 35000000000005 ,20240101,stolen",  # spaces: only the csv path takes it
    '"35000000000006",20240101,"lost|stolen"',
    '35000000000007,20240101,"multi\nline"',  # quoted newline
    '35000000000008,20240101,"say ""hi"""',
    "35000000000009, 20240101 ,x",
    "35000000000010,20240101,x\u0001y",  # other control characters are kept
]
BAD = [
    "3500000000000X,20240101,stolen",
    "35000000000002,20241301,stolen",  # no 13th month
    "35000000000002,20230229,stolen",  # not a leap year
    "35000000000003,20240101",
    "35000000000003,20240101,a,b",
    "1234,20240101,x",
    "35000000000000000,20240101,x",  # 17 digits
    "35000000000011,20240101,x\x1ey",  # record separator in reasons
    "35000000000012,2024010,x",
    'ab"c,20240101,x',  # a literal quote inside an unquoted field opens nothing
    "\u0663\u0665000000000001,20240101,x",  # non-ASCII digits
    "35000000000013,20240101," + "r" * 50,  # reasons over LIMITS.max_reasons
    "35000000000014,20240101,\u00e9" * 1 + "\u00e9" * 20,  # 42 bytes of reasons in 21 chars
]
LONG = "35000000000015,20240101," + "x|" * 60  # a line over LIMITS.max_line: file refused
LIMITS = Limits(max_line=120, max_reasons=40)
ORDERS = [(0, 1, 2), (2, 1, 0), (1, 2, 0), (0, 2, 1)]
NAMES = ("imei", "block_date", "reasons")
EXTRA_IMEIS = ["35000000000004", "99999999999999"]

lines = st.lists(
    st.one_of(
        st.sampled_from(GOOD), st.sampled_from(BAD), st.just(""), st.just("   "), st.just(LONG)
    ),
    max_size=30,
)


def permute(line: str, order: tuple[int, int, int]) -> str:
    """The same row with its columns in `order` (rows that are not 3 fields stay as they are)."""
    try:
        fields = next(csv.reader([line]))
    except (csv.Error, StopIteration):
        return line
    if len(fields) != 3 or order == (0, 1, 2):
        return line
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow([fields[order.index(i)] for i in range(3)])
    return out.getvalue()


def build(
    body: list[str],
    bom: bool,
    crlf: bool,
    header: bool,
    final_nl: bool,
    order: tuple[int, int, int] = (0, 1, 2),
) -> bytes:
    if order != (0, 1, 2):
        header = True
        body = [permute(r, order) for r in body]
    names = ",".join(NAMES[order.index(i)] for i in range(3))
    rows = ([names] if header else []) + body
    nl = "\r\n" if crlf else "\n"
    text = nl.join(r.replace("\n", nl) for r in rows) + (nl if final_nl and rows else "")
    return ("\ufeff" if bom else "").encode() + text.encode()


def value_of(date: str, raw: str) -> bytes:
    return b"\r\n" + bulk(encode_blacklist(date, split_reasons(raw)))


def resp_pair(resp: bytes) -> tuple[bytes, bytes]:
    """b"$n\\r\\n<field>\\r\\n$m\\r\\n<value>\\r\\n" -> (field, value), by the lengths."""
    out = []
    pos = 0
    for _ in range(2):
        assert resp[pos : pos + 1] == b"$"
        eol = resp.index(b"\r\n", pos)
        n = int(resp[pos + 1 : eol])
        out.append(resp[eol + 2 : eol + 2 + n])
        assert resp[eol + 2 + n : eol + 4 + n] == b"\r\n"
        pos = eol + 4 + n
    assert pos == len(resp)
    return out[0], out[1]


def via_parser(data: bytes, k: int, block: int, extras: dict[str, Listing], limits=LIMITS):
    """-> ({imei: [value of each row, in file order]}, report, rows)."""
    report = CsvReport("f")
    parser = BlacklistParser(k, report, value_of, extras, limits)
    with BlockReader(io.BytesIO(data), "f", block, limits.max_line) as reader:
        for lineno, chunk in reader:
            parser.feed(lineno, chunk)
    parser.finish()
    got: dict[str, list[bytes]] = {}
    cut = 14 - k
    for i, frags in enumerate(parser.groups):
        for frag in frags:
            fld, value = resp_pair(parser.fpre + frag)
            if parser.bcd:
                digits = hexlify(fld).decode()
                prefix = digits[1:] if cut % 2 else digits
            else:
                prefix = fld.decode()[1:]
            got.setdefault(prefix + f"{i:0{k}d}", []).append(value)
    return got, report, parser.rows


def via_csv(data: bytes, extras: dict[str, Listing], limits=LIMITS):
    report = CsvReport("f")
    got: dict[str, list[bytes]] = {}
    kept: dict[str, int] = {}
    rows = iter_rows_numbered(ListKind.BLACKLIST, io.BytesIO(data), report, limits)
    for line, imei, (date, raw) in rows:
        if imei in extras:
            old = extras[imei].blacklist
            if old is not None:  # a duplicate: the earliest date wins, reported with both lines
                if date >= old.block_date:
                    report.add_duplicate(imei, kept[imei], line)
                    continue
                report.add_duplicate(imei, line, kept[imei])
            kept[imei] = line
            extras[imei].blacklist = BlacklistEntry(date, split_reasons(raw))
            continue
        got.setdefault(imei, []).append(encode_blacklist(date, split_reasons(raw)))
    return got, report


def refused_at(fn, *args):
    """The line number a path refuses the file at (None: not refused), or its result."""
    try:
        return None, fn(*args)
    except RegisterError as e:
        m = re.search(r"line (\d+)", str(e))
        return (int(m.group(1)) if m else -1), None


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=lines,
    bom=st.booleans(),
    crlf=st.booleans(),
    header=st.booleans(),
    final_nl=st.booleans(),
    k=st.sampled_from([2, 3, 5]),
    block=st.integers(1, 80),
    with_extras=st.booleans(),
    order=st.sampled_from(ORDERS),
)
def test_bytes_path_agrees_with_csv_path(
    body, bom, crlf, header, final_nl, k, block, with_extras, order
):
    data = build(body, bom, crlf, header, final_nl, order)
    ex1 = {i: Listing() for i in EXTRA_IMEIS} if with_extras else {}
    ex2 = {i: Listing() for i in EXTRA_IMEIS} if with_extras else {}
    line1, fast = refused_at(via_parser, data, k, block, ex1)
    line2, slow = refused_at(via_csv, data, ex2)
    assert line1 == line2
    if line1 is not None:
        assert LONG in body
        return
    got, report, rows = fast
    want, want_report = slow
    assert got == want
    assert ex1 == ex2
    assert rows == want_report.rows
    assert report.bad == want_report.bad
    assert [b.line for b in report.samples] == [b.line for b in want_report.samples]
    assert [b.reason for b in report.samples] == [b.reason for b in want_report.samples]
    assert report.dup_samples == want_report.dup_samples


def test_known_file_rows_values_and_line_numbers():
    data = build(
        GOOD[:8] + BAD[:3] + ["", '35000000000007,20240101,"multi\nline"', BAD[5]],
        True,
        True,
        True,
        True,
    )
    got, report, rows = via_parser(data, 5, 7, {})
    assert got["35000000000001"] == [b"B20240101\x1fstolen"] * 2 + [b"B20240102\x1fchanged"]
    assert got["01234567890123"] == ["B20240101\x1fcaf\u00e9|vol".encode()]
    assert got["35000000000007"] == [b"B20240101\x1fmulti\r\nline"]
    assert rows == 9
    # header = line 1, GOOD[:8] = 2..9, BAD = 10..12, blank 13, quoted 14-15, "1234,..." 16
    assert [(b.line, b.reason) for b in report.samples] == [
        (10, "bad IMEI"),
        (11, "bad block_date"),
        (12, "bad block_date"),
        (16, "bad IMEI"),
    ]


def test_header_in_another_order_is_matched_by_name():
    data = b"block_date,reasons,imei\n20240101,x,35000000000001\n20240102,y|z,35000000000002\n"
    got, report, rows = via_parser(data, 5, 1 << 20, {})
    assert rows == 2 and report.bad == 0
    assert got["35000000000002"] == [b"B20240102\x1fy|z"]
    want, _ = via_csv(data, {})
    assert got == want


@pytest.mark.parametrize("parser", ["bytes", "columnar"])
def test_a_plain_looking_row_after_a_header_in_another_order_goes_by_the_header(parser):
    data = b"block_date,reasons,imei\n35000000000001,20240101,x\n20240102,y,35000000000002\n"
    if parser == "bytes":
        got, report, rows = via_parser(data, 5, 1 << 20, {})
    else:
        got, report, rows, _ = via_columnar(data, 5, 1 << 20, {}, LIMITS)
    want, want_report = via_csv(data, {})
    assert got == want and rows == want_report.rows == 1
    assert [b.line for b in report.samples] == [2]


def test_header_with_other_columns_needs_the_generic_path():
    data = b"imei,block_date,reasons,source\n35000000000001,20240101,x,a\n"
    with pytest.raises(NeedGeneric):
        via_parser(data, 5, 1 << 20, {})


@pytest.mark.parametrize("block", [7, 1 << 16])
def test_huge_field_is_refused_at_its_line_without_reading_it_whole(block):
    """A 400 MB `reasons` must not be buffered: both paths refuse at the line as soon as it is
    over the limit (a stream that fails past the first megabyte proves neither reads on)."""

    class Endless(io.RawIOBase):
        def __init__(self) -> None:
            self.head = b"imei,block_date,reasons\n35000000000001,20240101,ok\n35000000000002,2024"
            self.served = 0

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:
            if self.served > 1 << 20:
                raise AssertionError("read past the first megabyte of one line")
            chunk = (self.head if self.served == 0 else b"")[: len(b)] or b"x" * len(b)
            self.head = b"" if self.served == 0 else self.head
            b[: len(chunk)] = chunk
            self.served += len(chunk)
            return len(chunk)

    with pytest.raises(RegisterError, match="line 3: longer than 4096 bytes"):
        report = CsvReport("f")
        parser = BlacklistParser(5, report, value_of, {})
        with BlockReader(io.BufferedReader(Endless()), "f", block, 4096) as reader:
            for lineno, chunk in reader:
                parser.feed(lineno, chunk)
    with pytest.raises(RegisterError, match="line 3: longer than 4096 bytes"):
        list(iter_list_rows(ListKind.BLACKLIST, io.BufferedReader(Endless()), CsvReport("f")))


def test_unterminated_quote_is_refused_like_the_csv_field_limit():
    data = b'35000000000001,20240101,"open\n' + b"35000000000002,20240101,x\n" * 10_000
    with pytest.raises(RegisterError, match="line 1: unterminated quoted field"):
        via_parser(data, 5, 1 << 16, {})


@pytest.mark.parametrize(
    ("line", "in_quotes", "expected"),
    [
        ('a,"b', False, True),
        ('a,"b"', False, False),
        ('a,"b""', False, True),
        ('ab"c', False, False),
        ('a,"b"x"', False, False),
        ("tail", True, True),
        ('tail",x', True, False),
        ('"",x', False, False),
    ],
)
def test_quote_open_follows_csv(line, in_quotes, expected):
    assert quote_open(line, in_quotes) is expected


# -- the columnar parser (sync/columnar.py): same rows, reports and duplicate resolution --------


def via_columnar(data: bytes, k: int, block: int, extras: dict[str, Listing], limits=LIMITS):
    """-> ({imei: [value of each row, in file order]}, report, rows, parser)."""
    report = CsvReport("f")

    def stored(date: str, raw: str) -> bytes:
        return encode_blacklist(date, split_reasons(raw))

    parser = ColumnarParser(k, report, stored, extras, limits)
    with BlockReader(io.BytesIO(data), "f", block, limits.max_line) as reader:
        for lineno, chunk in reader:
            parser.feed(lineno, chunk)
    parser.finish()
    value = {v: s for s, v in parser._vid_of.items()}
    keys, vids, lines = parser.columns()
    got: dict[str, list[bytes]] = {}
    cut = 14 - k
    for key, vid, _ in sorted(zip(keys.tolist(), vids.tolist(), lines.tolist(), strict=True),
                              key=lambda r: r[2]):
        imei = f"{key % 10**cut:0{cut}d}{key // 10**cut:0{k}d}"
        got.setdefault(imei, []).append(value[vid])
    return got, report, parser.rows, parser


def resolve_like_the_engine(data: bytes, extras: dict[str, Listing], report: CsvReport, limits):
    """SyncRun._resolve_duplicates on the csv path: {imei: value kept}, duplicates reported."""
    seen: dict[str, tuple[int, str, str]] = {}
    for line, imei, (date, raw) in iter_rows_numbered(
        ListKind.BLACKLIST, io.BytesIO(data), CsvReport("f"), limits
    ):
        if imei in extras:
            continue
        prev = seen.get(imei)
        if prev is None:
            seen[imei] = (line, date, raw)
        elif date < prev[1]:
            report.add_duplicate(imei, line, prev[0])
            seen[imei] = (line, date, raw)
        else:
            report.add_duplicate(imei, prev[0], line)
    return {i: encode_blacklist(d, split_reasons(r)) for i, (_, d, r) in seen.items()}


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=lines,
    bom=st.booleans(),
    crlf=st.booleans(),
    header=st.booleans(),
    final_nl=st.booleans(),
    k=st.sampled_from([2, 4, 5, 6]),
    block=st.integers(1, 400),
    with_extras=st.booleans(),
    order=st.sampled_from(ORDERS),
    limits=st.sampled_from([LIMITS, Limits()]),
)
def test_columnar_path_agrees_with_csv_path(
    body, bom, crlf, header, final_nl, k, block, with_extras, order, limits
):
    if block > limits.max_line:  # (BlockReader may refuse a later line first: both paths do)
        block = 1 + block % limits.max_line
    data = build(body, bom, crlf, header, final_nl, order)
    ex1 = {i: Listing() for i in EXTRA_IMEIS} if with_extras else {}
    ex2 = {i: Listing() for i in EXTRA_IMEIS} if with_extras else {}
    line1, fast = refused_at(via_columnar, data, k, block, ex1, limits)
    line2, slow = refused_at(via_csv, data, ex2, limits)
    assert line1 == line2
    if line1 is not None:
        return
    got, report, rows, parser = fast
    want, want_report = slow
    assert got == want
    assert ex1 == ex2
    assert rows == want_report.rows
    assert [(b.line, b.reason) for b in report.samples] == [
        (b.line, b.reason) for b in want_report.samples
    ]
    assert report.bad == want_report.bad
    assert report.dup_samples == want_report.dup_samples  # IMEIs also on other lists
    # Duplicates in the buckets: kept and reported as the engine's HSET path does.
    kept = resolve_like_the_engine(data, ex2, want_report, limits)
    b = dedupe(parser, report)
    value = {v: s for s, v in parser._vid_of.items()}
    cut = 14 - k
    assert {
        f"{x % 10**cut:0{cut}d}{x // 10**cut:0{k}d}": value[v]
        for x, v in zip(b.key.tolist(), b.vid.tolist(), strict=True)
    } == kept
    assert report.dup_samples == want_report.dup_samples
    assert report.duplicates == want_report.duplicates


def test_columnar_big_blocks_with_every_kind_of_line():
    """Blocks of many plain lines with bad ones among them (the vectorised line check)."""
    rows = [f"35{i:012d},2024{1 + i % 12:02d}{1 + i % 28:02d},r{i % 7}|x" for i in range(3000)]
    for j, bad in enumerate(BAD + GOOD):
        rows.insert(37 * j + 5, bad)
    rows.insert(1000, rows[10].replace("r", "s"))  # a duplicate IMEI
    for crlf in (False, True):
        data = build(rows, False, crlf, True, True)
        got, report, n, parser = via_columnar(data, 5, 1 << 16, {}, Limits())
        want, want_report = via_csv(data, {}, Limits())
        assert got == want and n == want_report.rows
        assert [(b.line, b.reason) for b in report.samples] == [
            (b.line, b.reason) for b in want_report.samples
        ]


# Reasons of every length around the 8-byte words of the tail key (up to past the 40 bytes kept
# in the table): most of one length and differing in one character only (a word of the key left
# out of the comparison would mix them up), multi-byte characters, a few failing a check.
REASON_CHARS = "ab| \u00e9\u20ac\x01"


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    rnd=st.randoms(use_true_random=False),
    n=st.one_of(st.integers(0, 46), st.sampled_from([24, 31, 32, 39, 40])),
    slot_bits=st.sampled_from([1, 3, 18]),
    block=st.integers(40, 400),
)
def test_tail_lookup_agrees_with_csv_path(monkeypatch, rnd, n, slot_bits, block):
    """The tail table (length + words at min(8j, tl - 8), no masking) gives every row the
    value of its own tail, also when tails of every length share few slots."""
    monkeypatch.setattr(columnar, "_SLOT_BITS", slot_bits)
    monkeypatch.setattr(columnar, "_SLOT_SHIFT", np.uint64(64 - slot_bits))
    body = []
    for _ in range(rnd.randrange(1, 200)):
        if rnd.random() < 0.8:
            # (the last byte is often the only one of the word at tl - 8)
            at = rnd.randrange(n + 1) if rnd.random() < 0.7 else n - 1
            c = rnd.choice(REASON_CHARS)
            reasons = "a" * n if at >= n else "a" * at + c + "a" * (n - at - 1)
        else:
            reasons = "".join(rnd.choices(REASON_CHARS, k=rnd.randrange(47)))
        date = "20240101" if rnd.random() < 0.9 else rnd.choice(["20240229", "20230229"])
        body.append(f"35{rnd.randrange(60):012d},{date},{reasons}")  # some IMEIs repeat
    data = build(body, False, False, True, True)
    got, report, rows, parser = via_columnar(data, 5, block, {}, Limits())
    want, want_report = via_csv(data, {}, Limits())
    assert got == want and rows == want_report.rows
    assert [(b.line, b.reason) for b in report.samples] == [
        (b.line, b.reason) for b in want_report.samples
    ]


def test_kept_rows_grow_past_the_expected_count(monkeypatch):
    """More rows than expected (the estimate comes from the first 64 KB): the columns grow and
    keep every row in order, the csv-way rows last."""
    monkeypatch.setattr(columnar, "_MIN_ROWS", 1)
    rows = [f"35{i:012d},2024{1 + i % 12:02d}{1 + i % 28:02d},r{i % 5}" for i in range(5000)]
    rows[100] = " " + rows[100]  # the csv way
    data = build(rows, False, False, True, True)
    report = CsvReport("f")
    parser = ColumnarParser(
        5, report, lambda d, r: encode_blacklist(d, split_reasons(r)), {}, Limits(), 10
    )
    with BlockReader(io.BytesIO(data), "f", 1 << 12) as reader:
        for lineno, chunk in reader:
            parser.feed(lineno, chunk)
    parser.finish()
    keys, vids, lines = parser.columns()
    assert len(parser._kept.key) < 2 * len(keys)  # grown by half at a time
    assert lines.tolist() == [*range(2, 102), *range(103, 5002), 102]
    assert keys.tolist() == [
        (i % 10**5) * 10**9 + (35 * 10**12 + i) // 10**5
        for i in [*range(100), *range(101, 5000), 100]
    ]
    assert [parser.dates[v] for v in vids.tolist()][:3] == ["20240101", "20240202", "20240303"]

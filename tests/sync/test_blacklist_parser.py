"""The bytes-level blacklist path (sync/blacklist.py) agrees with the csv path (iter_list_rows).

Messy files (BOM, CRLF, quotes with newlines, blank lines, bad rows of every kind, non-UTF-8
bytes, duplicates, IMEIs also on other lists) are cut into tiny blocks so that block
boundaries fall everywhere, including inside quoted fields; both paths must keep the same rows
with the same values and count the same bad rows at the same line numbers.
"""

from __future__ import annotations

import io
from binascii import hexlify

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eir_server.policy.types import BlacklistEntry
from eir_server.store.codec import Listing, encode_blacklist
from eir_server.store.register import (
    CsvReport,
    ListKind,
    RegisterError,
    iter_list_rows,
    split_reasons,
)
from eir_server.sync.blacklist import BlacklistParser, BlockReader, NeedGeneric, quote_open
from eir_server.sync.redis_db import bulk

GOOD = [
    "35000000000001,20240101,stolen",
    "350000000000011,20240101,stolen",  # 15 digits: same key as the line above
    "3500000000000222,20231231,lost|stolen",
    "86000000000003,20240229,",  # empty reasons; leap day
    "01234567890123,20240101,caf\u00e9|vol",  # leading zero TAC, UTF-8 reason
    "35000000000004,20240101,stolen",
    "35000000000001,20240102,changed",  # duplicate IMEI: the later row wins
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
]
EXTRA_IMEIS = ["35000000000004", "99999999999999"]

lines = st.lists(
    st.one_of(st.sampled_from(GOOD), st.sampled_from(BAD), st.just(""), st.just("   ")),
    max_size=30,
)


def build(body: list[str], bom: bool, crlf: bool, header: bool, final_nl: bool) -> bytes:
    rows = (["imei,block_date,reasons"] if header else []) + body
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


def via_parser(data: bytes, k: int, block: int, extras: dict[str, Listing]):
    report = CsvReport("f")
    parser = BlacklistParser(k, report, value_of, extras)
    with BlockReader(io.BytesIO(data), "f", block) as reader:
        for lineno, chunk in reader:
            parser.feed(lineno, chunk)
    parser.finish()
    got: dict[str, bytes] = {}
    cut = 14 - k
    for i, frags in enumerate(parser.groups):
        for frag in frags:
            fld, value = resp_pair(parser.fpre + frag)
            if parser.bcd:
                digits = hexlify(fld).decode()
                prefix = digits[1:] if cut % 2 else digits
            else:
                prefix = fld.decode()[1:]
            got[prefix + f"{i:0{k}d}"] = value
    return got, report, parser.rows


def via_csv(data: bytes, extras: dict[str, Listing]):
    report = CsvReport("f")
    got: dict[str, bytes] = {}
    for imei, (date, raw) in iter_list_rows(ListKind.BLACKLIST, io.BytesIO(data), report):
        if imei in extras:
            extras[imei].blacklist = BlacklistEntry(date, split_reasons(raw))
            continue
        got[imei] = encode_blacklist(date, split_reasons(raw))
    return got, report


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
)
def test_bytes_path_agrees_with_csv_path(body, bom, crlf, header, final_nl, k, block, with_extras):
    data = build(body, bom, crlf, header, final_nl)
    ex1 = {i: Listing() for i in EXTRA_IMEIS} if with_extras else {}
    ex2 = {i: Listing() for i in EXTRA_IMEIS} if with_extras else {}
    got, report, rows = via_parser(data, k, block, ex1)
    want, want_report = via_csv(data, ex2)
    assert got == want
    assert ex1 == ex2
    assert rows == want_report.rows
    assert report.bad == want_report.bad
    assert [b.line for b in report.samples] == [b.line for b in want_report.samples]


def test_known_file_rows_values_and_line_numbers():
    data = build(
        GOOD[:8] + BAD[:3] + ["", '35000000000007,20240101,"multi\nline"', BAD[5]],
        True,
        True,
        True,
        True,
    )
    got, report, rows = via_parser(data, 5, 7, {})
    assert got["35000000000001"] == b"B20240102\x1fchanged"
    assert got["01234567890123"] == "B20240101\x1fcaf\u00e9|vol".encode()
    assert got["35000000000007"] == b"B20240101\x1fmulti\r\nline"
    assert rows == 9
    # header = line 1, GOOD[:8] = 2..9, BAD = 10..12, blank 13, quoted 14-15, "1234,..." 16
    assert [(b.line, b.reason) for b in report.samples] == [
        (10, "bad IMEI"),
        (11, "bad block_date"),
        (12, "bad block_date"),
        (16, "bad IMEI"),
    ]


def test_header_in_another_order_needs_the_generic_path():
    data = b"imei,reasons,block_date\n35000000000001,x,20240101\n"
    with pytest.raises(NeedGeneric):
        via_parser(data, 5, 1 << 20, {})


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

"""The HPACK decoder (eir_server/n5g_eir/hpack.py): RFC 7541 Appendix C, round trips through the
independent `hpack` library's encoder, its Huffman decoder as an oracle, hostile input, limits.
Speed is measured by hand (see the module docstring), never asserted here."""

from __future__ import annotations

import random

import hpack as hpack_lib
import pytest
from hpack.exceptions import HPACKDecodingError
from hpack.hpack import encode_integer
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eir_server.n5g_eir import hpack
from eir_server.n5g_eir.hpack import Decoder, HeaderListTooLarge, HpackError

HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
PATH_HEAD = "/n5g-eir-eic/v1/equipment-status?pei=imei-"


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def integer(value: int, prefix_bits: int, flags: int = 0) -> bytes:
    out = encode_integer(value, prefix_bits)
    out[0] |= flags
    return bytes(out)


def string(raw: bytes, huffman: bool) -> bytes:
    if huffman:
        coded = HUFFMAN.encode(raw)
        return integer(len(coded), 7, 0x80) + coded
    return integer(len(raw), 7) + raw


def without_indexing(name: bytes | int, value: bytes, huffman: bool = True) -> bytes:
    """Literal without indexing (6.2.2), what nghttp2 sends for :path; name by index or literal."""
    if isinstance(name, int):
        return integer(name, 4) + string(value, huffman)
    return b"\x00" + string(name, huffman) + string(value, huffman)


def huffman_string(data: bytes) -> str:
    """Our Huffman decoder on a whole buffer (ls-qpack for long strings, else the tables)."""
    return hpack._huffman(data, 0, len(data))


def huffman_table(data: bytes) -> str:
    """The table decoder on its own, whatever the length."""
    return hpack._huffman_table(data, 0, len(data))


def huffman_value(data: bytes) -> str:
    """Our Huffman decoder through decode() (the inlined value path)."""
    block = b"\x01" + integer(len(data), 7, 0x80) + data  # :authority, literal w/o indexing
    ((name, value),) = Decoder(max_header_list_size=1 << 20).decode(block)
    assert name == ":authority"
    return value


def check_table(decoder: Decoder) -> None:
    entries = decoder.dynamic_table
    assert decoder.table_size == sum(len(n) + len(v) + 32 for n, v in entries)
    assert decoder.table_size <= decoder.table_limit


# --- RFC 7541 Appendix C ----------------------------------------------------------------------

C3 = [  # C.3 requests without Huffman; C.4 the same requests with Huffman
    h("828684410f7777772e6578616d706c652e636f6d"),
    h("828684be58086e6f2d6361636865"),
    h("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565"),
]
C4 = [
    h("828684418cf1e3c2e5f23a6ba0ab90f4ff"),
    h("828684be5886a8eb10649cbf"),
    h("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"),
]
C_REQUESTS = [
    [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")],
    [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
        ("cache-control", "no-cache"),
    ],
    [
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/index.html"),
        (":authority", "www.example.com"),
        ("custom-key", "custom-value"),
    ],
]
C_TABLES = [
    ([(":authority", "www.example.com")], 57),
    ([("cache-control", "no-cache"), (":authority", "www.example.com")], 110),
    (
        [
            ("custom-key", "custom-value"),
            ("cache-control", "no-cache"),
            (":authority", "www.example.com"),
        ],
        164,
    ),
]


@pytest.mark.parametrize("blocks", [C3, C4], ids=["C.3", "C.4"])
def test_rfc7541_appendix_c_requests(blocks: list[bytes]) -> None:
    decoder = Decoder()
    for block, headers, (table, size) in zip(blocks, C_REQUESTS, C_TABLES, strict=True):
        assert decoder.decode(block) == headers
        assert decoder.dynamic_table == table
        assert decoder.table_size == size


def test_rfc7541_c5_responses_with_eviction() -> None:
    """C.5: a 256-octet table, entries evicted oldest first."""
    date1 = "Mon, 21 Oct 2013 20:13:21 GMT"
    date2 = "Mon, 21 Oct 2013 20:13:22 GMT"
    location = "https://www.example.com"
    cookie = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
    decoder = Decoder(max_table_size=256)
    assert decoder.decode(
        h(
            "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a3231"
            "20474d546e1768747470733a2f2f7777772e6578616d706c652e636f6d"
        )
    ) == [(":status", "302"), ("cache-control", "private"), ("date", date1), ("location", location)]
    assert decoder.dynamic_table == [
        ("location", location),
        ("date", date1),
        ("cache-control", "private"),
        (":status", "302"),
    ]
    assert decoder.table_size == 222
    assert decoder.decode(h("4803333037c1c0bf")) == [
        (":status", "307"),
        ("cache-control", "private"),
        ("date", date1),
        ("location", location),
    ]
    assert decoder.dynamic_table[0] == (":status", "307")
    assert decoder.table_size == 222
    assert decoder.decode(
        h(
            "88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a697077"
            "38666f6f3d4153444a4b48514b425a584f5157454f50495541585157454f49553b206d61782d616765"
            "3d333630303b2076657273696f6e3d31"
        )
    ) == [
        (":status", "200"),
        ("cache-control", "private"),
        ("date", date2),
        ("location", location),
        ("content-encoding", "gzip"),
        ("set-cookie", cookie),
    ]
    assert decoder.dynamic_table == [
        ("set-cookie", cookie),
        ("content-encoding", "gzip"),
        ("date", date2),
    ]
    assert decoder.table_size == 215


# --- What nghttp2-based clients send --------------------------------------------------------


def nghttp2_requests(count: int, seed: int = 7) -> tuple[list[bytes], list[list[tuple[str, str]]]]:
    """Blocks as nghttp2 (h2load, curl, Open5GS) sends them: the first indexes :authority,
    user-agent and accept; :path is always a Huffman literal without indexing."""
    rng = random.Random(seed)
    encoder = hpack_lib.Encoder()
    blocks = []
    expected = []
    for _ in range(count):
        imei = "35209900" + "".join(rng.choice("0123456789") for _ in range(7))
        imsi = "00101" + "".join(rng.choice("0123456789") for _ in range(10))
        path = f"{PATH_HEAD}{imei}&supi=imsi-{imsi}"
        rest = [
            (":authority", "eir.5gc.mnc001.mcc001.3gppnetwork.org:8080"),
            ("user-agent", "nghttp2/1.59.0"),
            ("accept", "application/json"),
        ]
        blocks.append(
            encoder.encode([(":method", "GET"), (":scheme", "http")])
            + without_indexing(4, path.encode())
            + encoder.encode(rest)
        )
        expected.append([(":method", "GET"), (":scheme", "http"), (":path", path), *rest])
    return blocks, expected


def test_nghttp2_requests() -> None:
    blocks, expected = nghttp2_requests(50)
    decoder = Decoder()
    for block, headers in zip(blocks, expected, strict=True):
        assert decoder.decode(block) == headers
        check_table(decoder)
    assert [n for n, _ in decoder.dynamic_table] == ["accept", "user-agent", ":authority"]
    assert len(blocks[1]) < len(blocks[0])  # later blocks index everything but :path
    assert blocks[1][:2] == b"\x82\x86"


# --- Round trips through the hpack library's encoder -----------------------------------------

NAMES = [b":path", b":authority", b"user-agent", b"accept", b"x-request-id", b"cookie", b"a"]
LONG_HEADS = [PATH_HEAD.encode(), b"Bearer eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.", b"\xff" * 40]

names = st.one_of(st.sampled_from(NAMES), st.binary(max_size=20))
# Values: short random ones (the table decoder), and long ones (ls-qpack) sharing a head.
values = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda head, tail: head + tail, st.sampled_from(LONG_HEADS), st.binary(max_size=30)),
)
MODES = ["index", "never", "without", "without-static-name"]
fields = st.tuples(names, values, st.sampled_from(MODES), st.integers(1, 61))
blocks_strategy = st.lists(
    st.tuples(
        st.lists(fields, max_size=12),
        st.booleans(),  # Huffman
        st.one_of(st.none(), st.integers(0, 4096)),  # a table size update before this block
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks_strategy)
def test_round_trip_through_hpack_encoder(
    blocks: list[tuple[list[tuple[bytes, bytes, str, int]], bool, int | None]],
) -> None:
    encoder = hpack_lib.Encoder()
    decoder = Decoder()
    static_names = [n.encode() for n, _ in hpack._STATIC]
    for fields_, huffman, table_size in blocks:
        if table_size is not None and table_size != encoder.header_table_size:
            encoder.header_table_size = table_size
        # The first piece always comes from the encoder: it carries any size update first.
        block = encoder.encode([], huffman=huffman)
        expected = []
        for name, value, mode, static_index in fields_:
            if mode == "without":
                block += without_indexing(name, value, huffman)
            elif mode == "without-static-name":
                name = static_names[static_index - 1]
                block += without_indexing(static_index, value, huffman)
            else:
                block += encoder.encode([(name, value, mode == "never")], huffman=huffman)
            expected.append((name.decode("latin-1"), value.decode("latin-1")))
        assert decoder.decode(block) == expected
        assert decoder.table_limit == encoder.header_table_size
        check_table(decoder)
        assert decoder.dynamic_table == [
            (n.decode("latin-1"), v.decode("latin-1"))
            for n, v in encoder.header_table.dynamic_entries
        ]


def test_hpack_encoder_keeps_the_case_of_names() -> None:
    """hpack 4.x's Encoder sends names as given; we return them as sent (the caller rejects
    upper case)."""
    block = hpack_lib.Encoder().encode([("X-Mixed", "V\xe9")])  # str: sent as UTF-8
    assert Decoder().decode(block) == [("X-Mixed", "V\xc3\xa9")]


# --- Huffman ---------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120), st.booleans())
def test_huffman_agrees_with_hpack_on_encoded_strings(raw: bytes, long_head: bool) -> None:
    if long_head:
        raw = PATH_HEAD.encode() + raw
    coded = HUFFMAN.encode(raw)
    expected = decode_huffman(coded).decode("latin-1")
    assert expected == raw.decode("latin-1")
    assert huffman_string(coded) == expected
    assert huffman_table(coded) == expected
    assert huffman_value(coded) == expected


def oracle(data: bytes) -> str | None:
    try:
        return decode_huffman(data).decode("latin-1")
    except HPACKDecodingError:
        return None


def ours(data: bytes) -> str | None:
    try:
        string_ = huffman_string(data)
    except HpackError:
        string_ = None
    try:
        value = huffman_value(data)
    except HpackError:
        value = None
    try:
        table = huffman_table(data)
    except HpackError:
        table = None
    assert value == string_ == table
    return string_


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=80))
def test_huffman_agrees_with_hpack_on_arbitrary_bytes(data: bytes) -> None:
    """Valid or not (padding, EOS), we decide as the hpack library does."""
    assert ours(data) == oracle(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=1, max_size=60), st.integers(0, 1000), st.sampled_from(LONG_HEADS))
def test_huffman_agrees_with_hpack_on_damaged_strings(raw: bytes, where: int, head: bytes) -> None:
    """Valid strings with one byte changed or cut short, long and short."""
    coded = bytearray(HUFFMAN.encode(head + raw))
    coded[where % len(coded)] ^= 1 + where % 255
    for data in (bytes(coded), bytes(coded[: where % len(coded)])):
        assert ours(data) == oracle(data)


def code_bits(*symbols: int) -> tuple[int, int]:
    bits = 0
    length = 0
    for symbol in symbols:
        bits = (bits << REQUEST_CODES_LENGTH[symbol]) | REQUEST_CODES[symbol]
        length += REQUEST_CODES_LENGTH[symbol]
    return bits, length


def pad(bits: int, length: int, extra_bytes: int = 0, pad_bit: int = 1) -> bytes:
    """Pad to a byte boundary, plus extra_bytes whole bytes of padding."""
    padding = -length % 8 + 8 * extra_bytes
    bits = (bits << padding) | (((1 << padding) - 1) if pad_bit else 0)
    return bits.to_bytes((length + padding) // 8, "big")


def test_huffman_padding_and_eos() -> None:
    bits, length = code_bits(*b"a")  # 5 bits: 3 bits of padding
    assert huffman_string(pad(bits, length)) == "a"
    with pytest.raises(HpackError):  # padding not all ones
        huffman_string(pad(bits, length, pad_bit=0))
    with pytest.raises(HpackError):  # 11 bits of padding
        huffman_string(pad(bits, length, extra_bytes=1))
    bits, length = code_bits(*b"00000000")  # 8 * 5 bits: no padding needed
    assert length == 40
    assert huffman_string(pad(bits, length)) == "00000000"
    with pytest.raises(HpackError):  # 8 bits of padding: a whole byte of ones
        huffman_string(pad(bits, length, extra_bytes=1))
    bits, length = code_bits(ord("a"), 256)  # EOS decoded: 5 + 30 bits, 5 bits of padding
    with pytest.raises(HpackError):
        huffman_string(pad(bits, length))
    with pytest.raises(HpackError):
        huffman_string(b"\xff\xff\xff\xff")  # EOS then 2 bits of padding
    assert huffman_string(b"") == ""


def test_long_strings_go_to_the_c_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    coded = HUFFMAN.encode(PATH_HEAD.encode() + b"352099001761481")
    assert hpack._C_MIN <= len(coded) <= hpack._C_MAX

    def table_not_used(data: bytes, start: int, stop: int) -> str:
        raise AssertionError("table decoder used")

    monkeypatch.setattr(hpack, "_huffman_table", table_not_used)
    assert huffman_string(coded) == PATH_HEAD + "352099001761481"
    assert huffman_value(coded) == PATH_HEAD + "352099001761481"
    with pytest.raises(HpackError):
        huffman_string(coded + b"\xff")  # too much padding
    with pytest.raises(HpackError):
        huffman_string(b"\xff\xff\xff\xff" + bytes(20))  # EOS inside


def coded_of_length(n: int) -> tuple[bytes, bytes]:
    """A string whose Huffman code is exactly n octets: digits "0" (5 bits) and "%" (6 bits)
    make any bit count from 40 up, padded to a byte with at most 7 bits."""
    bits = 8 * n - 3  # 3 bits of padding
    sixes = bits % 5  # 5a + 6b = bits with b = bits mod 5 (bits >= 20)
    raw = b"%" * sixes + b"0" * ((bits - 6 * sixes) // 5)
    coded = HUFFMAN.encode(raw)
    assert len(coded) == n
    return raw, coded


@pytest.mark.parametrize("n", [15, 16, 17, 126, 127, 128, 255, 16383, 16384, 16385, 40000])
def test_huffman_at_the_decoders_bounds(n: int) -> None:
    """Coded lengths around where the C decoder takes over, its 1-byte length prefix ends
    and it hands back to the tables: valid, too much padding, EOS at the end."""
    raw, coded = coded_of_length(n)
    assert huffman_string(coded) == raw.decode() == huffman_value(coded) == huffman_table(coded)
    for bad in (coded + b"\xff", coded[:-1] + b"\xff\xff\xff\xff"):
        assert ours(bad) is None and oracle(bad) is None


def test_huffman_tables_are_complete() -> None:
    rows = hpack._ROWS
    assert len(rows) == 257 and all(len(row) == 257 for row in rows)
    ids = {id(row) for row in rows}
    assert all(id(nxt) in ids for row in rows for _, nxt in row[:256])
    assert sum(row[256] for row in rows) == 8  # the root and 1..7 one-bits


# --- Hostile input ---------------------------------------------------------------------------


def decode_or_hpack_error(decoder: Decoder, data: bytes) -> bool:
    try:
        decoder.decode(data)
    except HpackError:
        return False
    check_table(decoder)
    return True


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_random_bytes_raise_only_hpack_error(blocks: list[bytes]) -> None:
    decoder = Decoder(max_table_size=256, max_header_list_size=4096)
    for block in blocks:
        if not decode_or_hpack_error(decoder, block):
            decoder = Decoder(max_table_size=256, max_header_list_size=4096)


@settings(max_examples=1000, deadline=None)
@given(st.integers(0, 49), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255))))
def test_damaged_requests_raise_only_hpack_error(
    which: int, changes: list[tuple[int, int]]
) -> None:
    blocks, _ = nghttp2_requests(50)
    decoder = Decoder()
    decoder.decode(blocks[0])
    block = bytearray(blocks[which])
    for where, byte in changes:
        block[where % len(block)] = byte
    decode_or_hpack_error(decoder, bytes(block))


@pytest.mark.parametrize("blocks", [C3, C4], ids=["C.3", "C.4"])
def test_truncated_blocks(blocks: list[bytes]) -> None:
    """Cut anywhere: an error, or (at a field boundary) the fields before the cut."""
    for cut in range(len(blocks[0])):
        decoder = Decoder()
        try:
            headers = decoder.decode(blocks[0][:cut])
        except HpackError as e:
            assert type(e) is HpackError
        else:
            assert headers == C_REQUESTS[0][: len(headers)]
    literal = without_indexing(4, PATH_HEAD.encode() + b"352099001761481")
    for cut in range(1, len(literal)):
        with pytest.raises(HpackError, match="truncated"):
            Decoder().decode(literal[:cut])


def test_index_zero_and_out_of_range() -> None:
    with pytest.raises(HpackError, match="index 0") as e:
        Decoder().decode(b"\x80")
    assert type(e.value) is HpackError  # not a header list size error
    with pytest.raises(HpackError, match="out of range"):
        Decoder().decode(b"\xbe")  # 62: the dynamic table is empty
    with pytest.raises(HpackError, match="out of range"):
        Decoder().decode(b"\x0f\x2f\x00")  # literal whose name index is 62
    with pytest.raises(HpackError, match="out of range"):
        Decoder().decode(b"\x7f\x00\x00")  # 63, 6-bit prefix with a continuation byte
    with pytest.raises(HpackError, match="out of range"):
        Decoder().decode(b"\xff\xff\xff\xff\x7f")  # a large index
    decoder = Decoder()
    decoder.decode(C3[0])
    assert decoder.decode(b"\xbe") == [(":authority", "www.example.com")]
    with pytest.raises(HpackError, match="out of range"):
        decoder.decode(b"\xbf")


def test_integer_continuation_limit() -> None:
    # A string length of 127 spelled with 4 continuation bytes (3 redundant) is accepted...
    value = b"v" * 127
    assert Decoder().decode(b"\x01\x7f\x80\x80\x80\x00" + value) == [(":authority", "v" * 127)]
    # ...5 are refused before reading on.
    with pytest.raises(HpackError, match="integer too long"):
        Decoder().decode(b"\x01\x7f\x80\x80\x80\x80\x00" + value)
    with pytest.raises(HpackError, match="integer too long"):
        Decoder().decode(b"\xff" + b"\xff" * 10)
    with pytest.raises(HpackError, match="truncated"):
        Decoder().decode(b"\xff\xff")  # ends inside an integer


def test_table_size_updates() -> None:
    decoder = Decoder(max_table_size=100)
    with pytest.raises(HpackError, match="above 100"):
        decoder.decode(b"\x3f\x46")  # 31 + 70 = 101
    decoder = Decoder(max_table_size=100)
    decoder.decode(b"\x3f\x45")  # exactly 100
    assert decoder.table_limit == 100
    with pytest.raises(HpackError, match="after a field"):
        Decoder().decode(b"\x82\x20")
    # Two updates at the start (RFC 7541 4.2): to 0 (empties the table), then back to 4096.
    decoder = Decoder()
    decoder.decode(C3[0])
    assert decoder.table_size == 57
    assert decoder.decode(b"\x20\x3f\xe1\x1f\x82") == [(":method", "GET")]
    assert decoder.table_limit == 4096
    assert decoder.table_size == 0
    assert decoder.dynamic_table == []
    # Shrinking evicts the oldest entries only.
    decoder = Decoder()
    for block in C3:
        decoder.decode(block)
    decoder.decode(b"\x3f\x5c")  # 31 + 92 = 123: room for the newest two entries (54 + 53)
    assert decoder.dynamic_table == [("custom-key", "custom-value"), ("cache-control", "no-cache")]
    assert decoder.table_size == 107


def test_entry_larger_than_the_table_empties_it() -> None:
    decoder = Decoder(max_table_size=64)
    decoder.decode(C3[0])  # 57 octets
    assert decoder.table_size == 57
    assert decoder.decode(b"\x40\x01a\x20" + b"x" * 32) == [("a", "x" * 32)]  # 65 octets
    assert decoder.dynamic_table == []
    assert decoder.table_size == 0


def test_header_list_size() -> None:
    fields = [(":authority", "www.example.com")]  # 10 + 15 + 32 = 57
    assert Decoder(max_header_list_size=57).decode(C3[0][3:]) == fields
    with pytest.raises(HeaderListTooLarge):
        Decoder(max_header_list_size=56).decode(C3[0][3:])
    # Indexed fields count too; a block over the limit is decoded to its end all the same
    # (the dynamic table stays in step), then refused.
    d = Decoder(max_header_list_size=100)
    with pytest.raises(HeaderListTooLarge):
        d.decode(b"\x40\x01a\x7f\x01" + b"x" * 128 + b"\x40\x01b\x01y")  # a: 161 > 100
    assert d.dynamic_table == [("b", "y"), ("a", "x" * 128)]
    assert d.decode(b"\xbe") == [("b", "y")]
    assert len(Decoder(max_header_list_size=42 * 390).decode(b"\x82" * 390)) == 390
    with pytest.raises(HeaderListTooLarge):
        Decoder(max_header_list_size=42 * 390).decode(b"\x82" * 391)
    with pytest.raises(HeaderListTooLarge):
        Decoder().decode(b"\x82" * 100_000)

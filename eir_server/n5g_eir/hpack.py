"""HPACK header block decoder (RFC 7541), server side of HTTP/2, built for the request path.

Pure code, no I/O. One Decoder per connection; decode() takes a whole header block (HEADERS plus
its CONTINUATIONs) and returns the fields as latin-1 `str` pairs (latin-1 maps every octet, so
decoding never fails; names come back as sent, the caller rejects upper case).

Why not the `hpack` library: it spends ~22 us per typical request block, mostly Huffman decoding
bit by bit. Here long Huffman strings (the N5g-eir :path) are decoded in C by ls-qpack, short
ones by a byte-at-a-time state machine over tables built at import.

Any error raises HpackError and the connection must end with COMPRESSION_ERROR; the decoder state
is then unusable (no rollback: the connection goes away anyway).
"""

from __future__ import annotations

from typing import Any

from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from pylsqpack import Decoder as _QpackDecoder
from pylsqpack import DecompressionFailed as _QpackError

__all__ = ["Decoder", "HeaderListTooLarge", "HpackError", "MalformedValue", "encode_integer"]


class HpackError(Exception):
    """Any decoding error: the connection must end with COMPRESSION_ERROR."""


class MalformedValue(HpackError):
    """A field value RFC 9113 8.2.1 forbids (NUL, CR or LF, or whitespace at an end) was
    indexed into the dynamic table: every later request naming it would be malformed too, so
    the connection ends (PROTOCOL_ERROR; RFC 9113 5.4.1 allows it for a stream error)."""


class HeaderListTooLarge(HpackError):
    """The decoded list exceeds max_header_list_size (RFC 7540 SETTINGS_MAX_HEADER_LIST_SIZE;
    size = sum(len(name) + len(value) + 32))."""


# RFC 7541 Appendix A.
_STATIC: tuple[tuple[str, str], ...] = (
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
)
_FIRST_DYNAMIC = len(_STATIC) + 1  # 62: index of the newest dynamic entry (RFC 7541 2.3.3)
_ENTRY_OVERHEAD = 32  # RFC 7541 4.1; also RFC 7540 6.5.2 for the header list size
# At most 4 continuation bytes (integers below prefix + 2**28): no index or length needs more,
# and a run of 0x80 bytes cannot keep the integer loop going.
_MAX_CONTINUATION_SHIFT = 21


# --- Huffman (RFC 7541 5.2, Appendix B) -------------------------------------------------------
#
# States are the 256 internal nodes of the code tree (0 = root) plus _ERR, an absorbing state
# entered when EOS is decoded. Each state is a row (a list), so the hot loop does one index and
# one unpack per byte and never builds an int (a state number plus the byte would be a fresh
# int object every byte: ~30% more instructions):
#   row[byte] -> (symbols completed while consuming that byte: 0, 1 or 2, as latin-1 str,
#                 the next state's row)
#   row[256]  -> True when a string may end in this state: reached from the root by 0..7
#                one-bits (padding is a prefix of EOS, at most 7 bits)
# The rows reference each other (a cycle) and live as long as the module: ~66k tuples, built
# at import and frozen out of the collector's sight with everything else built at start.

_ERR = 256


def _build_huffman() -> list[list[Any]]:
    unset = -(1 << 20)
    zero = [unset]  # child on bit 0 of each internal node: node id, or ~symbol for a leaf
    one = [unset]
    for sym, (code, length) in enumerate(zip(REQUEST_CODES, REQUEST_CODES_LENGTH, strict=True)):
        node = 0
        for shift in range(length - 1, 0, -1):
            kids = one if (code >> shift) & 1 else zero
            child = kids[node]
            if child == unset:
                child = len(zero)
                zero.append(unset)
                one.append(unset)
                kids[node] = child
            node = child
        (one if code & 1 else zero)[node] = ~sym
    if len(zero) != _ERR or unset in zero or unset in one:
        raise AssertionError("the Huffman code table is not a complete prefix code")

    # First a nibble at a time (257 * 16 walks of 4 bits), then bytes as two nibbles composed
    # with slice assignments: about 10x cheaper at import than walking 8 bits per (state, byte).
    nib_next: list[list[int]] = []
    nib_emit: list[list[str]] = []
    for state in range(_ERR):
        row_next: list[int] = []
        row_emit: list[str] = []
        for nibble in range(16):
            node = state
            out = ""
            for shift in (3, 2, 1, 0):
                child = (one if (nibble >> shift) & 1 else zero)[node]
                if child >= 0:
                    node = child
                elif child == ~256:  # EOS inside a string
                    node = _ERR
                    break
                else:
                    out += chr(~child)
                    node = 0
            row_next.append(node)
            row_emit.append(out)
        nib_next.append(row_next)
        nib_emit.append(row_emit)
    nib_next.append([_ERR] * 16)
    nib_emit.append([""] * 16)

    nib_next_premul = [[s << 8 for s in row] for row in nib_next]
    next_table = [0] * ((_ERR + 1) << 8)
    emit_table = [""] * ((_ERR + 1) << 8)
    for state in range(_ERR + 1):
        for high in range(16):
            mid = nib_next[state][high]
            first = nib_emit[state][high]
            base = (state << 8) | (high << 4)
            next_table[base : base + 16] = nib_next_premul[mid]
            emit_table[base : base + 16] = (
                [first + e for e in nib_emit[mid]] if first else nib_emit[mid]
            )

    accept = [False] * (_ERR + 1)
    node = 0
    for _ in range(8):
        accept[node] = True
        node = one[node]
    rows: list[list[Any]] = [[] for _ in range(_ERR + 1)]
    for state, row in enumerate(rows):
        base = state << 8
        row.extend(zip(emit_table[base:base + 256],
                       [rows[n >> 8] for n in next_table[base:base + 256]], strict=True))
        row.append(accept[state])
    return rows


_ROWS = _build_huffman()
_ROOT = _ROWS[0]


def encode_integer(value: int, prefix: int, first: int) -> bytes:
    """RFC 7541 5.1 integer with an N-bit prefix; `first` carries the pattern bits (QPACK,
    RFC 9204 4.1.1, codes integers the same way)."""
    top = (1 << prefix) - 1
    if value < top:
        return bytes((first | value,))
    out = bytearray((first | top,))
    value -= top
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Long strings (the N5g-eir :path, ~60 coded bytes) are decoded in C by ls-qpack (pylsqpack,
# aioquic's QPACK library): QPACK codes string literals with HPACK's Huffman code and its
# padding rules (RFC 9204 4.1.2), so one string goes to a QPACK decoder as the value of a field
# section of its own: no dynamic table (Required Insert Count 0, Delta Base 0), one literal
# field line naming static entry 1 (":path"), Huffman bit set. ~6.6k instructions per :path
# against ~18k for the table walk below, which keeps short strings (a call into the C decoder
# costs more than they do) and long ones past ls-qpack's limits. The tests hold both to the
# `hpack` library's decoder, on valid and invalid strings.
_C_MIN = 16  # coded octets
_C_MAX = 16384
_qpack_feed = _QpackDecoder(0, 0).feed_header  # stateless without a table: one per process
_QPACK_HEAD = b"\x00\x00\x51"  # section prefix, then the field line up to its value length
_QPACK_HEADS = [_QPACK_HEAD + encode_integer(n, 7, 0x80) for n in range(127)]


def _huffman(data: bytes, start: int, stop: int) -> str:
    """Decode data[start:stop] (stop <= len(data)) as a Huffman-coded string literal."""
    n = stop - start
    if _C_MIN <= n <= _C_MAX:
        head = _QPACK_HEADS[n] if n < 127 else _QPACK_HEAD + encode_integer(n, 7, 0x80)
        try:
            _, fields = _qpack_feed(0, head + data[start:stop])
        except _QpackError:
            raise HpackError("invalid Huffman string: EOS, or padding not 0-7 one-bits") from None
        return fields[0][1].decode("latin-1")
    return _huffman_table(data, start, stop)


def _huffman_table(data: bytes, start: int, stop: int) -> str:
    """`_huffman` by the state tables above, in Python."""
    parts: list[str] = []
    append = parts.append
    row = _ROOT
    for byte in data[start:stop]:
        symbols, row = row[byte]
        append(symbols)
    if not row[256]:
        raise HpackError("invalid Huffman string: EOS, or padding not 0-7 one-bits")
    return "".join(parts)


def _integer(data: bytes, pos: int, value: int) -> tuple[int, int]:
    """Continuation bytes of an integer whose prefix was all ones (RFC 7541 5.1); value is that
    prefix maximum. Returns (integer, position after it)."""
    shift = 0
    while True:
        byte = data[pos]  # IndexError (truncated) becomes HpackError in decode()
        pos += 1
        value += (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        if shift == _MAX_CONTINUATION_SHIFT:
            raise HpackError("integer too long")
        shift += 7


def _string(data: bytes, pos: int) -> tuple[str, int]:
    """A string literal at pos (RFC 7541 5.2). Returns (string, position after it)."""
    first = data[pos]
    pos += 1
    length = first & 0x7F
    if length == 0x7F:
        length, pos = _integer(data, pos, 0x7F)
    stop = pos + length
    if stop > len(data):
        raise HpackError("truncated string literal")
    if first & 0x80:
        return _huffman(data, pos, stop), stop
    return data[pos:stop].decode("latin-1"), stop


# [0] stands for index 0, which is never a field: its size is so large that an indexed field
# naming it fails the header list size check, where it is told apart (no extra test per field).
_INDEX_ZERO_SIZE = 1 << 62
_STATIC_TABLE: list[tuple[str, str]] = [("", ""), *_STATIC]
_STATIC_SIZES: list[int] = [_INDEX_ZERO_SIZE] + [
    len(n) + len(v) + _ENTRY_OVERHEAD for n, v in _STATIC
]


class Decoder:
    """Decoding context of one connection (RFC 7541 2.2): the dynamic table survives blocks."""

    __slots__ = ("_check", "_limit", "_max_list", "_max_table_size", "_size", "_sizes",
                 "_table", "malformed")

    def __init__(self, max_table_size: int = 4096, max_header_list_size: int = 16384,
                 check_values: bool = False) -> None:
        # One list for both tables: [0] unused, 1..61 static, 62.. dynamic, newest first; so an
        # index is a plain list index and a bad one an IndexError. _sizes runs parallel to it
        # (entry sizes, for eviction and the header list size).
        self._table: list[tuple[str, str]] = list(_STATIC_TABLE)
        self._sizes: list[int] = list(_STATIC_SIZES)
        self._size = 0  # octets in the dynamic table (RFC 7541 4.1)
        self._limit = max_table_size  # current maximum, as set by the encoder's size updates
        self._max_table_size = max_table_size  # our SETTINGS_HEADER_TABLE_SIZE: the ceiling
        self._max_list = max_header_list_size
        # check_values (HTTP/2's rule, not HPACK's): the last block had a literal value RFC
        # 9113 8.2.1 forbids, not indexed: that request is malformed (a stream error for the
        # caller); one indexed raises MalformedValue.
        self._check = check_values
        self.malformed = False

    @property
    def table_size(self) -> int:
        """Octets in the dynamic table (sum of len(name) + len(value) + 32 per entry)."""
        return self._size

    @property
    def table_limit(self) -> int:
        """The dynamic table's current maximum size (as last set by the encoder)."""
        return self._limit

    @property
    def dynamic_table(self) -> list[tuple[str, str]]:
        """A copy of the dynamic table, newest entry (index 62) first."""
        return self._table[_FIRST_DYNAMIC:]

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        """Decode one complete header block into (name, value) pairs, in order."""
        table = self._table
        sizes = self._sizes
        budget = self._max_list
        self.malformed = False
        headers: list[tuple[str, str]] = []
        append = headers.append
        end = len(block)
        pos = 0
        # An IndexError anywhere below is a read past the end of the block or an index beyond
        # the tables (a `try` costs nothing when nothing is raised).
        try:
            # Dynamic table size updates: only before the first field (RFC 7541 4.2).
            while pos < end and block[pos] & 0xE0 == 0x20:
                limit = block[pos] & 0x1F
                pos += 1
                if limit == 0x1F:
                    limit, pos = _integer(block, pos, 0x1F)
                if limit > self._max_table_size:
                    raise HpackError(f"table size update to {limit} above {self._max_table_size}")
                self._limit = limit
                size = self._size
                while size > limit:
                    size -= sizes.pop()
                    table.pop()
                self._size = size

            while pos < end:
                byte = block[pos]
                pos += 1

                if byte & 0x80:  # indexed field (6.1): most fields of a repeated request
                    if byte == 0xFF:
                        index, pos = _integer(block, pos, 0x7F)
                    else:
                        index = byte & 0x7F
                    field = table[index]
                    budget -= sizes[index]
                    if budget < 0:
                        if index == 0:
                            raise HpackError("index 0")
                        continue  # over the limit: decoded on, kept no more (see the end)
                    append(field)
                    continue

                if byte & 0x40:  # literal with incremental indexing (6.2.1)
                    indexing = True
                    index = byte & 0x3F
                    if index == 0x3F:
                        index, pos = _integer(block, pos, 0x3F)
                elif byte & 0x20:
                    raise HpackError("dynamic table size update after a field")
                else:  # literal without indexing (6.2.2) or never indexed (6.2.3)
                    indexing = False
                    index = byte & 0x0F
                    if index == 0x0F:
                        index, pos = _integer(block, pos, 0x0F)

                if index:
                    name = table[index][0]
                else:
                    name, pos = _string(block, pos)

                value, pos = _string(block, pos)
                # RFC 9113 8.2.1, checked here on literals only: indexed fields are the static
                # table's or were literals when indexed (a C search per character, one
                # literal per request in the common case, where a check per field in the
                # request cost 15% of the N5g-eir path)
                if self._check and ("\n" in value or "\r" in value or "\0" in value or (
                        value and (value[0] in " \t" or value[-1] in " \t"))):
                    if indexing:
                        raise MalformedValue(f"forbidden value of {name[:32]!r} indexed")
                    self.malformed = True

                entry_size = len(name) + len(value) + _ENTRY_OVERHEAD
                budget -= entry_size
                field = (name, value)
                if budget >= 0:
                    append(field)

                if indexing:  # RFC 7541 4.4: evict oldest until it fits; too big empties the table
                    limit = self._limit
                    if entry_size > limit:
                        del table[_FIRST_DYNAMIC:]
                        del sizes[_FIRST_DYNAMIC:]
                        self._size = 0
                    else:
                        size = self._size + entry_size
                        while size > limit:
                            size -= sizes.pop()
                            table.pop()
                        table.insert(_FIRST_DYNAMIC, field)
                        sizes.insert(_FIRST_DYNAMIC, entry_size)
                        self._size = size
        except IndexError:
            raise HpackError("truncated header block or index out of range") from None
        if budget < 0:
            # Raised only now, the whole block decoded: the dynamic table stays in step with the
            # peer's, so the connection can go on (RFC 9113 10.5.1: answer 431 on the stream).
            raise HeaderListTooLarge("header list too large")
        return headers

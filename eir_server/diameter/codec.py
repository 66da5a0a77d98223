"""Sans-I/O Diameter codec (RFC 6733 section 3 and 4): framing, decoding, validation, encoding.

Decoding never raises for a peer's mistake. Problems are data (`Problem`), kept in the order they
were found; the first one becomes the answer's Result-Code and Failed-AVP. A stream that cannot
be split into messages at all is reported in one place: `Framer.error`.

Decoded AVPs are plain tuples indexed by the constants below rather than objects: an ECR has a
dozen AVPs and building a dozen instances per request is the biggest cost of a Python decoder.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final, NamedTuple

from . import errors
from .dictionary import FIXED_LENGTH, AvpDef, AvpKey, Dictionary, Grammar

HEADER: Final = struct.Struct("!IIIII")  # version|length, flags|code, application, hop-by-hop, end-to-end
AVP_HEADER: Final = struct.Struct("!II")
U32: Final = struct.Struct("!I")
U64: Final = struct.Struct("!Q")
I32: Final = struct.Struct("!i")
I64: Final = struct.Struct("!q")
F32: Final = struct.Struct("!f")
F64: Final = struct.Struct("!d")

# Final throughout: compiled modules then use these as constants, not module dict lookups.
# Header flags (RFC 6733 3)
FLAG_R: Final = 0x80
FLAG_P: Final = 0x40
FLAG_E: Final = 0x20
FLAG_T: Final = 0x10
HEADER_RESERVED: Final = 0x0F
# AVP flags (RFC 6733 4.1)
AVP_V: Final = 0x80
AVP_M: Final = 0x40
AVP_P: Final = 0x20
AVP_RESERVED: Final = 0x1F

VERSION: Final = 1
HEADER_LENGTH: Final = 20
DEFAULT_MAX_MESSAGE: Final = 65_535  # far above any ECR/CER; configurable per server
MAX_DEPTH: Final = 8  # grouped nesting; deeper is refused rather than recursed into



class Avp(NamedTuple):
    """One decoded AVP: offsets into the message's bytes, not copies."""

    code: int
    vendor: int
    flags: int
    vstart: int  # value start
    vend: int  # value end
    start: int  # header start
    end: int  # padded end
    children: tuple[Avp, ...] | None  # a grouped AVP's AVPs (known grouped AVPs only)
    d: AvpDef | None  # None: not in the dictionary


# Field positions, for the hot path: `a[VSTART]` is a specialised tuple index, `a.vstart` a
# descriptor call (Python 3.11). Literal Finals, so type checkers know each field's type.
CODE: Final = 0
VENDOR: Final = 1
FLAGS: Final = 2
VSTART: Final = 3
VEND: Final = 4
START: Final = 5
END: Final = 6
CHILDREN: Final = 7
DEF: Final = 8
_new_avp: Final = tuple.__new__  # Avp(...) runs a Python-level __new__; this is the C one
Slots = Sequence[Avp | None]  # the last AVP matching each grammar rule, by rule index


class Problem(NamedTuple):
    result_code: int
    failed_avp: bytes | None  # the AVP(s) to put inside Failed-AVP, already encoded
    message: str


class Message:
    """A decoded message. `data` is the whole message; AVP offsets index into it."""

    __slots__ = ("flags", "code", "application_id", "hop_by_hop", "end_to_end", "data", "avps",
                 "problems", "slots")

    def __init__(self, flags: int, code: int, application_id: int, hop_by_hop: int,
                 end_to_end: int, data: bytes, avps: Sequence[Avp], problems: list[Problem],
                 slots: Slots | None = None) -> None:
        self.flags = flags
        self.code = code
        self.application_id = application_id
        self.hop_by_hop = hop_by_hop
        self.end_to_end = end_to_end
        self.data = data
        self.avps = avps
        self.problems = problems
        # After validation: the last AVP matching each grammar rule, by rule index.
        self.slots = slots

    @property
    def is_request(self) -> bool:
        return bool(self.flags & FLAG_R)

    def find(self, code: int, vendor: int = 0) -> Avp | None:
        for a in self.avps:
            if a.code == code and a.vendor == vendor:
                return a
        return None

    def raw(self, avp: Avp) -> bytes:
        """The AVP's bytes as received, padding included (for echoing Proxy-Info, Failed-AVP)."""
        return self.data[avp.start:avp.end]

    def value(self, avp: Avp) -> bytes:
        return self.data[avp.vstart:avp.vend]

    def u32(self, avp: Avp) -> int:
        value: int = U32.unpack_from(self.data, avp.vstart)[0]
        return value

    def text(self, avp: Avp) -> str:
        return self.data[avp.vstart:avp.vend].decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------
# Framing


class Framer:
    """Splits a TCP byte stream into messages by the header's Message-Length."""

    __slots__ = ("_buf", "max_length", "error")

    def __init__(self, max_length: int = DEFAULT_MAX_MESSAGE) -> None:
        self._buf = b""
        self.max_length = max_length
        self.error: str | None = None  # set once the stream is unframeable; feed() then stops

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Complete messages in arrival order. At an unframeable header, returns the messages
        before it and sets `error` (they still deserve answers); nothing is framed after."""
        if self.error is not None:
            return []
        buf = self._buf + data if self._buf else data
        n = len(buf)
        pos = 0
        out: list[bytes] = []
        unpack = U32.unpack_from
        max_length = self.max_length
        while n - pos >= 4:
            word: int = unpack(buf, pos)[0]
            length = word & 0xFFFFFF
            # Another version is framed by its length all the same (RFC 6733 3 keeps the
            # header's first word) and answered 5011 by the connection (`decode`); a length
            # that cannot be framed still ends the stream.
            if length < HEADER_LENGTH or length > max_length:
                self.error = f"unframeable message length {length}"
            if self.error is not None:
                self._buf = b""
                return out
            if n - pos < length:
                break
            out.append(buf[pos:pos + length])
            pos += length
        self._buf = buf[pos:] if pos < n else b""
        return out


# ---------------------------------------------------------------------------------------------
# Encoding


def avp(code: int, payload: bytes, vendor: int = 0, mandatory: bool = True) -> bytes:
    """Encode one AVP with its padding."""
    flags = (AVP_M if mandatory else 0) | (AVP_V if vendor else 0)
    hlen = 12 if vendor else 8
    length = hlen + len(payload)
    head = AVP_HEADER.pack(code, (flags << 24) | length)
    if vendor:
        head += U32.pack(vendor)
    return head + payload + b"\0" * (-length % 4)


def u32_avp(code: int, value: int, vendor: int = 0, mandatory: bool = True) -> bytes:
    return avp(code, U32.pack(value), vendor, mandatory)


def str_avp(code: int, value: str, vendor: int = 0, mandatory: bool = True) -> bytes:
    return avp(code, value.encode(), vendor, mandatory)


def grouped_avp(code: int, children: Iterable[bytes], vendor: int = 0,
                mandatory: bool = True) -> bytes:
    return avp(code, b"".join(children), vendor, mandatory)


def address_payload(ip: str) -> bytes:
    addr = ipaddress.ip_address(ip)
    return (b"\0\x01" if addr.version == 4 else b"\0\x02") + addr.packed


def header(flags: int, code: int, application_id: int, hop_by_hop: int, end_to_end: int,
           length: int) -> bytes:
    return HEADER.pack((VERSION << 24) | length, (flags << 24) | code, application_id,
                       hop_by_hop, end_to_end)


def message(flags: int, code: int, application_id: int, hop_by_hop: int, end_to_end: int,
            avps: Iterable[bytes]) -> bytes:
    body = b"".join(avps)
    return header(flags, code, application_id, hop_by_hop, end_to_end,
                  HEADER_LENGTH + len(body)) + body


AvpValue = int | float | str | bytes | bytearray | memoryview


def encode_value(d: AvpDef, value: AvpValue) -> bytes:
    """Encode a Python value as the payload of AVP `d` (not used on the hot path)."""
    t = d.type
    if t in ("Unsigned32", "Time"):
        return U32.pack(int(value))
    if t in ("Integer32", "Enumerated"):
        return I32.pack(int(value))
    if t == "Unsigned64":
        return U64.pack(int(value))
    if t == "Integer64":
        return I64.pack(int(value))
    if t == "Float32":
        return F32.pack(float(value))
    if t == "Float64":
        return F64.pack(float(value))
    if t == "Address":
        return address_payload(str(value))
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"cannot encode {type(value).__name__} as {t} for {d.name}")


def encode_avp(d: AvpDef, value: AvpValue | Iterable[bytes]) -> bytes:
    """Encode AVP `d`; a Grouped value is an iterable of already encoded AVPs."""
    if d.grammar is not None:
        if isinstance(value, int | float | str | bytes | bytearray | memoryview):
            raise TypeError(f"{d.name} is Grouped: pass its encoded AVPs")
        payload = b"".join(value)
    elif isinstance(value, int | float | str | bytes | bytearray | memoryview):
        payload = encode_value(d, value)
    else:
        raise TypeError(f"{d.name} is {d.type}, not Grouped")
    return avp(d.code, payload, d.vendor, d.mandatory == "must")


def decode_value(d: AvpDef | None, payload: bytes) -> object:
    """Decode a payload as AVP `d`'s type (None: raw bytes)."""
    t = d.type if d is not None else "OctetString"
    if t in ("Unsigned32", "Time"):
        return U32.unpack(payload)[0]
    if t in ("Integer32", "Enumerated"):
        return I32.unpack(payload)[0]
    if t == "Unsigned64":
        return U64.unpack(payload)[0]
    if t == "Integer64":
        return I64.unpack(payload)[0]
    if t == "Float32":
        return F32.unpack(payload)[0]
    if t == "Float64":
        return F64.unpack(payload)[0]
    if t == "Address":
        family = int.from_bytes(payload[:2], "big")
        if family in (1, 2):
            return str(ipaddress.ip_address(payload[2:]))
        return payload
    if t in ("UTF8String", "DiameterIdentity", "DiameterURI", "IPFilterRule", "QoSFilterRule"):
        return payload.decode("utf-8")
    return payload


# ---------------------------------------------------------------------------------------------
# Decoding


def _padded_header(data: bytes, start: int, end: int, hlen: int) -> bytes:
    """RFC 6733 7.1.5 (5014): an undecodable header is padded with zeros to a full header."""
    head = bytes(data[start:min(end, start + hlen)])
    return head + b"\0" * (hlen - len(head))


def _short_avp(data: bytes, start: int, end: int, hlen: int,
               defs: Mapping[AvpKey, AvpDef] | None = None) -> bytes:
    """RFC 6733 7.1.5/7.5 (5014) for an AVP Length below the header or a header cut short by
    its container: the header as received, zero-padded to its minimum, with its AVP Length
    rewritten to cover the header and a zero-filled minimum payload. Copied as received, a
    length below the header makes the Failed-AVP itself undecodable (Wireshark: malformed;
    Erlang/OTP diameter discards such an answer), so the peer never sees the 5014."""
    head = _padded_header(data, start, end, hlen)
    if hlen == 8 and head[4] & AVP_V:  # V set but fewer than 12 bytes: a vendor header
        head += b"\0" * 4
    code = AVP_HEADER.unpack_from(head, 0)[0]
    vendor = U32.unpack_from(head, 8)[0] if len(head) == 12 else 0
    return _zero_filled(head, defs.get((code, vendor)) if defs is not None else None)


def _zero_filled(head: bytes, d: AvpDef | None) -> bytes:
    """A copy of an AVP header with its length rewritten to match a zero-filled payload of the
    minimum its type takes (0 when unknown)."""
    payload_len = FIXED_LENGTH.get(d.type, 0) if d is not None else 0
    code, fl = AVP_HEADER.unpack_from(head, 0)
    hlen = len(head)
    length = hlen + payload_len
    rest = head[8:hlen]
    return (AVP_HEADER.pack(code, (fl & 0xFF000000) | length) + rest + b"\0" * payload_len
            + b"\0" * (-length % 4))


def _wrap(parent: bytes, inner: bytes | None) -> bytes | None:
    """Put a nested offender inside a copy of its grouped parent's header (RFC 6733 7.5)."""
    if inner is None:
        return None
    code, fl = AVP_HEADER.unpack_from(parent, 0)
    hlen = 12 if (fl >> 24) & AVP_V else 8
    length = hlen + len(inner)
    return AVP_HEADER.pack(code, (fl & 0xFF000000) | length) + parent[8:hlen] + inner


def example_avp(d: AvpDef) -> bytes:
    """RFC 6733 7.1.5 (5005): an example of the missing AVP with a zero-filled minimum value."""
    return avp(d.code, b"\0" * FIXED_LENGTH.get(d.type, 0), d.vendor, d.mandatory == "must")


def walk(data: bytes, start: int, end: int, defs: Mapping[AvpKey, AvpDef],
         problems: list[Problem], depth: int = 0) -> tuple[Avp, ...]:
    """Split data[start:end] into AVPs, recursing into known grouped AVPs."""
    out: list[Avp] = []
    unpack = AVP_HEADER.unpack_from
    pos = start
    while pos < end:
        if end - pos < 8:
            problems.append(Problem(errors.INVALID_AVP_LENGTH,
                                    _short_avp(data, pos, end, 8), "truncated AVP header"))
            break
        code, fl = unpack(data, pos)
        flags = fl >> 24
        length = fl & 0xFFFFFF
        if flags & AVP_V:
            if end - pos < 12 or length < 12:
                problems.append(Problem(errors.INVALID_AVP_LENGTH,
                                        _short_avp(data, pos, end, 12, defs),
                                        f"AVP {code}: length {length} below its header"))
                break
            vendor = U32.unpack_from(data, pos + 8)[0]
            hlen = 12
        else:
            if length < 8:
                problems.append(Problem(errors.INVALID_AVP_LENGTH,
                                        _short_avp(data, pos, end, 8, defs),
                                        f"AVP {code}: length {length} below its header"))
                break
            vendor = 0
            hlen = 8
        aend = pos + length
        d = defs.get((code, vendor))
        if aend > end:
            problems.append(Problem(errors.INVALID_AVP_LENGTH,
                                    _zero_filled(bytes(data[pos:pos + hlen]), d),
                                    f"AVP {code}: length {length} overruns its container"))
            break
        padded = (aend + 3) & ~3
        if padded > end:
            padded = end  # missing final padding: the message length check reports it
        children: tuple[Avp, ...] | None = None
        if d is not None:
            if d.grammar is not None:
                if depth >= MAX_DEPTH:
                    problems.append(Problem(errors.INVALID_AVP_VALUE, bytes(data[pos:padded]),
                                            f"{d.name}: grouped AVPs nested too deep"))
                else:
                    sub: list[Problem] = []
                    children = walk(data, pos + hlen, aend, defs, sub, depth + 1)
                    if sub:
                        parent = bytes(data[pos:pos + hlen])
                        problems.extend(Problem(p.result_code, _wrap(parent, p.failed_avp),
                                                p.message) for p in sub)
            else:
                fixed = FIXED_LENGTH.get(d.type)
                if fixed is not None and length - hlen != fixed:
                    problems.append(Problem(errors.INVALID_AVP_LENGTH, bytes(data[pos:padded]),
                                            f"{d.name}: value of {length - hlen} bytes, "
                                            f"{d.type} needs {fixed}"))
        out.append(_new_avp(Avp, (code, vendor, flags, pos + hlen, aend, pos, padded, children,
                                  d)))
        pos = padded
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Value checks: one table for both decoders
#
# The bytes of some data formats can be invalid beyond their length (RFC 6733 4.3). For each such
# format, one entry says how the general decoder's `check()` diagnoses a value (5004 and why) and
# what the fast path may accept without a diagnosis: a subset of what `diagnose` accepts, so the
# fast path never lets through what the general path refuses (tests/diameter/test_fast_path.py).


def _utf8_problem(data: bytes, vs: int, ve: int, d: AvpDef) -> str | None:
    try:
        data[vs:ve].decode("utf-8")
    except UnicodeDecodeError:
        return f"{d.name}: not valid UTF-8"
    return None


def _identity_problem(data: bytes, vs: int, ve: int, d: AvpDef) -> str | None:
    v = data[vs:ve]
    if not v or not v.isascii():
        return f"{d.name}: not a valid DiameterIdentity"
    return None


def _enum_problem(data: bytes, vs: int, ve: int, d: AvpDef) -> str | None:
    value = I32.unpack_from(data, vs)[0]
    if d.enums and value not in d.enums:
        return f"{d.name}: unknown value {value}"
    return None


def _address_problem(data: bytes, vs: int, ve: int, d: AvpDef) -> str | None:
    n = ve - vs
    if n < 2:
        return f"{d.name}: address too short"
    family = data[vs] << 8 | data[vs + 1]
    if (family == 1 and n != 6) or (family == 2 and n != 18):
        return f"{d.name}: address length {n - 2} does not match family {family}"
    return None


def _utf8_plain(data: bytes, vs: int, ve: int, enums: frozenset[int] | None) -> bool:
    # ASCII is plainly valid UTF-8; anything else gets the general path's closer look.
    return data[vs:ve].isascii()


def _identity_plain(data: bytes, vs: int, ve: int, enums: frozenset[int] | None) -> bool:
    return ve > vs and data[vs:ve].isascii()


def _enum_plain(data: bytes, vs: int, ve: int, enums: frozenset[int] | None) -> bool:
    return enums is None or I32.unpack_from(data, vs)[0] in enums


def _address_plain(data: bytes, vs: int, ve: int, enums: frozenset[int] | None) -> bool:
    n = ve - vs
    if n < 2:
        return False
    family = data[vs] << 8 | data[vs + 1]
    return not ((family == 1 and n != 6) or (family == 2 and n != 18))


# How a cached layout re-checks a value: as text (ASCII), as an enumeration, or not at all (a
# layout with such an AVP is not cached).
LAYOUT_TEXT, LAYOUT_ENUM, LAYOUT_NONE = range(3)


class ValueCheck(NamedTuple):
    diagnose: Callable[[bytes, int, int, AvpDef], str | None]  # check(): 5004 and why
    plainly_valid: Callable[[bytes, int, int, frozenset[int] | None], bool]  # decode_fast
    layout: int  # how a cached layout re-checks it: LAYOUT_*


VALUE_CHECKS: Mapping[str, ValueCheck] = {
    "UTF8String": ValueCheck(_utf8_problem, _utf8_plain, LAYOUT_TEXT),
    "DiameterURI": ValueCheck(_utf8_problem, _utf8_plain, LAYOUT_TEXT),
    "DiameterIdentity": ValueCheck(_identity_problem, _identity_plain, LAYOUT_TEXT),
    "Enumerated": ValueCheck(_enum_problem, _enum_plain, LAYOUT_ENUM),
    "Address": ValueCheck(_address_problem, _address_plain, LAYOUT_NONE),
}


# ---------------------------------------------------------------------------------------------
# Grammar checks


class GrammarTables:
    """One grammar, compiled (by `compiled.CompiledDictionary`, which builds every one once):
    rule index by AVP key, the 5005 example AVP per rule, the fast path's table, and the tables
    of the grouped AVPs it may contain (shared by the whole dictionary)."""

    __slots__ = ("grammar", "index", "examples", "groups", "fast")

    def __init__(self, grammar: Grammar, examples: tuple[bytes | None, ...],
                 groups: Mapping[AvpKey, GrammarTables], fast: FastGrammar) -> None:
        self.grammar = grammar
        self.index: Mapping[AvpKey, int] = grammar.index()
        self.examples = examples
        self.groups = groups
        self.fast = fast


def check(data: bytes, avps: Sequence[Avp], tables: GrammarTables,
          problems: list[Problem]) -> None:
    """Check AVPs against an ABNF grammar (RFC 6733 3.2), appending problems in order found."""
    grammar = tables.grammar
    rules = grammar.rules
    index = tables.index
    counts = [0] * len(rules)
    any_avp = grammar.any_avp
    for i, a in enumerate(avps):
        flags = a.flags
        d = a.d
        if flags & AVP_RESERVED:
            problems.append(Problem(errors.INVALID_AVP_BITS, data[a.start:a.end],
                                    f"AVP {a.code}: reserved flag bits set"))
            continue
        if d is None:
            if flags & AVP_M:
                problems.append(Problem(errors.AVP_UNSUPPORTED, data[a.start:a.end],
                                        f"AVP {a.code} (vendor {a.vendor}) unknown, M bit set"))
            elif not any_avp:
                problems.append(Problem(errors.AVP_NOT_ALLOWED, data[a.start:a.end],
                                        f"AVP {a.code} not allowed here"))
            continue
        if flags & AVP_M and d.mandatory == "mustnot":
            problems.append(Problem(errors.INVALID_AVP_BITS, data[a.start:a.end],
                                    f"{d.name}: M bit set, its definition forbids it"))
            continue
        j = index.get((a.code, a.vendor))
        if j is None:
            if not any_avp:
                problems.append(Problem(errors.AVP_NOT_ALLOWED, data[a.start:a.end],
                                        f"{d.name} not allowed here"))
                continue
        else:
            rule = rules[j]
            c = counts[j] = counts[j] + 1
            if rule.max is not None and c == rule.max + 1:
                problems.append(Problem(errors.AVP_OCCURS_TOO_MANY_TIMES,
                                        data[a.start:a.end],
                                        f"{d.name} occurs more than {rule.max} time(s)"))
            if rule.first and i != 0:
                problems.append(Problem(errors.AVP_NOT_ALLOWED, data[a.start:a.end],
                                        f"{d.name} must be the first AVP"))
        children = a.children
        if children is not None:
            sub: list[Problem] = []
            check(data, children, tables.groups[(a.code, a.vendor)], sub)
            if sub:
                parent = data[a.start:a.vstart]
                problems.extend(Problem(p.result_code, _wrap(parent, p.failed_avp), p.message)
                                for p in sub)
        elif d.grammar is None:
            vc = VALUE_CHECKS.get(d.type)
            if vc is not None:
                msg = vc.diagnose(data, a.vstart, a.vend, d)
                if msg is not None:
                    problems.append(Problem(errors.INVALID_AVP_VALUE, data[a.start:a.end], msg))
    for j, rule in enumerate(rules):
        if counts[j] < rule.min:
            problems.append(Problem(errors.MISSING_AVP, tables.examples[j],
                                    f"missing {rule.name}"))
    if grammar.any_min and len(avps) < grammar.any_min:
        problems.append(Problem(errors.MISSING_AVP, None,
                                f"at least {grammar.any_min} AVP(s) required"))


# ---------------------------------------------------------------------------------------------
# Fast path: validate-or-bail


class FastAvp(NamedTuple):
    """What the fast path knows about one AVP definition inside one grammar."""

    slot: int  # grammar rule index, -1 when only "*[ AVP ]" admits it
    bad_flags: int  # AVP flag bits that send it to the general path (reserved, forbidden M)
    fixed: int  # value length of fixed-length types, else 0
    plainly_valid: Callable[[bytes, int, int, frozenset[int] | None], bool] | None
    enums: frozenset[int] | None
    child: FastGrammar | None  # grouped AVPs
    d: AvpDef
    max_count: int
    required: bool  # its rule has min >= 1


class FastGrammar:
    """A grammar compiled for `decode_fast`: one dict lookup per AVP keyed by an int."""

    __slots__ = ("table", "nslots", "required", "any_avp", "any_min", "first_slot", "grammar",
                 "simple_mins")

    def __init__(self, grammar: Grammar) -> None:
        self.grammar = grammar
        rules = grammar.rules
        self.nslots = len(rules)
        # Rules with min >= 1, as (slot, min); when every min is 1, counting first sightings
        # of required slots is enough (`simple_mins`).
        self.required = tuple((i, r.min) for i, r in enumerate(rules) if r.min)
        self.simple_mins = all(m == 1 for _, m in self.required)
        self.any_avp = grammar.any_avp
        self.any_min = grammar.any_min
        self.first_slot = next((i for i, r in enumerate(rules) if r.first), -1)
        self.table: Mapping[int, FastAvp] = {}

    def build(self, defs: Mapping[AvpKey, AvpDef], groups: Mapping[AvpKey, FastGrammar]) -> None:
        """Fill the table; `groups` has the FastGrammar of every grouped AVP (built in two
        steps, because grouped grammars may contain themselves, e.g. through `*[ AVP ]`)."""
        grammar = self.grammar
        rules = grammar.rules
        index = grammar.index()
        table: dict[int, FastAvp] = {}
        for key, d in defs.items():
            slot = index.get(key, -1)
            if slot < 0 and not grammar.any_avp:
                continue  # not allowed here: a lookup miss makes the fast path bail
            vc = VALUE_CHECKS.get(d.type) if d.grammar is None else None
            rule = rules[slot] if slot >= 0 else None
            table[key[0] | (key[1] << 32)] = FastAvp(
                slot, AVP_RESERVED | (AVP_M if d.mandatory == "mustnot" else 0),
                FIXED_LENGTH.get(d.type, 0), vc.plainly_valid if vc is not None else None,
                frozenset(d.enums) if d.enums else None,
                groups[key] if d.grammar is not None else None, d,
                rule.max if rule is not None and rule.max is not None else 1 << 30,
                bool(rule and rule.min))
        self.table = table


def decode_fast(data: bytes, fg: FastGrammar, start: int, end: int,
                slots: list[Avp | None] | None = None,
                depth: int = 0) -> tuple[Avp, ...] | None:
    """Walk and check AVPs in one pass. Returns None at the first thing that is not plainly
    valid (`ValueCheck.plainly_valid`); the caller then runs `decode` + `validate`, which say
    exactly what is wrong. So the fast path never has to produce a diagnosis, and what it
    accepts the general path accepts too (a property test checks it)."""
    out: list[Avp] = []
    append = out.append
    table = fg.table
    counts = [0] * fg.nslots
    unpack = AVP_HEADER.unpack_from
    pos = start
    first_slot = fg.first_slot
    found = 0
    while pos < end:
        if end - pos < 8:
            return None
        code, fl = unpack(data, pos)
        if fl & 0x80000000:
            if end - pos < 12:
                return None
            vendor = U32.unpack_from(data, pos + 8)[0]
            vs = pos + 12
            ent = table.get(code | (vendor << 32))
        else:
            vendor = 0
            vs = pos + 8
            ent = table.get(code)
        aend = pos + (fl & 0xFFFFFF)
        if aend > end or aend < vs:
            return None
        padded = (aend + 3) & ~3
        if padded > end:
            padded = end  # as `walk`: a missing final padding is the message length's problem
        flags = fl >> 24
        if ent is None:
            if flags & 0x5F or not fg.any_avp:  # M or reserved bits on an unknown AVP
                return None
            append(_new_avp(Avp, (code, vendor, flags, vs, aend, pos, padded, None, None)))
            pos = padded
            continue
        slot, bad, fixed, plain, enums, child, d, maxc, required = ent
        if flags & bad or (fixed and aend - vs != fixed):
            return None
        if slot >= 0:
            c = counts[slot] + 1
            if c > maxc or (slot == first_slot and out):
                return None
            counts[slot] = c
            if required and c == 1:
                found += 1
        if plain is not None and not plain(data, vs, aend, enums):
            return None
        if child is not None:
            if depth >= MAX_DEPTH:
                return None
            children = decode_fast(data, child, vs, aend, None, depth + 1)
            if children is None:
                return None
            t = _new_avp(Avp, (code, vendor, flags, vs, aend, pos, padded, children, d))
        else:
            t = _new_avp(Avp, (code, vendor, flags, vs, aend, pos, padded, None, d))
        append(t)
        if slots is not None and slot >= 0:
            slots[slot] = t
        pos = padded
    if fg.simple_mins:
        if found != len(fg.required):
            return None
    else:
        for i, lo in fg.required:
            if counts[i] < lo:
                return None
    if fg.any_min and len(out) < fg.any_min:
        return None
    return tuple(out)


class Layout:
    """The shape of a message that `decode_fast` accepted: where every AVP header sits and
    what it says. Consecutive requests from one peer mostly share a shape (only values change),
    so a later message with the same header words at the same offsets has the same AVPs and
    the same verdict on everything but values; `match` re-checks those values (ASCII text,
    enumerations: `ValueCheck.layout`) with one masked comparison of the whole message read as
    an integer, instead of a Python loop over AVPs. Immutable: every message that matches
    shares its AVP and slot tuples."""

    __slots__ = ("size", "mask", "want", "enum_checks", "avps", "slots")

    def __init__(self, data: bytes, avps: tuple[Avp, ...], slots: Slots) -> None:
        # The message as one big-endian integer: `mask` selects every AVP header's bytes and
        # the top bit of every text value byte; `want` is the headers' bytes with those bits
        # clear (ASCII). Three C calls per match, where unpacking ~20 header words into ints
        # and comparing tuples cost about five times as many instructions.
        n = len(data)
        mask = 0
        text = 0
        enum_checks: list[tuple[int, frozenset[int]]] = []
        flat = _flatten(avps)
        if len(flat) > MAX_LAYOUT_AVPS:
            raise ValueError("too many AVPs to cache the layout")
        for a in flat:
            start, vs, aend, d = a.start, a.vstart, a.vend, a.d
            mask |= ((1 << 8 * (vs - start)) - 1) << 8 * (n - vs)
            if d is None:
                # Unknown AVPs are a peer's to choose (codes, counts): a shape with them is
                # never cached, so distinct shapes cannot fill the cache for everyone else.
                raise ValueError("layouts with unknown AVPs are not cached")
            if a.children is not None:
                continue
            vc = VALUE_CHECKS.get(d.type)
            if vc is None:
                continue
            if vc.layout == LAYOUT_TEXT:
                if aend > vs:
                    text |= int.from_bytes(b"\x80" * (aend - vs), "big") << 8 * (n - aend)
            elif vc.layout == LAYOUT_ENUM:
                if d.enums:
                    enum_checks.append((vs, frozenset(d.enums)))
            else:
                raise ValueError(f"layouts with {d.type} AVPs are not cached")
        self.size = n
        self.want = int.from_bytes(data, "big") & mask
        self.mask = mask | text
        self.enum_checks = tuple(enum_checks)
        self.avps = avps
        self.slots = tuple(slots)

    def match(self, data: bytes) -> bool:
        if len(data) != self.size or int.from_bytes(data, "big") & self.mask != self.want:
            return False
        for off, allowed in self.enum_checks:
            if I32.unpack_from(data, off)[0] not in allowed:
                return False
        return True


def _flatten(avps: Sequence[Avp]) -> list[Avp]:
    out = []
    for a in avps:
        out.append(a)
        if a.children:
            out.extend(_flatten(a.children))
    return out


# A layout's mask and bytes grow with the message, its checks with its AVPs; an ECR has about 15.
MAX_LAYOUT_AVPS: Final = 48
# Layouts under one key (length, first header word) are tried in turn by `find`: keep few.
MAX_LAYOUTS_PER_KEY: Final = 4


class LayoutCache:
    """Layouts keyed by message length and the first AVP's header word (for a request that is
    Session-Id's flags and length, which is what varies most between shapes of equal size).
    Bounded: beyond `max_layouts` the oldest key's layouts are evicted, so a peer sending
    endlessly new shapes costs a fixed amount of memory (it still gets `decode_fast`); at most
    `MAX_LAYOUTS_PER_KEY` per key, so `find` stays a few struct reads; shapes with unknown AVPs
    or more than `MAX_LAYOUT_AVPS` AVPs are never cached.
    `learned` and `evicted` count for the eir_diameter_layout_cache_* metrics."""

    __slots__ = ("_by_key", "_count", "max_layouts", "learned", "evicted")

    def __init__(self, max_layouts: int = 1024) -> None:
        self._by_key: dict[int, tuple[Layout, ...]] = {}
        self._count = 0
        self.max_layouts = max_layouts
        self.learned = 0
        self.evicted = 0

    def __len__(self) -> int:
        return self._count

    def find(self, data: bytes, length: int) -> Layout | None:
        if length < 28:
            return None
        word: int = U32.unpack_from(data, 24)[0]
        candidates = self._by_key.get((length << 32) | word)
        if candidates:
            for lay in candidates:
                if lay.match(data):
                    return lay
        return None

    def learn(self, data: bytes, length: int, avps: tuple[Avp, ...], slots: Slots) -> None:
        if length < 28 or self.max_layouts <= 0:
            return
        try:
            lay = Layout(data, avps, slots)
        except ValueError:
            return
        by_key = self._by_key
        while self._count >= self.max_layouts:
            oldest = next(iter(by_key))
            self._count -= len(by_key.pop(oldest))
            self.evicted += 1
        key = (length << 32) | U32.unpack_from(data, 24)[0]
        same = by_key.pop(key, ())
        if len(same) >= MAX_LAYOUTS_PER_KEY:  # shapes that differ only after the first AVP
            same = same[1:]
            self._count -= 1
            self.evicted += 1
        by_key[key] = same + (lay,)  # re-inserted: the key is now the newest
        self._count += 1
        self.learned += 1


def decode(data: bytes, dictionary: Dictionary) -> Message:
    """Decode one framed message; problems found while walking go to `Message.problems`.

    Header problems come first: invalid header bits (3008) and a length that is not a multiple
    of four (5015). AVPs that do not fill the message exactly are 5014 (an AVP length overruns
    its container or leaves a truncated header).
    """
    vl, fc, app, hbh, e2e = HEADER.unpack_from(data, 0)
    flags = fc >> 24
    problems: list[Problem] = []
    length = vl & 0xFFFFFF
    if vl >> 24 != VERSION:  # RFC 6733 7.1.5: first, the rest of the header may mean otherwise
        problems.append(Problem(errors.UNSUPPORTED_VERSION, None,
                                f"unsupported Diameter version {vl >> 24}"))
    if flags & HEADER_RESERVED or (flags & FLAG_R and flags & FLAG_E):
        problems.append(Problem(errors.INVALID_HDR_BITS, None, "invalid header flag bits"))
    if length % 4:
        problems.append(Problem(errors.INVALID_MESSAGE_LENGTH, None,
                                f"message length {length} not a multiple of 4"))
    avps = walk(data, HEADER_LENGTH, length, dictionary.avps, problems)
    return Message(flags, fc & 0xFFFFFF, app, hbh, e2e, data, avps, problems)


def validate(msg: Message, tables: GrammarTables) -> None:
    """Check a decoded message against its command grammar (`CompiledDictionary.request()` /
    `.answer()`), appending to `msg.problems`; when it is valid, index its AVPs by grammar rule
    in `msg.slots`."""
    check(msg.data, msg.avps, tables, msg.problems)
    if not msg.problems:
        index = tables.index
        slots: list[Avp | None] = [None] * len(tables.grammar.rules)
        for a in msg.avps:
            i = index.get((a.code, a.vendor))
            if i is not None:
                slots[i] = a
        msg.slots = slots


def to_dict(msg: Message) -> list[tuple[str, object]]:
    """A readable view of the AVPs (for logs, tests and the CLI; not for the hot path)."""

    def conv(avps: Sequence[Avp]) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        for a in avps:
            d = a.d
            name = d.name if d is not None else f"AVP-{a.code}-{a.vendor}"
            if a.children is not None:
                out.append((name, conv(a.children)))
            else:
                try:
                    out.append((name, decode_value(d, msg.data[a.vstart:a.vend])))
                except (struct.error, UnicodeDecodeError, ValueError):
                    out.append((name, msg.data[a.vstart:a.vend]))
        return out

    return conv(msg.avps)

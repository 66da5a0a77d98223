"""Sans-I/O Diameter codec (RFC 6733 section 3 and 4): framing, decoding, validation, encoding.

Decoding never raises for a peer's mistake. Problems are data (`Problem`), kept in the order they
were found; the first one becomes the answer's Result-Code and Failed-AVP. Only a stream that
cannot be split into messages at all raises `FramingError`, in one place: `Framer.feed`.

Decoded AVPs are plain tuples indexed by the constants below rather than objects: an ECR has a
dozen AVPs and building a dozen instances per request is the biggest cost of a Python decoder.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from typing import NamedTuple

from . import errors
from .dictionary import FIXED_LENGTH, AvpDef, Dictionary, Grammar

HEADER = struct.Struct("!IIIII")  # version|length, flags|code, application, hop-by-hop, end-to-end
AVP_HEADER = struct.Struct("!II")
U32 = struct.Struct("!I")
U64 = struct.Struct("!Q")
I32 = struct.Struct("!i")
I64 = struct.Struct("!q")
F32 = struct.Struct("!f")
F64 = struct.Struct("!d")

# Header flags (RFC 6733 3)
FLAG_R = 0x80
FLAG_P = 0x40
FLAG_E = 0x20
FLAG_T = 0x10
HEADER_RESERVED = 0x0F
# AVP flags (RFC 6733 4.1)
AVP_V = 0x80
AVP_M = 0x40
AVP_P = 0x20
AVP_RESERVED = 0x1F

VERSION = 1
HEADER_LENGTH = 20
DEFAULT_MAX_MESSAGE = 65_535  # far above any ECR/CER; configurable per server
MAX_DEPTH = 8  # grouped nesting; deeper is refused rather than recursed into

# Indexes into a decoded AVP tuple.
CODE, VENDOR, FLAGS, VSTART, VEND, START, END, CHILDREN, DEF = range(9)
Avp = tuple  # (code, vendor, flags, value start, value end, start, padded end, children, AvpDef)


class Problem(NamedTuple):
    result_code: int
    failed_avp: bytes | None  # the AVP(s) to put inside Failed-AVP, already encoded
    message: str


class Message:
    """A decoded message. `data` is the whole message; AVP offsets index into it."""

    __slots__ = ("flags", "code", "application_id", "hop_by_hop", "end_to_end", "data", "avps",
                 "problems")

    def __init__(self, flags: int, code: int, application_id: int, hop_by_hop: int,
                 end_to_end: int, data: bytes, avps: list[Avp], problems: list[Problem]) -> None:
        self.flags = flags
        self.code = code
        self.application_id = application_id
        self.hop_by_hop = hop_by_hop
        self.end_to_end = end_to_end
        self.data = data
        self.avps = avps
        self.problems = problems

    @property
    def is_request(self) -> bool:
        return bool(self.flags & FLAG_R)

    def find(self, code: int, vendor: int = 0) -> Avp | None:
        for a in self.avps:
            if a[CODE] == code and a[VENDOR] == vendor:
                return a
        return None

    def find_all(self, code: int, vendor: int = 0) -> list[Avp]:
        return [a for a in self.avps if a[CODE] == code and a[VENDOR] == vendor]

    def raw(self, avp: Avp) -> bytes:
        """The AVP's bytes as received, padding included (for echoing Proxy-Info, Failed-AVP)."""
        return self.data[avp[START]:avp[END]]

    def value(self, avp: Avp) -> bytes:
        return self.data[avp[VSTART]:avp[VEND]]

    def u32(self, avp: Avp) -> int:
        return U32.unpack_from(self.data, avp[VSTART])[0]

    def text(self, avp: Avp) -> str:
        return self.data[avp[VSTART]:avp[VEND]].decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------
# Framing


class Framer:
    """Splits a TCP byte stream into messages by the header's Message-Length."""

    __slots__ = ("_buf", "max_length")

    def __init__(self, max_length: int = DEFAULT_MAX_MESSAGE) -> None:
        self._buf = b""
        self.max_length = max_length

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        n = len(buf)
        pos = 0
        out = []
        unpack = U32.unpack_from
        max_length = self.max_length
        while n - pos >= 4:
            word = unpack(buf, pos)[0]
            length = word & 0xFFFFFF
            if word >> 24 != VERSION:
                self._buf = b""
                raise errors.FramingError(f"unsupported Diameter version {word >> 24}")
            if length < HEADER_LENGTH or length > max_length:
                self._buf = b""
                raise errors.FramingError(f"unframeable message length {length}")
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


def encode_value(d: AvpDef, value: object) -> bytes:
    """Encode a Python value as the payload of AVP `d` (not used on the hot path)."""
    t = d.type
    if t in ("Unsigned32", "Time"):
        return U32.pack(int(value))  # type: ignore[call-overload]
    if t in ("Integer32", "Enumerated"):
        return I32.pack(int(value))  # type: ignore[call-overload]
    if t == "Unsigned64":
        return U64.pack(int(value))  # type: ignore[call-overload]
    if t == "Integer64":
        return I64.pack(int(value))  # type: ignore[call-overload]
    if t == "Float32":
        return F32.pack(float(value))  # type: ignore[arg-type]
    if t == "Float64":
        return F64.pack(float(value))  # type: ignore[arg-type]
    if t == "Address":
        return address_payload(str(value))
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"cannot encode {type(value).__name__} as {t} for {d.name}")


def encode_avp(d: AvpDef, value: object) -> bytes:
    """Encode AVP `d`; a Grouped value is a list of already encoded AVPs."""
    if d.grammar is not None:
        payload = b"".join(value)  # type: ignore[arg-type]
    else:
        payload = encode_value(d, value)
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


def _with_length(head: bytes, payload_len: int) -> bytes:
    """A copy of an AVP header with its length rewritten to match a zero-filled payload."""
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


def walk(data: bytes, start: int, end: int, dictionary: Dictionary, problems: list[Problem],
         depth: int = 0) -> list[Avp]:
    """Split data[start:end] into AVP tuples, recursing into known grouped AVPs."""
    out: list[Avp] = []
    defs = dictionary.avps
    unpack = AVP_HEADER.unpack_from
    pos = start
    while pos < end:
        if end - pos < 8:
            problems.append(Problem(errors.INVALID_AVP_LENGTH,
                                    _padded_header(data, pos, end, 8), "truncated AVP header"))
            break
        code, fl = unpack(data, pos)
        flags = fl >> 24
        length = fl & 0xFFFFFF
        if flags & AVP_V:
            if end - pos < 12 or length < 12:
                problems.append(Problem(errors.INVALID_AVP_LENGTH,
                                        _padded_header(data, pos, end, 12),
                                        f"AVP {code}: length {length} below its header"))
                break
            vendor = U32.unpack_from(data, pos + 8)[0]
            hlen = 12
        else:
            if length < 8:
                problems.append(Problem(errors.INVALID_AVP_LENGTH,
                                        _padded_header(data, pos, end, 8),
                                        f"AVP {code}: length {length} below its header"))
                break
            vendor = 0
            hlen = 8
        aend = pos + length
        d = defs.get((code, vendor))
        if aend > end:
            minimum = FIXED_LENGTH.get(d.type, 0) if d is not None else 0
            problems.append(Problem(errors.INVALID_AVP_LENGTH,
                                    _with_length(bytes(data[pos:pos + hlen]), minimum),
                                    f"AVP {code}: length {length} overruns its container"))
            break
        padded = (aend + 3) & ~3
        if padded > end:
            padded = end  # missing final padding: the message length check reports it
        children = None
        if d is not None:
            if d.grammar is not None:
                if depth >= MAX_DEPTH:
                    problems.append(Problem(errors.INVALID_AVP_VALUE, bytes(data[pos:padded]),
                                            f"{d.name}: grouped AVPs nested too deep"))
                else:
                    sub: list[Problem] = []
                    children = walk(data, pos + hlen, aend, dictionary, sub, depth + 1)
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
        out.append((code, vendor, flags, pos + hlen, aend, pos, padded, children, d))
        pos = padded
    return out


def _value_problem(data: bytes, a: Avp, d: AvpDef) -> str | None:
    """Cheap content checks for the types whose bytes can be invalid."""
    t = d.type
    if t == "UTF8String" or t == "DiameterURI":
        try:
            data[a[VSTART]:a[VEND]].decode("utf-8")
        except UnicodeDecodeError:
            return f"{d.name}: not valid UTF-8"
    elif t == "DiameterIdentity":
        v = data[a[VSTART]:a[VEND]]
        if not v or not v.isascii():
            return f"{d.name}: not a valid DiameterIdentity"
    elif t == "Enumerated":
        if d.enums and I32.unpack_from(data, a[VSTART])[0] not in d.enums:
            return f"{d.name}: unknown value {I32.unpack_from(data, a[VSTART])[0]}"
    elif t == "Address":
        n = a[VEND] - a[VSTART]
        if n < 2:
            return f"{d.name}: address too short"
        family = U32.unpack_from(b"\0\0" + data[a[VSTART]:a[VSTART] + 2])[0]
        if (family == 1 and n != 6) or (family == 2 and n != 18):
            return f"{d.name}: address length {n - 2} does not match family {family}"
    return None


def check(data: bytes, avps: list[Avp], grammar: Grammar, problems: list[Problem]) -> None:
    """Check AVPs against an ABNF grammar (RFC 6733 3.2), appending problems in order found."""
    rules = grammar.rules
    index = _index(grammar)
    counts = [0] * len(rules)
    any_avp = grammar.any_avp
    for i, a in enumerate(avps):
        flags = a[FLAGS]
        d = a[DEF]
        if flags & AVP_RESERVED:
            problems.append(Problem(errors.INVALID_AVP_BITS, data[a[START]:a[END]],
                                    f"AVP {a[CODE]}: reserved flag bits set"))
            continue
        if d is None:
            if flags & AVP_M:
                problems.append(Problem(errors.AVP_UNSUPPORTED, data[a[START]:a[END]],
                                        f"AVP {a[CODE]} (vendor {a[VENDOR]}) unknown, M bit set"))
            elif not any_avp:
                problems.append(Problem(errors.AVP_NOT_ALLOWED, data[a[START]:a[END]],
                                        f"AVP {a[CODE]} not allowed here"))
            continue
        if flags & AVP_M and d.mandatory == "mustnot":
            problems.append(Problem(errors.INVALID_AVP_BITS, data[a[START]:a[END]],
                                    f"{d.name}: M bit set, its definition forbids it"))
            continue
        j = index.get((a[CODE], a[VENDOR]))
        if j is None:
            if not any_avp:
                problems.append(Problem(errors.AVP_NOT_ALLOWED, data[a[START]:a[END]],
                                        f"{d.name} not allowed here"))
                continue
        else:
            rule = rules[j]
            c = counts[j] = counts[j] + 1
            if rule.max is not None and c == rule.max + 1:
                problems.append(Problem(errors.AVP_OCCURS_TOO_MANY_TIMES,
                                        data[a[START]:a[END]],
                                        f"{d.name} occurs more than {rule.max} time(s)"))
            if rule.first and i != 0:
                problems.append(Problem(errors.AVP_NOT_ALLOWED, data[a[START]:a[END]],
                                        f"{d.name} must be the first AVP"))
        children = a[CHILDREN]
        if children is not None:
            sub: list[Problem] = []
            check(data, children, d.grammar, sub)  # type: ignore[arg-type]
            if sub:
                parent = data[a[START]:a[VSTART]]
                problems.extend(Problem(p.result_code, _wrap(parent, p.failed_avp), p.message)
                                for p in sub)
        elif d.grammar is None and d.type in _CONTENT_CHECKED:
            msg = _value_problem(data, a, d)
            if msg is not None:
                problems.append(Problem(errors.INVALID_AVP_VALUE, data[a[START]:a[END]], msg))
    for j, rule in enumerate(rules):
        if counts[j] < rule.min:
            problems.append(Problem(errors.MISSING_AVP, _examples[rule.key],
                                    f"missing {rule.name}"))
    if grammar.any_min and len(avps) < grammar.any_min:
        problems.append(Problem(errors.MISSING_AVP, None,
                                f"at least {grammar.any_min} AVP(s) required"))


_CONTENT_CHECKED = frozenset({"UTF8String", "DiameterURI", "DiameterIdentity", "Enumerated",
                              "Address"})
_INDEXES: dict[int, dict] = {}
_examples: dict = {}
_prepared: set[int] = set()


def _index(grammar: Grammar) -> dict:
    ix = _INDEXES.get(id(grammar))
    if ix is None:
        ix = _INDEXES[id(grammar)] = dict(grammar.index())
    return ix


def prepare(dictionary: Dictionary) -> None:
    """Precompute per-dictionary tables (grammar indexes, 5005 examples). Idempotent."""
    for d in dictionary.avps.values():
        _examples[(d.code, d.vendor)] = example_avp(d)
        if d.grammar is not None:
            _index(d.grammar)
    for c in dictionary.commands.values():
        for g in (c.request, c.answer):
            if g is not None:
                _index(g)
    _prepared.add(id(dictionary))


def decode(data: bytes, dictionary: Dictionary) -> Message:
    """Decode one framed message; problems found while walking go to `Message.problems`.

    Header problems come first: invalid header bits (3008) and a length that is not a multiple of
    four or that the AVPs do not fill exactly (5015).
    """
    if id(dictionary) not in _prepared:
        prepare(dictionary)
    vl, fc, app, hbh, e2e = HEADER.unpack_from(data, 0)
    flags = fc >> 24
    problems: list[Problem] = []
    length = vl & 0xFFFFFF
    if flags & HEADER_RESERVED or (flags & FLAG_R and flags & FLAG_E):
        problems.append(Problem(errors.INVALID_HDR_BITS, None, "invalid header flag bits"))
    if length % 4:
        problems.append(Problem(errors.INVALID_MESSAGE_LENGTH, None,
                                f"message length {length} not a multiple of 4"))
    avps = walk(data, HEADER_LENGTH, length, dictionary, problems)
    return Message(flags, fc & 0xFFFFFF, app, hbh, e2e, data, avps, problems)


def validate(msg: Message, grammar: Grammar) -> None:
    """Check a decoded message against its command grammar, appending to `msg.problems`."""
    check(msg.data, msg.avps, grammar, msg.problems)


def to_dict(msg: Message, dictionary: Dictionary) -> list[tuple[str, object]]:
    """A readable view of the AVPs (for logs, tests and the CLI; not for the hot path)."""

    def conv(avps: list[Avp]) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        for a in avps:
            d = a[DEF]
            name = d.name if d is not None else f"AVP-{a[CODE]}-{a[VENDOR]}"
            if a[CHILDREN] is not None:
                out.append((name, conv(a[CHILDREN])))
            else:
                try:
                    out.append((name, decode_value(d, msg.data[a[VSTART]:a[VEND]])))
                except (struct.error, UnicodeDecodeError, ValueError):
                    out.append((name, msg.data[a[VSTART]:a[VEND]]))
        return out

    return conv(msg.avps)

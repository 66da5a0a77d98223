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
                 "problems", "slots")

    def __init__(self, flags: int, code: int, application_id: int, hop_by_hop: int,
                 end_to_end: int, data: bytes, avps: list[Avp], problems: list[Problem],
                 slots: list | None = None) -> None:
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
            if a[CODE] == code and a[VENDOR] == vendor:
                return a
        return None

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
        out = []
        unpack = U32.unpack_from
        max_length = self.max_length
        while n - pos >= 4:
            word = unpack(buf, pos)[0]
            length = word & 0xFFFFFF
            if word >> 24 != VERSION:
                self.error = f"unsupported Diameter version {word >> 24}"
            elif length < HEADER_LENGTH or length > max_length:
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
    _, index, examples = _grammar_info(grammar)
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
            problems.append(Problem(errors.MISSING_AVP, examples[j], f"missing {rule.name}"))
    if grammar.any_min and len(avps) < grammar.any_min:
        problems.append(Problem(errors.MISSING_AVP, None,
                                f"at least {grammar.any_min} AVP(s) required"))


_CONTENT_CHECKED = frozenset({"UTF8String", "DiameterURI", "DiameterIdentity", "Enumerated",
                              "Address"})
# Per-grammar tables, keyed by id() for speed. Each entry holds the object it was computed for,
# so that object stays alive and an id can never be reused by another grammar or dictionary.
_GRAMMARS: dict[int, tuple[Grammar, dict, tuple[bytes | None, ...]]] = {}
_PREPARED: dict[int, Dictionary] = {}


def _grammar_info(grammar: Grammar) -> tuple[Grammar, dict, tuple[bytes | None, ...]]:
    """(grammar, rule index by AVP key, 5005 example AVP per rule)."""
    info = _GRAMMARS.get(id(grammar))
    if info is None or info[0] is not grammar:
        # Not from a prepared dictionary: index it; without AVP definitions a missing AVP is
        # reported without an example.
        info = _GRAMMARS[id(grammar)] = (grammar, dict(grammar.index()),
                                         (None,) * len(grammar.rules))
    return info


def prepare(dictionary: Dictionary) -> None:
    """Precompute per-dictionary tables (grammar indexes, 5005 examples). Idempotent."""
    if _PREPARED.get(id(dictionary)) is dictionary:
        return
    grammars = [d.grammar for d in dictionary.avps.values() if d.grammar is not None]
    grammars += [g for c in dictionary.commands.values() for g in (c.request, c.answer)
                 if g is not None]
    for g in grammars:
        examples = tuple(example_avp(dictionary.avps[r.key]) for r in g.rules)
        _GRAMMARS[id(g)] = (g, dict(g.index()), examples)
    _PREPARED[id(dictionary)] = dictionary


# ---------------------------------------------------------------------------------------------
# Fast path: validate-or-bail


_KIND_NONE, _KIND_UTF8, _KIND_IDENT, _KIND_ENUM, _KIND_ADDRESS = range(5)
_KINDS = {"UTF8String": _KIND_UTF8, "DiameterURI": _KIND_UTF8, "DiameterIdentity": _KIND_IDENT,
          "Enumerated": _KIND_ENUM, "Address": _KIND_ADDRESS}


class FastGrammar:
    """A grammar compiled for `decode_fast`: one dict lookup per AVP keyed by an int."""

    __slots__ = ("table", "nslots", "required", "any_avp", "any_min", "first_slot", "grammar",
                 "simple_mins")

    def __init__(self, dictionary: Dictionary, grammar: Grammar,
                 memo: dict[int, FastGrammar] | None = None) -> None:
        memo = {} if memo is None else memo
        memo[id(grammar)] = self
        self.grammar = grammar
        index = grammar.index()
        rules = grammar.rules
        self.nslots = len(rules)
        # Rules with min >= 1, as (slot, min); when every min is 1, counting first sightings
        # of required slots is enough (`simple_mins`).
        self.required = tuple((i, r.min) for i, r in enumerate(rules) if r.min)
        self.simple_mins = all(m == 1 for _, m in self.required)
        self.any_avp = grammar.any_avp
        self.any_min = grammar.any_min
        self.first_slot = next((i for i, r in enumerate(rules) if r.first), -1)
        table: dict[int, tuple] = {}
        for key, d in dictionary.avps.items():
            slot = index.get(key, -1)
            if slot < 0 and not grammar.any_avp:
                continue  # not allowed here: a lookup miss makes the fast path bail
            bad = AVP_RESERVED | (AVP_M if d.mandatory == "mustnot" else 0)
            child = None
            if d.grammar is not None:
                child = memo.get(id(d.grammar)) or FastGrammar(dictionary, d.grammar, memo)
            enums = frozenset(d.enums) if d.enums else None
            rule = rules[slot] if slot >= 0 else None
            maxc = (rule.max if rule.max is not None else 1 << 30) if rule else 1 << 30
            table[key[0] | (key[1] << 32)] = (
                slot, bad, FIXED_LENGTH.get(d.type, 0), _KINDS.get(d.type, _KIND_NONE), enums,
                child, d, maxc, bool(rule and rule.min))
        self.table = table


def decode_fast(data: bytes, fg: FastGrammar, start: int, end: int,
                slots: list | None = None, depth: int = 0) -> list[Avp] | None:
    """Walk and check AVPs in one pass. Returns None at the first thing that is not plainly
    valid (or not ASCII, where UTF-8 needs a closer look); the caller then runs `decode` +
    `validate`, which say exactly what is wrong. So the fast path never has to produce a
    diagnosis, and what it accepts the general path accepts too (a property test checks it)."""
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
            append((code, vendor, flags, vs, aend, pos, padded, None, None))
            pos = padded
            continue
        slot, bad, fixed, kind, enums, child, d, maxc, required = ent
        if flags & bad or (fixed and aend - vs != fixed):
            return None
        if slot >= 0:
            c = counts[slot] + 1
            if c > maxc or (slot == first_slot and out):
                return None
            counts[slot] = c
            if required and c == 1:
                found += 1
        if kind:
            if kind <= _KIND_IDENT:
                # UTF8String and DiameterIdentity: ASCII is plainly valid; anything else goes to
                # the general path (UTF-8 there, or 5004 for a non-ASCII identity).
                if not data[vs:aend].isascii() or (kind == _KIND_IDENT and aend == vs):
                    return None
            elif kind == _KIND_ENUM:
                if enums is not None and I32.unpack_from(data, vs)[0] not in enums:
                    return None
            else:
                n = aend - vs
                if n < 2:
                    return None
                family = data[vs] << 8 | data[vs + 1]
                if (family == 1 and n != 6) or (family == 2 and n != 18):
                    return None
        if child is not None:
            if depth >= MAX_DEPTH:
                return None
            children = decode_fast(data, child, vs, aend, None, depth + 1)
            if children is None:
                return None
            t = (code, vendor, flags, vs, aend, pos, padded, children, d)
        else:
            t = (code, vendor, flags, vs, aend, pos, padded, None, d)
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
    return out


class Layout:
    """The shape of a message that `decode_fast` accepted: where every AVP header sits and
    what it says. Consecutive requests from one peer mostly share a shape (only values change),
    so a later message with the same header words at the same offsets has the same AVP tuples
    and the same verdict on everything but values; `match` re-checks those values (ASCII text,
    enumerations) with two C-level struct reads instead of a Python loop over AVPs."""

    __slots__ = ("headers", "header_struct", "text_struct", "enum_checks", "avps", "slots")

    def __init__(self, data: bytes, avps: list[Avp], slots: list | None) -> None:
        fmt_h = ["!"]
        fmt_t = ["!"]
        self.enum_checks: list[tuple[int, frozenset[int]]] = []
        pos_h = pos_t = 0
        for a in _flatten(avps):
            start, vs, aend, d = a[START], a[VSTART], a[VEND], a[DEF]
            fmt_h.append(f"{start - pos_h}x{'III' if a[FLAGS] & AVP_V else 'II'}")
            pos_h = vs
            if d is None or a[CHILDREN] is not None:
                continue
            kind = _KINDS.get(d.type, _KIND_NONE)
            if kind in (_KIND_UTF8, _KIND_IDENT):
                fmt_t.append(f"{vs - pos_t}x{aend - vs}s")
                pos_t = aend
            elif kind == _KIND_ENUM and d.enums:
                self.enum_checks.append((vs, frozenset(d.enums)))
            elif kind == _KIND_ADDRESS:
                raise ValueError("layouts with Address AVPs are not cached")
        self.header_struct = struct.Struct("".join(fmt_h))
        self.headers = self.header_struct.unpack_from(data, 0)
        self.text_struct = struct.Struct("".join(fmt_t))
        self.avps = avps
        self.slots = slots

    def match(self, data: bytes) -> bool:
        if self.header_struct.unpack_from(data, 0) != self.headers:
            return False
        if not b"".join(self.text_struct.unpack_from(data, 0)).isascii():
            return False
        for off, allowed in self.enum_checks:
            if I32.unpack_from(data, off)[0] not in allowed:
                return False
        return True


def _flatten(avps: list[Avp]) -> list[Avp]:
    out = []
    for a in avps:
        out.append(a)
        if a[CHILDREN]:
            out.extend(_flatten(a[CHILDREN]))
    return out


class LayoutCache:
    """Layouts keyed by message length and the first AVP's header word (for a request that is
    Session-Id's flags and length, which is what varies most between shapes of equal size);
    bounded: a peer sending endlessly new shapes just stops being cached (it still gets
    `decode_fast`)."""

    __slots__ = ("_by_key", "_count", "max_layouts")

    def __init__(self, max_layouts: int = 1024) -> None:
        self._by_key: dict[int, list[Layout]] = {}
        self._count = 0
        self.max_layouts = max_layouts

    def find(self, data: bytes, length: int) -> Layout | None:
        if length < 28:
            return None
        candidates = self._by_key.get((length << 32) | U32.unpack_from(data, 24)[0])
        if candidates:
            for lay in candidates:
                if lay.match(data):
                    return lay
        return None

    def learn(self, data: bytes, length: int, avps: list[Avp], slots: list | None) -> None:
        if self._count >= self.max_layouts or length < 28:
            return
        try:
            lay = Layout(data, avps, slots)
        except (ValueError, struct.error):
            return
        key = (length << 32) | U32.unpack_from(data, 24)[0]
        self._by_key.setdefault(key, []).append(lay)
        self._count += 1


def decode(data: bytes, dictionary: Dictionary) -> Message:
    """Decode one framed message; problems found while walking go to `Message.problems`.

    Header problems come first: invalid header bits (3008) and a length that is not a multiple of
    four or that the AVPs do not fill exactly (5015).
    """
    if _PREPARED.get(id(dictionary)) is not dictionary:
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
    """Check a decoded message against its command grammar, appending to `msg.problems`;
    when it is valid, index its AVPs by grammar rule in `msg.slots`."""
    check(msg.data, msg.avps, grammar, msg.problems)
    if not msg.problems:
        index = _grammar_info(grammar)[1]
        slots: list = [None] * len(grammar.rules)
        for a in msg.avps:
            i = index.get((a[CODE], a[VENDOR]))
            if i is not None:
                slots[i] = a
        msg.slots = slots


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

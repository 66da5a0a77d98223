"""Pure S13 client side of the generator: pre-encoded requests and strict answer checks.

Requests are assembled from pre-encoded parts (header, Session-Id with a per-request sequence
number, fixed AVPs, one pre-encoded Terminal-Information/User-Name block per IMEI), so sending
costs a struct pack and a join. Answers are checked strictly but cheaply: framing, flags,
command, Application-Id, hop-by-hop and end-to-end echo and the Session-Id (first AVP, RFC 6733
8.8) on every answer; the rest of the answer's bytes is then looked up in a cache of bodies
already seen, and a body not seen before is walked AVP by AVP, decoded with the dictionary and
validated against the ECA grammar (or, with the E bit, checked for a Result-Code). Identical
bytes give identical verdicts, so every answer is checked as strictly as the first.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..diameter.codec import (
    FLAG_E,
    FLAG_P,
    FLAG_R,
    address_payload,
    avp,
    decode,
    grouped_avp,
    message,
    str_avp,
    u32_avp,
    validate,
)
from ..diameter.dictionary import Dictionary
from .imeis import ImeiEntry

S13_APP = 16777252
TGPP = 10415
ECR = 324
CER, DWR, DPR = 257, 280, 282
HDR = struct.Struct("!IIIII")
U32 = struct.Struct("!I")
AVP_HDR = struct.Struct("!II")
VERSION_WORD = 1 << 24
BODY_CACHE_MAX = 200_000

# Answer classes: what `AnswerChecker.body` returns besides a value.
OK, MALFORMED = 0, 1


@dataclass(frozen=True)
class Identity:
    origin_host: str
    origin_realm: str
    destination_realm: str
    destination_host: str | None = None
    host_ip: str = "127.0.0.1"


def cer(me: Identity, hbh: int = 1) -> bytes:
    return message(FLAG_R, CER, 0, hbh, hbh, [
        str_avp(264, me.origin_host), str_avp(296, me.origin_realm),
        avp(257, address_payload(me.host_ip)), u32_avp(266, TGPP),
        str_avp(269, "eir-server load", mandatory=False),
        u32_avp(258, S13_APP),
        grouped_avp(260, [u32_avp(266, TGPP), u32_avp(258, S13_APP)]),
    ])  # fmt: skip


def dwr(me: Identity, hbh: int) -> bytes:
    return message(FLAG_R, DWR, 0, hbh, hbh, [str_avp(264, me.origin_host),
                                              str_avp(296, me.origin_realm)])


def dwa(me: Identity, hbh: int, e2e: int) -> bytes:
    return message(0, DWR, 0, hbh, e2e, [u32_avp(268, 2001), str_avp(264, me.origin_host),
                                         str_avp(296, me.origin_realm)])


def dpr(me: Identity, hbh: int) -> bytes:
    # Disconnect-Cause DO_NOT_WANT_TO_TALK_TO_YOU (2): the run is over, do not expect us back.
    return message(FLAG_R, DPR, 0, hbh, hbh, [str_avp(264, me.origin_host),
                                              str_avp(296, me.origin_realm), u32_avp(273, 2)])


def dpa(me: Identity, hbh: int, e2e: int) -> bytes:
    return message(0, DPR, 0, hbh, e2e, [u32_avp(268, 2001), str_avp(264, me.origin_host),
                                         str_avp(296, me.origin_realm)])


def imsi_for(imei: str) -> str:
    return "00101" + imei[4:14]  # one subscriber per device, as in real traffic


def entry_block(e: ImeiEntry) -> bytes:
    """Terminal-Information {IMEI, Software-Version} and User-Name of one request."""
    return grouped_avp(1401, [str_avp(1402, e.imei, TGPP), str_avp(1403, e.sv or "01", TGPP)],
                       TGPP) + str_avp(1, e.imsi or imsi_for(e.imei))


class EcrTemplates:
    """ECRs of one connection: `request(i, hbh, e2e)` is entry i's ECR with a fresh hop-by-hop,
    end-to-end and Session-Id `<origin-host>;<conn>;<hbh as 10 digits>`."""

    def __init__(self, me: Identity, conn: int, blocks: list[bytes]) -> None:
        prefix = f"{me.origin_host};{conn};".encode()
        sid_len = 8 + len(prefix) + 10
        self.sid_head = AVP_HDR.pack(263, 0x40 << 24 | sid_len) + prefix
        self.sid_pad = b"\0" * (-sid_len % 4)
        self.sid_total = sid_len + len(self.sid_pad)
        fixed = [u32_avp(277, 1), str_avp(264, me.origin_host), str_avp(296, me.origin_realm)]
        if me.destination_host:
            fixed.append(str_avp(293, me.destination_host))
        fixed.append(str_avp(283, me.destination_realm))
        fixed.append(grouped_avp(260, [u32_avp(266, TGPP), u32_avp(258, S13_APP)]))
        self.fixed = self.sid_pad + b"".join(fixed)
        base = 20 + sid_len + len(self.fixed)
        self.blocks = blocks
        self.words = [VERSION_WORD | (base + len(b)) for b in blocks]
        self.flags_code = (FLAG_R | FLAG_P) << 24 | ECR

    def sid(self, hbh: int) -> bytes:
        """The Session-Id AVP (padding included) the answer to `hbh` must start with."""
        return self.sid_head + b"%010d" % hbh + self.sid_pad

    def request(self, i: int, hbh: int, e2e: int) -> bytes:
        return b"".join((HDR.pack(self.words[i], self.flags_code, S13_APP, hbh, e2e),
                         self.sid_head, b"%010d" % hbh, self.fixed, self.blocks[i]))


def walk(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(code, vendor, value start, value end) of each AVP in data[start:end]; ValueError for
    anything that does not frame exactly (RFC 6733 4.1: lengths, padding, V-bit header)."""
    out = []
    pos = start
    while pos < end:
        if end - pos < 8:
            raise ValueError(f"{end - pos} stray bytes after the last AVP")
        code, fl = AVP_HDR.unpack_from(data, pos)
        length = fl & 0xFFFFFF
        vendor = 0
        hlen = 8
        if fl >> 24 & 0x80:
            if length < 12 or end - pos < 12:
                raise ValueError(f"AVP {code}: V bit but no Vendor-Id")
            vendor = U32.unpack_from(data, pos + 8)[0]
            hlen = 12
        if length < hlen or pos + length > end:
            raise ValueError(f"AVP {code}: length {length} does not fit")
        out.append((code, vendor, pos + hlen, pos + length))
        pos += (length + 3) & ~3
    if pos != end:
        raise ValueError("AVP padding runs past the message end")
    return out


class AnswerChecker:
    """Classifies ECA bodies: value is the Equipment-Status (0, 1, 2) of a 2001 answer, else the
    Result-Code or Experimental-Result-Code; -2 when the answer is malformed."""

    def __init__(self, dictionary: Dictionary) -> None:
        self.dictionary = dictionary
        grammar = dictionary.compiled.answer(S13_APP, ECR)
        assert grammar is not None
        self.grammar = grammar
        self.cache: dict[bytes, tuple[int, int, int, str]] = {}
        self.problems: dict[str, int] = {}

    def classify(self, msg: bytes) -> tuple[int, int, int, str]:
        """(value, result code, experimental code, problem) of one whole ECA, uncached."""
        vl, fc, _app, _hbh, _e2e = HDR.unpack_from(msg, 0)
        flags = fc >> 24
        try:
            if (vl & 0xFFFFFF) % 4:
                raise ValueError("message length not a multiple of 4")
            avps = walk(msg, 20, len(msg))
            rc = exp = -1
            status = -1
            for code, vendor, s, e in avps:
                if code == 268 and vendor == 0 and e - s == 4:
                    rc = U32.unpack_from(msg, s)[0]
                elif code == 297 and vendor == 0:
                    for c2, v2, s2, e2 in walk(msg, s, e):
                        if c2 == 298 and v2 == 0 and e2 - s2 == 4:
                            exp = U32.unpack_from(msg, s2)[0]
                elif code == 1445 and vendor == TGPP and e - s == 4:
                    status = U32.unpack_from(msg, s)[0]
            if (rc < 0) == (exp < 0):
                raise ValueError("not exactly one of Result-Code and Experimental-Result")
            m = decode(msg, self.dictionary)
            if not flags & FLAG_E:
                validate(m, self.grammar)
            elif rc < 3000 or rc >= 4000:
                raise ValueError(f"E bit with Result-Code {rc} (RFC 6733 7.1.3: protocol errors)")
            if m.problems:
                raise ValueError(m.problems[0].message)
            if rc == 2001:
                if status not in (0, 1, 2):
                    raise ValueError(f"2001 without a valid Equipment-Status ({status})")
                return status, rc, exp, ""
            return (exp if exp >= 0 else rc), rc, exp, ""
        except ValueError as e:
            return -2, -1, -1, str(e)

    def body(self, msg: bytes, sid_total: int) -> tuple[int, int, int, str]:
        """`classify` of a message, cached by its bytes after the Session-Id."""
        key = msg[20 + sid_total:]
        r = self.cache.get(key)
        if r is None:
            r = self.classify(msg)
            if len(self.cache) < BODY_CACHE_MAX:
                self.cache[key] = r
        return r

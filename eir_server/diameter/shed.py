"""3004 DIAMETER_TOO_BUSY from a request's raw bytes, for shedding under overload: a fraction of
what a check costs, because nothing is decoded or validated.

RFC 6733 7.2 answer-message with the E bit: the request's Session-Id (it is the first AVP in
every command that has one), our Origin-Host and Origin-Realm, Result-Code 3004, DOIC AVPs for a
peer that asked for them (RFC 7683: every answer carries the current report), and every
Proxy-Info of the request in order (6.7.3). Proxy-Info is searched as bytes first (C speed);
only a request where the four code bytes occur anywhere gets its AVP headers walked.
"""

from __future__ import annotations

from .answers import PROXY_INFO, RESULT_CODE, SESSION_ID, Identity
from .codec import FLAG_E, FLAG_P, U32, VERSION, u32_avp
from .errors import TOO_BUSY

_PROXY_CODE = PROXY_INFO.to_bytes(4, "big")
_SESSION_CODE = SESSION_ID.to_bytes(4, "big")
_AVP = U32.unpack_from
_VERSION_LENGTH = U32.pack
_FLAGS = {0: bytes((FLAG_E,)), FLAG_P: bytes((FLAG_P | FLAG_E,))}


BASE_APP = b"\0\0\0\0"  # Application-Id 0: base protocol requests are never shed
_MAX_HEADS = 4096


class BusyAnswer:
    __slots__ = ("_body", "_heads")

    def __init__(self, identity: Identity) -> None:
        self._body = identity.host_origin + u32_avp(RESULT_CODE, TOO_BUSY)
        # (answer length << 1 | P bit) -> the answer's first five bytes (version, length,
        # flags): one dict probe per answer instead of a pack and a concatenation.
        self._heads: dict[int, bytes] = {}

    def answer_run(self, msgs: list[bytes], start: int, stop: int, doic: bytes,
                   out: list[bytes]) -> int:
        """3004 answers to the run of application requests msgs[start:i] (i <= stop), appended
        to `out`; returns i. The run ends before the first message that is not an application
        request (an answer, a base-protocol request: the caller handles it in order). While a
        storm is shed this loop runs for most of what arrives, so the common request (Session-Id
        first, no Proxy-Info) costs one slice and a dict probe: the request's header tail and
        Session-Id are contiguous, so they are copied as one piece."""
        tail = self._body + doic
        size = len(tail)
        heads = self._heads
        append = out.append
        proxy = _PROXY_CODE
        session_code = _SESSION_CODE
        i = start
        while i < stop:
            raw = msgs[i]
            if not raw[4] & 0x80 or raw[8:12] == BASE_APP:
                break
            i += 1
            n = len(raw)
            if raw[20:24] == session_code and n >= 28 and not raw[24] & 0x80 \
                    and raw.find(proxy, 28) < 0:
                length = _AVP(raw, 24)[0] & 0xFFFFFF
                end = (23 + length) & ~3  # the padded end of the Session-Id AVP
                if length >= 8 and end <= n:
                    key = (end + size) << 1 | (raw[4] & FLAG_P) >> 6
                    head = heads.get(key)
                    if head is None:
                        if len(heads) >= _MAX_HEADS:
                            heads.clear()
                        head = heads[key] = _VERSION_LENGTH((VERSION << 24) | (end + size)) \
                            + _FLAGS[raw[4] & FLAG_P]
                    append(head)
                    append(raw[5:end])
                    append(tail)
                    continue
            append(self.answer(raw, doic))
        return i

    def answer(self, raw: bytes, doic: bytes = b"") -> bytes:
        """The 3004 answer to the framed request `raw` (length already checked by framing);
        `doic`: OC-Supported-Features + OC-OLR bytes for a DOIC peer. Runs once per shed
        request, so it stays a handful of C-level operations: its cost against a full check's
        bounds how much of a storm a worker can still answer with verdicts."""
        n = len(raw)
        session = b""
        if raw[20:24] == _SESSION_CODE and n >= 28 and not raw[24] & 0x80:
            end = 20 + (_AVP(raw, 24)[0] & 0xFFFFFF)
            if end <= n:
                padded = (end + 3) & ~3
                session = raw[20:padded if padded <= n else end]
        proxies = _proxy_infos(raw, n) if raw.find(_PROXY_CODE, 20) >= 0 else b""
        body = self._body
        # The request's header with the R bit cleared and E set; command, application and
        # both identifiers unchanged.
        return b"".join((
            _VERSION_LENGTH((VERSION << 24)
                            | (20 + len(session) + len(body) + len(doic) + len(proxies))),
            _FLAGS[raw[4] & FLAG_P], raw[5:20], session, body, doic, proxies))


def _proxy_infos(raw: bytes, n: int) -> bytes:
    """Top-level Proxy-Info AVPs in order; stops quietly at a malformed AVP header."""
    out = []
    pos = 20
    while n - pos >= 8:
        code, fl = _AVP(raw, pos)[0], _AVP(raw, pos + 4)[0]
        length = fl & 0xFFFFFF
        if length < 8:
            break
        end = pos + length
        padded = (end + 3) & ~3
        if end > n:
            break
        if code == PROXY_INFO and not fl & 0x80000000:
            out.append(raw[pos:min(padded, n)])
        pos = padded
    return b"".join(out)

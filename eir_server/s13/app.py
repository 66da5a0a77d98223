"""S13 ME-Identity-Check (TS 29.272 5.3, 7.2.19/7.2.20): ECR in, ECA out. Pure code.

The connection has already checked the ECR against its grammar and the routing AVPs, so this
module reads the identities (for `handler.S13Handler`, which runs the flow) and builds the ECA
from pre-encoded pieces: the request's Session-Id, DRMP and Proxy-Info bytes are copied as received,
everything of ours is encoded once at start.
"""

from __future__ import annotations

from typing import Final

from ..diameter import errors
from ..diameter.answers import (
    AUTH_SESSION_STATE,
    NO_STATE_MAINTAINED,
    PROXY_INFO,
    RESULT_CODE,
    Identity,
    error_answer,
    frame,
)
from ..diameter.codec import (
    CHILDREN,
    CODE,
    END,
    START,
    VEND,
    VENDOR,
    VSTART,
    Message,
    Problem,
    avp,
    grouped_avp,
    u32_avp,
)
from ..diameter.dictionary import Dictionary
from ..policy.types import CheckRequest, EquipmentStatus

APPLICATION_ID: Final = 16777252
COMMAND_CODE: Final = 324
VENDOR_3GPP: Final = 10415
TERMINAL_INFORMATION: Final = 1401
IMEI: Final = 1402
SOFTWARE_VERSION: Final = 1403
EQUIPMENT_STATUS: Final = 1445
USER_NAME: Final = 1
DRMP: Final = 301
OC_SUPPORTED_FEATURES: Final = 621
OC_FEATURE_VECTOR: Final = 622
OLR_DEFAULT_ALGO: Final = 1
VENDOR_ID: Final = 266
AUTH_APPLICATION_ID: Final = 258
VENDOR_SPECIFIC_APPLICATION_ID: Final = 260
EXPERIMENTAL_RESULT: Final = 297
EXPERIMENTAL_RESULT_CODE: Final = 298

_VSAI: Final = grouped_avp(VENDOR_SPECIFIC_APPLICATION_ID,
                    [u32_avp(VENDOR_ID, VENDOR_3GPP), u32_avp(AUTH_APPLICATION_ID, APPLICATION_ID)])
_AUTH_SESSION_STATE: Final = u32_avp(AUTH_SESSION_STATE, NO_STATE_MAINTAINED)
# RFC 7683 5.2: a reporting node answers a DOIC request with the algorithm it selected.
_OC_SUPPORTED: Final = grouped_avp(OC_SUPPORTED_FEATURES,
                            [avp(OC_FEATURE_VECTOR, OLR_DEFAULT_ALGO.to_bytes(8, "big"),
                                 mandatory=False)], mandatory=False)
_MISSING_IMEI: Final = avp(TERMINAL_INFORMATION,
                    avp(IMEI, b"", VENDOR_3GPP), VENDOR_3GPP)


# CheckRequest(...) runs the NamedTuple's Python-level __new__; this is the C one (all four
# fields must be given).
_new_request: Final = tuple.__new__

# What `EcaBuilder.parse` reads from a valid ECR: (request, answer prefix: Session-Id, DRMP,
# Vendor-Specific-Application-Id; answer suffix: OC-Supported-Features, every Proxy-Info;
# Origin-Host value, which keys duplicate detection). A plain tuple: one is built per request,
# and a NamedTuple's constructor costs a Python call.
Parsed = tuple[CheckRequest, bytes, bytes, bytes]


class EcaBuilder:
    """Turns (ECR, verdict) into ECA bytes from templates fixed at start."""

    __slots__ = ("identity", "_verdict_parts", "_unknown_part", "_auth_and_host", "_slots",
                 "doic")

    def __init__(self, identity: Identity, dictionary: Dictionary) -> None:
        self.identity = identity
        cmd = dictionary.command(APPLICATION_ID, COMMAND_CODE)
        if cmd is None or cmd.request is None:
            raise ValueError("the dictionary has no S13 ME-Identity-Check-Request")
        index = {r.name: i for i, r in enumerate(cmd.request.rules)}
        # Grammar rule indexes of the AVPs parse() reads, resolved once.
        self._slots = tuple(index[n] for n in (
            "Terminal-Information", "User-Name", "Session-Id", "DRMP", "OC-Supported-Features",
            "Proxy-Info", "Origin-Host"))
        # What every answer to a DOIC peer carries (RFC 7683): our OC-Supported-Features and,
        # while we report overload, the OC-OLR. The shell replaces it when the report changes.
        self.doic = _OC_SUPPORTED
        host = identity.host_origin
        self._auth_and_host = _AUTH_SESSION_STATE + host
        # TS 29.272 7.2.20 order: Result-Code, Auth-Session-State, Origin-*, Equipment-Status.
        self._verdict_parts: dict[int, bytes] = {
            s: u32_avp(RESULT_CODE, errors.SUCCESS) + self._auth_and_host
            + u32_avp(EQUIPMENT_STATUS, int(s), VENDOR_3GPP)
            for s in EquipmentStatus
        }
        # Unknown equipment: Experimental-Result 5422 and no Result-Code (TS 29.272 5.3.2.1).
        self._unknown_part = grouped_avp(
            EXPERIMENTAL_RESULT,
            [u32_avp(VENDOR_ID, VENDOR_3GPP),
             u32_avp(EXPERIMENTAL_RESULT_CODE, errors.EQUIPMENT_UNKNOWN)],
        ) + self._auth_and_host

    def parse(self, msg: Message) -> Parsed | bytes:
        """Read a validated ECR, or return a finished error ECA (5005: no IMEI)."""
        data = msg.data
        slots = msg.slots
        if slots is None:
            raise ValueError("ECR must be validated before parse")
        ti, un, sid, drmp, ocs, pi, oh = self._slots
        terminal, session, origin = slots[ti], slots[sid], slots[oh]
        if terminal is None or session is None or origin is None:
            raise ValueError("ECR must be validated before parse")  # its grammar requires them
        imei = sv = None
        for c in terminal[CHILDREN] or ():
            if c[VENDOR] == VENDOR_3GPP:
                if c[CODE] == IMEI:
                    imei = data[c[VSTART]:c[VEND]].decode()
                elif c[CODE] == SOFTWARE_VERSION:
                    sv = data[c[VSTART]:c[VEND]].decode()
        if imei is None:
            return error_answer(msg, Problem(errors.MISSING_AVP, _MISSING_IMEI,
                                             "Terminal-Information without IMEI"),
                                self.identity, _AUTH_SESSION_STATE,
                                self.doic if slots[ocs] is not None else b"")
        a = slots[un]
        imsi = data[a[VSTART]:a[VEND]].decode() if a is not None else None
        prefix = data[session[START]:session[END]]
        a = slots[drmp]
        if a is not None:
            prefix += data[a[START]:a[END]]
        suffix = self.doic if slots[ocs] is not None else b""
        if slots[pi] is not None:  # every one of them, in order (RFC 6733 6.7.3)
            suffix += b"".join(data[p[START]:p[END]] for p in msg.avps
                               if p[CODE] == PROXY_INFO and not p[VENDOR])
        return (_new_request(CheckRequest, (imei, sv, imsi, None)), prefix + _VSAI, suffix,
                data[origin[VSTART]:origin[VEND]])

    def answer(self, msg: Message, prefix: bytes, suffix: bytes, status: int | None) -> bytes:
        """The ECA for an Equipment-Status (an EquipmentStatus or its int value; None for
        unknown equipment, answered with Experimental-Result 5422)."""
        part = self._unknown_part if status is None else self._verdict_parts[status]
        return frame(msg, prefix + part + suffix)

    def failure(self, msg: Message, result_code: int, reason: str) -> bytes:
        """An ECA for a failure of ours (e.g. 3004 when overloaded, 5012 unable to comply)."""
        return error_answer(msg, Problem(result_code, None, reason), self.identity,
                            _AUTH_SESSION_STATE, self.doic if self.wants_doic(msg) else b"")

    def wants_doic(self, msg: Message) -> bool:
        """The request carries OC-Supported-Features: its sender is a DOIC reacting node."""
        if msg.slots is not None:
            return msg.slots[self._slots[4]] is not None
        return msg.find(OC_SUPPORTED_FEATURES) is not None


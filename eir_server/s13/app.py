"""S13 ME-Identity-Check (TS 29.272 5.3, 7.2.19/7.2.20): ECR in, ECA out. Pure code.

The connection has already checked the ECR against its grammar and the routing AVPs, so this
module reads the identities, hands them to the policy (through the shell) and builds the ECA from
pre-encoded pieces: the request's Session-Id, DRMP and Proxy-Info bytes are copied as received,
everything of ours is encoded once at start.
"""

from __future__ import annotations

from ..diameter import errors
from ..diameter.answers import (
    AUTH_SESSION_STATE,
    NO_STATE_MAINTAINED,
    ORIGIN_HOST,
    PROXY_INFO,
    RESULT_CODE,
    SESSION_ID,
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
from ..policy.types import CheckRequest, EquipmentStatus, Verdict

APPLICATION_ID = 16777252
COMMAND_CODE = 324
VENDOR_3GPP = 10415
TERMINAL_INFORMATION = 1401
IMEI = 1402
SOFTWARE_VERSION = 1403
EQUIPMENT_STATUS = 1445
USER_NAME = 1
DRMP = 301
OC_SUPPORTED_FEATURES = 621
OC_FEATURE_VECTOR = 622
OLR_DEFAULT_ALGO = 1
VENDOR_ID = 266
AUTH_APPLICATION_ID = 258
VENDOR_SPECIFIC_APPLICATION_ID = 260
EXPERIMENTAL_RESULT = 297
EXPERIMENTAL_RESULT_CODE = 298

_VSAI = grouped_avp(VENDOR_SPECIFIC_APPLICATION_ID,
                    [u32_avp(VENDOR_ID, VENDOR_3GPP), u32_avp(AUTH_APPLICATION_ID, APPLICATION_ID)])
_AUTH_SESSION_STATE = u32_avp(AUTH_SESSION_STATE, NO_STATE_MAINTAINED)
# RFC 7683 5.2: a reporting node answers a DOIC request with the algorithm it selected.
_OC_SUPPORTED = grouped_avp(OC_SUPPORTED_FEATURES,
                            [avp(OC_FEATURE_VECTOR, OLR_DEFAULT_ALGO.to_bytes(8, "big"),
                                 mandatory=False)], mandatory=False)
_MISSING_IMEI = avp(TERMINAL_INFORMATION,
                    avp(IMEI, b"", VENDOR_3GPP), VENDOR_3GPP)


class EcaBuilder:
    """Turns (ECR, verdict) into ECA bytes from templates fixed at start."""

    __slots__ = ("identity", "_verdict_parts", "_unknown_part", "_auth_and_host")

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        host = identity.host_origin
        self._auth_and_host = _AUTH_SESSION_STATE + host
        # TS 29.272 7.2.20 order: Result-Code, Auth-Session-State, Origin-*, Equipment-Status.
        self._verdict_parts = {
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

    def parse(self, msg: Message) -> tuple[CheckRequest, bytes, bytes, bytes] | bytes:
        """Read an ECR: (request, answer prefix, answer suffix, Origin-Host bytes), or a finished
        error ECA. The Origin-Host bytes key duplicate detection."""
        data = msg.data
        session = drmp = origin = b""
        proxies: list[bytes] = []
        oc = b""
        imei: str | None = None
        sv: str | None = None
        imsi: str | None = None
        for a in msg.avps:
            code = a[CODE]
            if a[VENDOR] == VENDOR_3GPP:
                if code == TERMINAL_INFORMATION:
                    for c in a[CHILDREN] or ():
                        if c[VENDOR] != VENDOR_3GPP:
                            continue
                        if c[CODE] == IMEI:
                            imei = data[c[VSTART]:c[VEND]].decode()
                        elif c[CODE] == SOFTWARE_VERSION:
                            sv = data[c[VSTART]:c[VEND]].decode()
                continue
            if a[VENDOR]:
                continue
            if code == SESSION_ID:
                session = data[a[START]:a[END]]
            elif code == ORIGIN_HOST:
                origin = data[a[VSTART]:a[VEND]]
            elif code == USER_NAME:
                imsi = data[a[VSTART]:a[VEND]].decode()
            elif code == PROXY_INFO:
                proxies.append(data[a[START]:a[END]])
            elif code == DRMP:
                drmp = data[a[START]:a[END]]
            elif code == OC_SUPPORTED_FEATURES:
                oc = _OC_SUPPORTED
        if imei is None:
            return error_answer(msg, Problem(errors.MISSING_AVP, _MISSING_IMEI,
                                             "Terminal-Information without IMEI"),
                                self.identity, _AUTH_SESSION_STATE)
        req = CheckRequest(imei, sv, imsi)
        return (req, session + drmp + _VSAI, oc + b"".join(proxies) if proxies else oc, origin)

    def answer(self, msg: Message, prefix: bytes, suffix: bytes, verdict: Verdict) -> bytes:
        status = verdict.status
        part = self._unknown_part if status is None else self._verdict_parts[status]
        return frame(msg, prefix + part + suffix)

    def failure(self, msg: Message, result_code: int, reason: str) -> bytes:
        """An ECA for a failure of ours (e.g. 3004 when overloaded, 5012 unable to comply)."""
        return error_answer(msg, Problem(result_code, None, reason), self.identity,
                            _AUTH_SESSION_STATE)


def status_name(verdict: Verdict) -> str:
    return "unknown" if verdict.status is None else verdict.status.name.lower()


"""Building answers: the parts every answer shares, filled in once, not by each handler.

RFC 6733 6.2: an answer carries the request's hop-by-hop and end-to-end ids, the same command
code and application, the P bit of the request, Session-Id first, our Origin-Host/Realm, and
every Proxy-Info of the request in the same order (6.7.3). Protocol errors (3xxx) set the E bit
and use the generic answer-message grammar (7.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from . import errors
from .codec import (
    FLAG_E,
    FLAG_P,
    HEADER,
    HEADER_LENGTH,
    VERSION,
    Message,
    Problem,
    avp,
    str_avp,
    u32_avp,
)

SESSION_ID: Final = 263
ORIGIN_HOST: Final = 264
ORIGIN_REALM: Final = 296
RESULT_CODE: Final = 268
ERROR_MESSAGE: Final = 281
FAILED_AVP: Final = 279
PROXY_INFO: Final = 284
AUTH_SESSION_STATE: Final = 277
NO_STATE_MAINTAINED: Final = 1
ORIGIN_STATE_ID: Final = 278


@dataclass(frozen=True)
class Identity:
    """Who we are on the wire, pre-encoded where it is copied into every answer."""

    origin_host: str
    origin_realm: str
    origin_state_id: int = 0
    host_origin: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "host_origin",
            str_avp(ORIGIN_HOST, self.origin_host) + str_avp(ORIGIN_REALM, self.origin_realm),
        )


def session_and_proxies(req: Message) -> tuple[bytes, bytes]:
    """The request's Session-Id AVP and Proxy-Info AVPs, as received, for echoing."""
    session = b""
    proxies = []
    data = req.data
    for a in req.avps:
        c = a.code
        if c == SESSION_ID and not a.vendor and not session:
            session = data[a.start:a.end]
        elif c == PROXY_INFO and not a.vendor:
            proxies.append(data[a.start:a.end])
    return session, b"".join(proxies)


def frame(req: Message, body: bytes, error: bool = False) -> bytes:
    """Prefix an answer body with the header that answers `req`."""
    flags = (req.flags & FLAG_P) | (FLAG_E if error else 0)
    return HEADER.pack((VERSION << 24) | (HEADER_LENGTH + len(body)), (flags << 24) | req.code,
                       req.application_id, req.hop_by_hop, req.end_to_end) + body


def error_answer(req: Message, problem: Problem, me: Identity,
                 extra: bytes = b"", trailer: bytes = b"") -> bytes:
    """Answer `req` with a failure Result-Code.

    3xxx: RFC 6733 7.2 answer-message with the E bit. Other codes: the command's own answer,
    where `extra` carries the AVPs its grammar makes mandatory (e.g. Auth-Session-State).
    `trailer`: AVPs every answer to this peer carries whatever the outcome (DOIC's
    OC-Supported-Features and OC-OLR, RFC 7683 5.2/5.5), before the Proxy-Infos.
    """
    session, proxies = session_and_proxies(req)
    protocol = errors.is_protocol_error(problem.result_code)
    parts = [session, me.host_origin, u32_avp(RESULT_CODE, problem.result_code)]
    if not protocol:
        parts.append(extra)
    if problem.message:
        parts.append(str_avp(ERROR_MESSAGE, problem.message[:200], mandatory=False))
    if problem.failed_avp is not None:
        parts.append(avp(FAILED_AVP, problem.failed_avp))
    parts.append(trailer)
    parts.append(proxies)
    return frame(req, b"".join(parts), error=protocol)

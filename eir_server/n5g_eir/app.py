"""N5g-eir EquipmentIdentityCheck (TS 29.511 5.2.2.2, 6.1): GET equipment-status. Pure code.

The shell hands over what it read (method, path, query string, a header getter) and gets back
either a finished `Response` or the request to put to the verdict checker (the one call S13
makes too): a `CheckRequest`, or a `Check` when the audit trail records more than the checker is
asked (a GPSI). `answer()` turns the `Verdict` into the response. No sockets, clocks or asyncio here:
overload and authorisation are decided by the shell's objects and only rendered here.

Answers follow TS 29.500 5.2.7 (ProblemDetails with `cause`, application/problem+json):

    404 ERROR_EQUIPMENT_UNKNOWN          verdict "unknown" (S13 5422), or a MAC/EUI-64 PEI
    400 MANDATORY_QUERY_PARAM_MISSING    no pei
    400 MANDATORY_QUERY_PARAM_INCORRECT  pei not imei-/imeisv-/mac-/eui- as TS 29.571 defines
    400 OPTIONAL_QUERY_PARAM_INCORRECT   bad supi/gpsi/supported-features value
    400 INVALID_QUERY_PARAM              repeated or unknown parameter
    400 INVALID_API                      another API name or version (TS 29.500 5.2.7.2)
    404 RESOURCE_URI_STRUCTURE_NOT_FOUND any other path
    405 / 406 / 414                      other methods, no acceptable media type, absurd URI
    429 / 503 (Retry-After), 500         rendered for the shell (overload, internal error), and
                                         503 / 500 for a store-error fallback verdict
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from importlib import resources
from typing import Any, NamedTuple
from urllib.parse import unquote_plus

from ..policy.types import CheckRequest, EquipmentStatus, Verdict
from ..service import STORE_ERROR

API_ROOT = "/n5g-eir-eic/v1"
EQUIPMENT_STATUS_PATH = API_ROOT + "/equipment-status"
OPENAPI_PREFIX = "/openapi/"
OPENAPI_FILES = ("TS29511_N5g-eir_EquipmentIdentityCheck.yaml", "TS29571_CommonData.yaml")
# TS 29.500 leaves the limit to the producer; real requests are < 200 characters.
MAX_URI = 4096

JSON = "application/json"
PROBLEM = "application/problem+json"

Headers = tuple[tuple[str, str], ...]


class Response(NamedTuple):
    status: int
    headers: list[tuple[str, str]]  # a list as the server takes it: answers are shared, unchanged
    body: bytes
    result: str  # the metrics' "result" label: the HTTP status


class Check(NamedTuple):
    """A well-formed request whose audit differs: ask the checker about `request` (what S13
    would ask for the same identities), record `audit` (the same plus the GPSI's MSISDN).
    Without a GPSI the app returns the `CheckRequest` alone (one object less per request)."""

    request: CheckRequest
    audit: CheckRequest


def problem(status: int, title: str, cause: str | None = None, detail: str | None = None,
            invalid: list[tuple[str, str]] | None = None,
            extra_headers: Headers = ()) -> Response:
    body: dict[str, Any] = {"status": status, "title": title}
    if cause:
        body["cause"] = cause
    if detail:
        body["detail"] = detail
    if invalid:
        body["invalidParams"] = [{"param": p, "reason": r} for p, r in invalid]
    return Response(status, [("content-type", PROBLEM), *extra_headers],
                    json.dumps(body, separators=(",", ":")).encode(), str(status))


_VERDICT = {
    s: Response(200, [("content-type", JSON)],
                json.dumps({"status": s.name}, separators=(",", ":")).encode(), "200")
    for s in EquipmentStatus
}
_UNKNOWN = problem(404, "Not Found", "ERROR_EQUIPMENT_UNKNOWN",
                   "the equipment is not known to the EIR")
_NOT_IMEI = problem(404, "Not Found", "ERROR_EQUIPMENT_UNKNOWN",
                    "this EIR holds IMEIs only; MAC and EUI-64 PEIs are not known to it")
_NO_PATH = problem(404, "Not Found", "RESOURCE_URI_STRUCTURE_NOT_FOUND",
                   "no such resource in N5g-eir_EquipmentIdentityCheck")
# TS 29.500 Table 5.2.7.2-1: an unsupported API name or API version in the URI
_INVALID_API = problem(400, "Bad Request", "INVALID_API",
                       "this NF serves n5g-eir-eic/v1 only")
_API_VERSION_PATH = re.compile(r"/[a-z0-9-]+/v[0-9]+(?:/|$)")  # {apiName}/{apiVersion}/...
_METHOD = problem(405, "Method Not Allowed", detail="equipment-status supports GET only",
                  extra_headers=(("allow", "GET"),))
_NOT_ACCEPTABLE = problem(406, "Not Acceptable",
                          detail="the response is application/json or application/problem+json")
_URI_TOO_LONG = problem(414, "URI Too Long", detail=f"request URI longer than {MAX_URI}")
_MISSING_PEI = problem(400, "Bad Request", "MANDATORY_QUERY_PARAM_MISSING",
                       invalid=[("query pei", "mandatory query parameter missing")])
INTERNAL_ERROR = problem(500, "Internal Server Error", "SYSTEM_FAILURE")


def overloaded(status: int, retry_after: int,
               detail: str = "too many requests waiting for the store") -> Response:
    """503 NF_CONGESTION (this worker is overloaded) or 429 NF_CONGESTION_RISK (this consumer
    holds more than its share), with Retry-After in seconds (TS 29.500 6.4)."""
    if status == 429:
        return problem(429, "Too Many Requests", "NF_CONGESTION_RISK",
                       "too many requests from this consumer waiting for the store",
                       extra_headers=(("retry-after", str(retry_after)),))
    return problem(503, "Service Unavailable", "NF_CONGESTION", detail,
                   extra_headers=(("retry-after", str(retry_after)),))


# too_busy: another 5G-EIR should take it (S13 3004); unable_to_comply: S13 5012.
_STORE_ERRORS = {
    "too_busy": problem(503, "Service Unavailable", "NF_CONGESTION",
                        "the register store cannot answer now",
                        extra_headers=(("retry-after", "1"),)),
    "unable_to_comply": problem(500, "Internal Server Error", "SYSTEM_FAILURE",
                                "the register store cannot answer"),
}


def _digits(s: str, lo: int, hi: int) -> bool:
    return lo <= len(s) <= hi and s.isascii() and s.isdigit()


def _hex_groups(s: str, n: int) -> bool:
    parts = s.split("-")
    return len(parts) == n and all(
        len(p) == 2 and p.isascii() and all(c in "0123456789abcdefABCDEF" for c in p)
        for p in parts)


class PeiError(NamedTuple):
    reason: str


def parse_pei(pei: str) -> tuple[str, str | None] | PeiError | None:
    """TS 29.571 Pei: (IMEI digits, SVN or None) for imei-/imeisv-; None for a well-formed MAC
    or EUI-64 PEI (no IMEI to check); PeiError otherwise. A bad Luhn digit is not an error here:
    the policy answers it exactly as it does on S13."""
    if pei.startswith("imei-"):
        d = pei[5:]
        return (d, None) if _digits(d, 15, 15) else PeiError("imei- needs 15 digits")
    if pei.startswith("imeisv-"):
        d = pei[7:]
        return (d[:14], d[14:]) if _digits(d, 16, 16) else PeiError("imeisv- needs 16 digits")
    if pei.startswith("mac-"):
        m = pei[4:].removesuffix("-untrusted")
        return None if _hex_groups(m, 6) else PeiError("mac- needs 6 hex octets")
    for prefix in ("eui-", "eui64-"):  # TS 29.571 pattern "eui-"; "eui64-" seen in the field
        if pei.startswith(prefix):
            return None if _hex_groups(pei[len(prefix):], 8) else PeiError(
                "eui- needs 8 hex octets")
    return PeiError("not imei-, imeisv-, mac- or eui-")


def parse_supi(supi: str) -> str | None | PeiError:
    """The IMSI the pairing (exception) rule compares, as S13's User-Name: imsi-<5..15 digits>,
    or the all-digit user part of an nai-; None for other well-formed SUPIs (gci-, gli-, NAIs
    without an IMSI), which then pair with nothing."""
    if supi.startswith("imsi-"):
        d = supi[5:]
        return d if _digits(d, 5, 15) else PeiError("imsi- needs 5 to 15 digits")
    if supi.startswith("nai-"):
        user, at, realm = supi[4:].partition("@")
        if not user or (at and not realm):
            return PeiError("nai- needs user@realm")
        return user if _digits(user, 5, 15) else None
    if supi.startswith(("gci-", "gli-")) and len(supi) > 4:
        return None
    return PeiError("not imsi-, nai-, gci- or gli-")


def parse_gpsi(gpsi: str) -> str | None | PeiError:
    """msisdn-<5..15 digits> -> the MSISDN for the audit trail; extid- -> None."""
    if gpsi.startswith("msisdn-"):
        d = gpsi[7:]
        return d if _digits(d, 5, 15) else PeiError("msisdn- needs 5 to 15 digits")
    if gpsi.startswith("extid-") and "@" in gpsi:
        return None
    return PeiError("not msisdn- or extid-")


# Accept values that need no parsing (what nghttp2-based AMFs and curl send).
_PLAIN_ACCEPT = frozenset(("*/*", JSON, PROBLEM, "application/json, application/problem+json",
                           "application/json,application/problem+json"))


def accepts_json(accept: str | None) -> bool:
    """RFC 9110 12.5.1, enough for one JSON resource: any range that covers application/json
    or application/problem+json with q > 0."""
    if not accept:
        return True
    for item in accept.split(","):
        media, *params = item.split(";")
        media = media.strip().lower()
        if media not in ("*/*", "application/*", JSON, PROBLEM):
            continue
        q = 1.0
        for p in params:
            k, _, v = p.strip().partition("=")
            if k.lower() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if q > 0:
            return True
    return False


class Authorizer:
    """What the shell's OAuth2 check looks like to the app: `check(header, now)` returns None
    (allowed) or a finished 401/403 Response."""

    def check(self, authorization: str | None, now: float) -> Response | None:  # pragma: no cover
        raise NotImplementedError


class N5gEirApp:
    """Routes and validates; holds pre-rendered answers. One per worker."""

    __slots__ = ("authorizer", "documents")

    def __init__(self, authorizer: Authorizer | None = None,
                 documents: dict[str, bytes] | None = None) -> None:
        self.authorizer = authorizer
        self.documents = documents if documents is not None else load_documents()

    def handle(self, method: str, path: str, query: str,
               header: Callable[[str], str | None], now: float
               ) -> Response | CheckRequest | Check:
        """Everything up to the verdict. `header(name)` reads one request header (lower-case
        name); `now` (unix seconds) is for token expiry."""
        if len(path) + len(query) > MAX_URI:
            return _URI_TOO_LONG
        if path != EQUIPMENT_STATUS_PATH:
            return self._other(method, path)
        if method != "GET":
            return _METHOD
        accept = header("accept")
        if accept is not None and accept not in _PLAIN_ACCEPT and not accepts_json(accept):
            return _NOT_ACCEPTABLE
        if self.authorizer is not None:
            denied = self.authorizer.check(header("authorization"), now)
            if denied is not None:
                return denied
        return parse_request(query)

    def _other(self, method: str, path: str) -> Response:
        if path.startswith(OPENAPI_PREFIX):
            doc = self.documents.get(path[len(OPENAPI_PREFIX):])
            if doc is not None:
                if method != "GET":
                    return _METHOD
                return Response(200, [("content-type", "application/yaml")], doc, "200")
        if not path.startswith(API_ROOT + "/") and _API_VERSION_PATH.match(path):
            return _INVALID_API
        return _NO_PATH

    @staticmethod
    def answer(verdict: Verdict) -> Response:
        status = verdict.status
        if status is not None:
            return _VERDICT[status]
        if verdict.rule == STORE_ERROR:
            return _STORE_ERRORS[verdict.reasons[0]]
        return _UNKNOWN


# What AMFs send nearly always: pei=imei-<15>|imeisv-<16>, then an optional supi=imsi-<5..15>.
# One C-level match answers those; anything else takes the general parser below, which gives
# the same result for them (tests/n5g_eir/test_app.py checks the agreement).
_COMMON_QUERY = re.compile(
    r"pei=(?:imei-([0-9]{15})|imeisv-([0-9]{16}))(?:&supi=imsi-([0-9]{5,15}))?")


def parse_request(query: str) -> Response | CheckRequest | Check:
    m = _COMMON_QUERY.fullmatch(query)
    if m is not None:
        imei, sv, imsi = m.groups()
        # tuple.__new__ with every field: NamedTuple's own __new__ is Python code, and this
        # runs once per request
        if imei is not None:
            return _new(CheckRequest, (imei, None, imsi, None))
        return _new(CheckRequest, (sv[:14], sv[14:], imsi, None))
    return _parse_query(query)


_new = tuple.__new__


def _parse_query(query: str) -> Response | CheckRequest | Check:
    pei: str | None = None
    supi: str | None = None
    gpsi: str | None = None
    features: str | None = None
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if "%" in part or "+" in part:
            name, value = unquote_plus(name), unquote_plus(value)
        if name == "pei":
            if pei is not None:
                return _bad_param("pei", "repeated", mandatory=True)
            pei = value
        elif name == "supi":
            if supi is not None:
                return _bad_param("supi", "repeated")
            supi = value
        elif name == "gpsi":
            if gpsi is not None:
                return _bad_param("gpsi", "repeated")
            gpsi = value
        elif name == "supported-features":
            if features is not None:
                return _bad_param(name, "repeated")
            features = value
            if value and not all(c in "0123456789abcdefABCDEF" for c in value):
                return _bad_param(name, "not a hexadecimal feature bitmask", optional=True)
        else:
            return _bad_param(name, "unsupported query parameter")
    if pei is None:
        return _MISSING_PEI
    parsed = parse_pei(pei)
    if isinstance(parsed, PeiError):
        return _bad_param("pei", parsed.reason, mandatory=True)
    if parsed is None:
        return _NOT_IMEI
    imsi: str | None = None
    msisdn: str | None = None
    if supi is not None:
        s = parse_supi(supi)
        if isinstance(s, PeiError):
            return _bad_param("supi", s.reason, optional=True)
        imsi = s
    if gpsi is not None:
        g = parse_gpsi(gpsi)
        if isinstance(g, PeiError):
            return _bad_param("gpsi", g.reason, optional=True)
        msisdn = g
    imei, svn = parsed
    # S13 carries no MSISDN, so the GPSI goes to the audit trail only: the verdict stays the
    # one S13 gives for the same IMEI, SVN and IMSI.
    req = CheckRequest(imei, svn, imsi)
    return req if msisdn is None else Check(req, req._replace(msisdn=msisdn))


def _bad_param(name: str, reason: str, mandatory: bool = False,
               optional: bool = False) -> Response:
    """TS 29.500 Table 5.2.7.2-1: MANDATORY_QUERY_PARAM_INCORRECT (pei), OPTIONAL_QUERY_PARAM_
    INCORRECT (a supported optional parameter with a bad value), INVALID_QUERY_PARAM (an
    unsupported or repeated parameter)."""
    cause = ("MANDATORY_QUERY_PARAM_INCORRECT" if mandatory
             else "OPTIONAL_QUERY_PARAM_INCORRECT" if optional else "INVALID_QUERY_PARAM")
    return problem(400, "Bad Request", cause, invalid=[(f"query {name}", reason)])


def load_documents() -> dict[str, bytes]:
    """The OpenAPI files shipped in the package, by file name."""
    base = resources.files(__package__).joinpath("openapi")
    return {name: base.joinpath(name).read_bytes() for name in OPENAPI_FILES}

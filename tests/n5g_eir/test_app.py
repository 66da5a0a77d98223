"""The sans-I/O N5g-eir handler: routing, parameter validation and rendering, no sockets."""

from __future__ import annotations

import json
import string

from hypothesis import example, given
from hypothesis import strategies as st

from eir_server.n5g_eir.app import (
    _PLAIN_ACCEPT,
    EQUIPMENT_STATUS_PATH,
    MAX_URI,
    Check,
    N5gEirApp,
    Response,
    _parse_query,
    accepts_json,
    overloaded,
    parse_pei,
    parse_request,
)
from eir_server.policy.types import CheckRequest, EquipmentStatus, Verdict

APP = N5gEirApp()
IMEI15 = "352099001761481"


def get(query: str, path: str = EQUIPMENT_STATUS_PATH, method: str = "GET",
        headers: dict[str, str] | None = None) -> Response | CheckRequest | Check:
    h = headers or {}
    return APP.handle(method, path, query, h.get, 0.0)


def body(r: Response | CheckRequest | Check) -> dict:
    assert isinstance(r, Response)
    return json.loads(r.body)


def test_imei_and_imeisv_become_what_s13_would_ask() -> None:
    assert get(f"pei=imei-{IMEI15}") == CheckRequest(IMEI15)  # the audit records the same
    r = get("pei=imeisv-3520990017614823&supi=imsi-001010123456789&gpsi=msisdn-491510000")
    assert isinstance(r, Check)
    # IMEISV splits like S13's IMEI + Software-Version; the GPSI reaches only the audit.
    assert r.request == CheckRequest("35209900176148", "23", "001010123456789", None)
    assert r.audit == CheckRequest("35209900176148", "23", "001010123456789", "491510000")


def test_nai_supi_pairs_by_its_imsi_user_part() -> None:
    r = get(f"pei=imei-{IMEI15}&supi=nai-001010123456789%40nai.5gc.mnc001.mcc001.3gppnetwork.org")
    assert type(r) is CheckRequest and r.imsi == "001010123456789"
    r = get(f"pei=imei-{IMEI15}&supi=nai-alice%40example.org")
    assert type(r) is CheckRequest and r.imsi is None


def test_verdicts_render_as_eir_response_data() -> None:
    for s in EquipmentStatus:
        r = APP.answer(Verdict(s, "x"))
        assert (r.status, body(r)) == (200, {"status": s.name})
        assert ("content-type", "application/json") in r.headers
    r = APP.answer(Verdict(None, "unknown"))
    assert r.status == 404 and body(r)["cause"] == "ERROR_EQUIPMENT_UNKNOWN"
    assert ("content-type", "application/problem+json") in r.headers


def test_missing_and_incorrect_pei() -> None:
    r = get("supi=imsi-001010123456789")
    assert body(r) == {"status": 400, "title": "Bad Request",
                       "cause": "MANDATORY_QUERY_PARAM_MISSING",
                       "invalidParams": [{"param": "query pei",
                                          "reason": "mandatory query parameter missing"}]}
    for pei in ("imei-12345", "imei-35209900176148x", "imeisv-352099001761481", "foo-1",
                "", "mac-zz-00-00-00-00-00"):
        b = body(get(f"pei={pei}"))
        assert b["cause"] == "MANDATORY_QUERY_PARAM_INCORRECT", pei
        assert b["invalidParams"][0]["param"] == "query pei"
    assert body(get(f"pei=imei-{IMEI15}&pei=imei-{IMEI15}"))["status"] == 400


def test_mac_and_eui_peis_are_unknown_equipment() -> None:
    for pei in ("mac-00-11-22-33-44-55", "mac-00-11-22-33-44-55-untrusted",
                "eui-00-11-22-33-44-55-66-77"):
        r = get(f"pei={pei}")
        assert isinstance(r, Response) and r.status == 404, pei
        assert body(r)["cause"] == "ERROR_EQUIPMENT_UNKNOWN"


def test_invalid_optional_parameters() -> None:
    for q in ("supi=imsi-12", "supi=bogus", "gpsi=msisdn-x", "gpsi=bogus",
              "supported-features=xyz"):
        b = body(get(f"pei=imei-{IMEI15}&{q}"))
        assert b["status"] == 400 and b["cause"] == "OPTIONAL_QUERY_PARAM_INCORRECT", q
        assert b["invalidParams"][0]["param"].startswith("query "), q
    for q in ("colour=blue", "supi=imsi-001010123456789&supi=imsi-1",
              "supported-features=1&supported-features=2"):
        b = body(get(f"pei=imei-{IMEI15}&{q}"))
        assert b["status"] == 400 and b["cause"] == "INVALID_QUERY_PARAM", q
        assert b["invalidParams"][0]["param"].startswith("query "), q
    assert type(get(f"pei=imei-{IMEI15}&supported-features=0a")) is CheckRequest


def test_paths_methods_accept_and_uri_length() -> None:
    r = get(f"pei=imei-{IMEI15}", path="/n5g-eir-eic/v1/other")
    assert r.status == 404 and body(r)["cause"] == "RESOURCE_URI_STRUCTURE_NOT_FOUND"
    for p in ("/n5g-eir-eic/v2/equipment-status", "/n5g-eir-xyz/v1/equipment-status"):
        r = get(f"pei=imei-{IMEI15}", path=p)
        assert r.status == 400 and body(r)["cause"] == "INVALID_API", p
    r = get(f"pei=imei-{IMEI15}", method="POST")
    assert r.status == 405 and ("allow", "GET") in r.headers
    r = get(f"pei=imei-{IMEI15}", headers={"accept": "text/html"})
    assert r.status == 406
    r = get(f"pei=imei-{IMEI15}", headers={"accept": "application/json;q=0, text/plain"})
    assert r.status == 406
    assert type(get(f"pei=imei-{IMEI15}", headers={"accept": "application/*"})) is CheckRequest
    r = get("pei=imei-" + "1" * MAX_URI)
    assert r.status == 414


def test_openapi_documents_are_served() -> None:
    r = get("", path="/openapi/TS29511_N5g-eir_EquipmentIdentityCheck.yaml")
    assert r.status == 200 and b"/equipment-status:" in r.body
    assert get("", path="/openapi/nothing.yaml").status == 404


def test_overload_answers_carry_retry_after() -> None:
    for status, cause in ((503, "NF_CONGESTION"), (429, "NF_CONGESTION_RISK")):
        r = overloaded(status, 1)
        assert r.status == status and ("retry-after", "1") in r.headers
        assert body(r)["cause"] == cause


@given(st.text(max_size=40))
def test_parse_pei_never_raises(pei: str) -> None:
    parse_pei(pei)


@given(st.text(alphabet=string.printable, max_size=120))
def test_any_query_gets_a_check_or_a_400(query: str) -> None:
    r = parse_request(query)
    if isinstance(r, Response):
        assert r.status in (400, 404)
        b = json.loads(r.body)
        assert b["status"] == r.status and b["cause"]


@given(st.from_regex(r"\A[0-9]{15}\Z"), st.from_regex(r"\A[0-9]{5,15}\Z"))
def test_well_formed_identities_are_accepted(imei: str, imsi: str) -> None:
    r = parse_request(f"pei=imei-{imei}&supi=imsi-{imsi}")
    assert type(r) is CheckRequest and r == CheckRequest(imei, None, imsi)


@given(st.text(max_size=30))
def test_accept_header_parser_never_raises(accept: str) -> None:
    accepts_json(accept)


_PART = st.sampled_from(["pei=imei-", "pei=imeisv-", "&supi=imsi-", "&supi=nai-", "&gpsi=msisdn-",
                         "&", "=", "%30", "+", "x", "-", "pei=", "supi=imsi-"])
_QUERY = st.lists(st.one_of(_PART, st.from_regex(r"\A[0-9]{0,17}\Z")), max_size=8).map("".join)


@given(_QUERY)
@example("pei=imei-352099001761481&supi=imsi-001010123456789")
@example("pei=imeisv-3520990017614801&supi=imsi-00101")
@example("pei=imeisv-3520990017614801")
@example("pei=imei-352099001761481&supi=imsi-0010")
@example("pei=imei-35209900176148&supi=imsi-00101")
def test_fast_query_path_agrees_with_the_general_parser(query: str) -> None:
    """The one-regex path for common queries gives exactly what the general parser gives."""
    fast, general = parse_request(query), _parse_query(query)
    assert type(fast) is type(general) and fast == general


def test_plain_accept_values_are_acceptable() -> None:
    assert all(accepts_json(a) for a in _PLAIN_ACCEPT)

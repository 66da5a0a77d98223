"""ECR -> ECA over TCP: every outcome, every error answer, echoing rules and T-flag replays."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from eir_server.diameter.codec import avp, grouped_avp, str_avp, u32_avp
from eir_server.diameter.dedup import DuplicateCache
from eir_server.policy import PolicyConfig
from eir_server.policy.types import BlacklistEntry, ImeiRecord

from .conftest import (
    AUTH_SESSION_STATE,
    DEST_HOST,
    DEST_REALM,
    ECR,
    ERROR_MESSAGE,
    EXPERIMENTAL_RESULT,
    FAILED_AVP,
    IMEI,
    IMEI_BLACK,
    IMEI_GREY,
    IMEI_UNKNOWN,
    IMEI_WHITE,
    IMSI_PAIRED,
    ORIGIN_HOST,
    ORIGIN_REALM,
    OUR_HOST,
    OUR_REALM,
    PROXY_INFO,
    RESULT_CODE,
    S13,
    SESSION_ID,
    STATUS,
    TERMINAL_INFORMATION,
    USER_NAME,
    V3GPP,
    VSAI,
    E,
    ManualClock,
    Msg,
    P,
    R,
    Server,
    T,
    build,
    ecr,
    ecr_avps,
    proxy_info,
    raw_avp,
    session_id,
    terminal_information,
)

PROXIES = [proxy_info("dra1.test.example", b"state-1"), proxy_info("dra2.test.example", b"\x00\x02")]


def check_common(req: bytes, ans: Msg, *, error_bit: bool) -> None:
    """What every answer to an ECR must satisfy (RFC 6733 6.2, 6.7.3, 7.2)."""
    q = Msg.parse(req)
    assert not ans.flags & R
    assert (ans.code, ans.app, ans.hbh, ans.e2e) == (q.code, q.app, q.hbh, q.e2e)
    assert ans.flags & P == q.flags & P, "P bit copied from the request"
    assert bool(ans.flags & E) == error_bit
    assert ans.flags & 0x0F == 0
    sid = q.get(SESSION_ID) if q.all(SESSION_ID) else None
    if sid is not None:
        assert ans.avps[0].code == SESSION_ID and ans.avps[0].value == sid.value
    assert ans.one(ORIGIN_HOST).text == OUR_HOST
    assert ans.one(ORIGIN_REALM).text == OUR_REALM
    # Proxy-Info: every one of the request, byte for byte, same order.
    assert [a.raw for a in ans.all(PROXY_INFO)] == [a.raw for a in q.all(PROXY_INFO)]
    # Exactly one of Result-Code / Experimental-Result.
    assert (ans.get(RESULT_CODE) is None) != (ans.get(EXPERIMENTAL_RESULT) is None)


# ---------------------------------------------------------------------------------------------
# Outcomes


@pytest.mark.parametrize(("imei", "imsi", "status"), [
    (IMEI_WHITE, IMSI_PAIRED, STATUS.WHITELISTED),
    (IMEI_BLACK, None, STATUS.BLACKLISTED),
    (IMEI_GREY, None, STATUS.GREYLISTED),
    ("3520990017614", None, STATUS.GREYLISTED),  # malformed (13 digits): greylisted by default
])
async def test_ecr_outcome(server: Server, imei: str, imsi: str | None, status: int) -> None:
    p = await server.peer()
    for flags, proxies in ((R | P, PROXIES), (R, [])):
        req = ecr(imei, n=5, flags=flags, imsi=imsi, proxies=proxies)
        eca = await p.request(req)
        check_common(req, eca, error_bit=False)
        assert eca.result_code == 2001
        assert eca.equipment_status == status
        assert eca.one(AUTH_SESSION_STATE).u32 == 1
        assert eca.one(VSAI) is not None
        assert eca.get(FAILED_AVP) is None
    p.close()


async def test_blacklisted_imei_without_paired_imsi_stays_blacklisted(server: Server) -> None:
    p = await server.peer()
    eca = await p.request(ecr(IMEI_WHITE, imsi="001010000000001"))
    assert eca.equipment_status == STATUS.BLACKLISTED
    p.close()


async def test_unknown_equipment_gets_experimental_result_5422(server: Server) -> None:
    p = await server.peer()
    req = ecr(IMEI_UNKNOWN, n=3, proxies=PROXIES)
    eca = await p.request(req)
    check_common(req, eca, error_bit=False)
    assert eca.experimental_result == (V3GPP, 5422)
    assert eca.get(RESULT_CODE) is None, "5422 goes in Experimental-Result only"
    assert eca.equipment_status is None
    assert eca.one(AUTH_SESSION_STATE).u32 == 1
    p.close()


async def test_unknown_equipment_default_whitelisted(servers: Callable[..., Any]) -> None:
    srv: Server = await servers(policy=PolicyConfig())
    p = await srv.peer()
    eca = await p.request(ecr(IMEI_UNKNOWN))
    assert eca.result_code == 2001 and eca.equipment_status == STATUS.WHITELISTED
    p.close()


@pytest.mark.parametrize(("config", "imei", "status"), [
    (PolicyConfig(unknown_equipment=STATUS.GREYLISTED), IMEI_UNKNOWN, STATUS.GREYLISTED),
    (PolicyConfig(unknown_equipment=None, barred_tacs=(IMEI_UNKNOWN[:8],)), IMEI_UNKNOWN,
     STATUS.BLACKLISTED),
    (PolicyConfig(unknown_equipment=None, notification_grace=STATUS.WHITELISTED), IMEI_GREY,
     STATUS.WHITELISTED),
    (PolicyConfig(unknown_equipment=None, malformed=None), "35209900176", None),
], ids=["unknown->grey", "barred-tac", "grace-whitelisted", "malformed-unknown"])
async def test_policy_config_drives_the_eca(servers: Callable[..., Any], config: PolicyConfig,
                                            imei: str, status: int | None) -> None:
    srv: Server = await servers(policy=config)
    p = await srv.peer()
    req = ecr(imei, n=8, proxies=PROXIES)
    eca = await p.request(req)
    check_common(req, eca, error_bit=False)
    assert eca.equipment_status == status
    if status is None:
        assert eca.experimental_result == (V3GPP, 5422) and eca.result_code is None
    else:
        assert eca.result_code == 2001
    p.close()


async def test_store_change_is_seen_by_the_next_ecr(server: Server) -> None:
    p = await server.peer()
    assert (await p.request(ecr(IMEI_UNKNOWN, n=1))).experimental_result == (V3GPP, 5422)
    server.store.put(IMEI_UNKNOWN, ImeiRecord(blacklist=BlacklistEntry("20010101")))
    assert (await p.request(ecr(IMEI_UNKNOWN, n=2))).equipment_status == STATUS.BLACKLISTED
    p.close()


async def test_pipelined_ecrs_answered_in_order_with_their_ids(server: Server) -> None:
    p = await server.peer()
    imeis = [IMEI_BLACK, IMEI_GREY, IMEI_UNKNOWN] * 40
    await p.send(b"".join(ecr(imei, n=1000 + i) for i, imei in enumerate(imeis)))
    for i, imei in enumerate(imeis):
        eca = await p.recv()
        assert eca.hbh == eca.e2e == 1000 + i
        assert eca.avps[0].text == session_id(1000 + i)
        expected = {IMEI_BLACK: 1, IMEI_GREY: 2, IMEI_UNKNOWN: None}[imei]
        assert eca.equipment_status == expected
    p.close()


# ---------------------------------------------------------------------------------------------
# Error answers


def _replace(avps: list[bytes], code: int, new: bytes | None) -> list[bytes]:
    out = []
    for a in avps:
        if Msg.parse(build(0, 0, 0, [a])).avps[0].code == code:
            if new is not None:
                out.append(new)
        else:
            out.append(a)
    return out


UNKNOWN_M = raw_avp(99999, 0x40, b"xyz!")
RESERVED_BITS = raw_avp(USER_NAME, 0x40 | 0x01, b"001010123456789")
BAD_AUTH_STATE = u32_avp(AUTH_SESSION_STATE, 7)
SHORT_AUTH_STATE = raw_avp(AUTH_SESSION_STATE, 0x40, b"\0\0\0\1\0", length=13)
M_ON_ERROR_MESSAGE = raw_avp(ERROR_MESSAGE, 0x40, b"oops")
TI_WITHOUT_IMEI = terminal_information(None, "01")

# (id, request bytes, result code, expected Failed-AVP content: list of raw AVPs or None)
ERROR_CASES: list[tuple[str, bytes, int, list[bytes] | None]] = [
    ("3001 unknown S13 command", build(R | P, 999, S13, ecr_avps(), 11, 11), 3001, None),
    ("3001 unknown base command", build(R, 274, 0, ecr_avps(), 12, 12), 3001, None),
    ("3002 Destination-Host not ours",
     ecr(n=13, dest_host="other-eir.test.example"), 3002, None),
    ("3003 Destination-Realm not ours", ecr(n=14, dest_realm="other.example"), 3003, None),
    ("3007 unsupported application", build(R | P, 316, 16777251, ecr_avps(), 15, 15), 3007,
     None),
    ("3008 E bit on a request", ecr(n=16, flags=R | P | E), 3008, None),
    ("3008 reserved header bit", ecr(n=17, flags=R | P | 0x04), 3008, None),
    ("3009 reserved AVP flag bits", build(R | P, ECR, S13, ecr_avps(extra=[RESERVED_BITS]),
                                          18, 18), 3009, [RESERVED_BITS]),
    ("3009 M bit on an AVP that forbids it",
     build(R | P, ECR, S13, ecr_avps(extra=[M_ON_ERROR_MESSAGE]), 19, 19), 3009,
     [M_ON_ERROR_MESSAGE]),
    ("5001 unknown AVP with M bit", build(R | P, ECR, S13, ecr_avps(extra=[UNKNOWN_M]), 20, 20),
     5001, [UNKNOWN_M]),
    ("5004 invalid enumerated value",
     build(R | P, ECR, S13, _replace(ecr_avps(), AUTH_SESSION_STATE, BAD_AUTH_STATE), 21, 21),
     5004, [BAD_AUTH_STATE]),
    ("5005 missing Terminal-Information",
     build(R | P, ECR, S13, _replace(ecr_avps(), TERMINAL_INFORMATION, None), 22, 22), 5005,
     [grouped_avp(TERMINAL_INFORMATION, [], V3GPP)]),
    ("5005 missing Origin-Realm",
     build(R | P, ECR, S13, _replace(ecr_avps(), ORIGIN_REALM, None), 23, 23), 5005,
     [str_avp(ORIGIN_REALM, "")]),
    ("5005 Terminal-Information without IMEI", ecr(n=24, terminal=TI_WITHOUT_IMEI), 5005,
     [grouped_avp(TERMINAL_INFORMATION, [str_avp(IMEI, "", V3GPP)], V3GPP)]),
    ("5008 Session-Id not first",
     build(R | P, ECR, S13, ecr_avps()[1:3] + ecr_avps()[:1] + ecr_avps()[3:], 25, 25), 5008,
     [str_avp(SESSION_ID, session_id(1))]),
    ("5009 Origin-Host twice",
     build(R | P, ECR, S13, ecr_avps(extra=[str_avp(ORIGIN_HOST, "dup.test.example")]), 26, 26),
     5009, [str_avp(ORIGIN_HOST, "dup.test.example")]),
    ("5014 Unsigned32 of 5 bytes",
     build(R | P, ECR, S13, _replace(ecr_avps(), AUTH_SESSION_STATE, SHORT_AUTH_STATE), 27, 27),
     5014, [SHORT_AUTH_STATE]),
]


def _bad_length() -> bytes:
    """A valid ECR followed by 2 stray bytes counted in Message-Length (not a multiple of 4)."""
    body = b"".join(ecr_avps(proxies=PROXIES)) + b"\0\0"
    from .conftest import header
    return header(R | P, ECR, S13, 28, 28, 20 + len(body)) + body


ERROR_CASES.append(("5015 length not a multiple of 4", _bad_length(), 5015, None))


@pytest.mark.parametrize(("name", "req", "code", "failed"), ERROR_CASES,
                         ids=[c[0] for c in ERROR_CASES])
async def test_error_answer(server: Server, name: str, req: bytes, code: int,
                            failed: list[bytes] | None) -> None:
    p = await server.peer()
    ans = await p.request(req)
    q_code = int.from_bytes(req[5:8], "big")
    assert ans.code == q_code
    assert ans.result_code == code, (name, ans.summary(),
                                     ans.get(ERROR_MESSAGE) and ans.one(ERROR_MESSAGE).text)
    assert ans.get(EXPERIMENTAL_RESULT) is None
    assert ans.equipment_status is None
    protocol_error = 3000 <= code < 4000
    if code != 5015:
        check_common(req, ans, error_bit=protocol_error)
    else:  # the request's framing is off; still check the header rules
        assert bool(ans.flags & E) is False and ans.flags & P and ans.hbh == 28
        assert ans.avps[0].code == SESSION_ID
        assert [a.raw for a in ans.all(PROXY_INFO)] == list(PROXIES)
    if not protocol_error:
        # 5xxx use the ECA grammar: Auth-Session-State is mandatory there.
        assert ans.one(AUTH_SESSION_STATE).u32 == 1
    if failed is not None:
        assert [a.raw for a in ans.failed_avp] == failed
    elif code in (3001, 3002, 3003, 3007, 3008):
        assert ans.get(FAILED_AVP) is None
    # The connection survives an error answer.
    again = await p.request(ecr(IMEI_BLACK, n=99))
    assert again.equipment_status == STATUS.BLACKLISTED
    p.close()


async def test_error_answer_keeps_proxy_info_order_and_p_bit(server: Server) -> None:
    p = await server.peer()
    proxies = [proxy_info(f"dra{i}.test.example", bytes([i]) * i) for i in range(1, 5)]
    req = build(R | P, ECR, S13,
                ecr_avps(dest_realm="elsewhere.example", proxies=proxies), 40, 41)
    ans = await p.request(req)
    assert ans.result_code == 3003 and ans.flags == P | E
    assert [a.raw for a in ans.all(PROXY_INFO)] == proxies
    assert ans.avps[0].code == SESSION_ID
    p.close()


async def test_destination_host_and_realm_ours_are_accepted(server: Server) -> None:
    p = await server.peer()
    req = ecr(IMEI_BLACK, dest_host=OUR_HOST.upper(), dest_realm=OUR_REALM.upper())
    assert (await p.request(req)).equipment_status == STATUS.BLACKLISTED
    p.close()
    assert DEST_HOST and DEST_REALM  # imported constants used by the builders


async def test_unknown_non_mandatory_avp_is_ignored(server: Server) -> None:
    p = await server.peer()
    extra = [raw_avp(99999, 0x00, b"ignore me"), avp(88888, b"vendor", 12345, mandatory=False)]
    eca = await p.request(ecr(IMEI_GREY, extra=extra))
    assert eca.result_code == 2001 and eca.equipment_status == STATUS.GREYLISTED
    p.close()


# ---------------------------------------------------------------------------------------------
# T flag: duplicates answered from the cache within the window


async def test_t_flag_replay_gets_same_answer_except_hop_by_hop(servers: Callable[..., Any]) -> None:
    clock = ManualClock()
    srv: Server = await servers(clock=clock, dedup=DuplicateCache(window=60.0))
    p = await srv.peer()
    avps = ecr_avps(IMEI_UNKNOWN, n=7, proxies=PROXIES)
    first = await p.request(build(R | P, ECR, S13, avps, 100, 5000))
    assert first.experimental_result == (V3GPP, 5422)

    # The register changes: a fresh evaluation would now blacklist.
    srv.store.put(IMEI_UNKNOWN, ImeiRecord(blacklist=BlacklistEntry("20010101")))
    clock.t += 30
    replay = await p.request(build(R | P | T, ECR, S13, avps, 200, 5000))
    assert replay.raw[:12] + replay.raw[16:] == first.raw[:12] + first.raw[16:]
    assert replay.hbh == 200 and first.hbh == 100
    assert replay.flags & T == 0, "answers never carry the T bit"

    # Without the T flag the same end-to-end id is a new request.
    fresh = await p.request(build(R | P, ECR, S13, avps, 300, 5000))
    assert fresh.equipment_status == STATUS.BLACKLISTED

    # After the window the T-flagged retransmission is evaluated again.
    clock.t += 61
    late = await p.request(build(R | P | T, ECR, S13, ecr_avps(IMEI_UNKNOWN, n=8), 400, 6000))
    assert late.equipment_status == STATUS.BLACKLISTED
    srv.store.put(IMEI_UNKNOWN, None)
    clock.t += 1
    replay_late = await p.request(build(R | P | T, ECR, S13, ecr_avps(IMEI_UNKNOWN, n=8),
                                        401, 6000))
    assert replay_late.equipment_status == STATUS.BLACKLISTED, "cached again after re-evaluation"
    p.close()


async def test_t_flag_duplicate_key_includes_origin_host(server: Server) -> None:
    p = await server.peer()
    a = await p.request(build(R | P, ECR, S13, ecr_avps(IMEI_UNKNOWN), 1, 777))
    assert a.experimental_result == (V3GPP, 5422)
    server.store.put(IMEI_UNKNOWN, ImeiRecord(blacklist=BlacklistEntry("20010101")))
    other = [a if not a.startswith(ORIGIN_HOST.to_bytes(4, "big")) else
             str_avp(ORIGIN_HOST, "mme2.test.example") for a in ecr_avps(IMEI_UNKNOWN)]
    b = await p.request(build(R | P | T, ECR, S13, other, 2, 777))
    assert b.equipment_status == STATUS.BLACKLISTED, "another peer's e2e id is not a duplicate"
    p.close()

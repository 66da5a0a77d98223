"""S13 ECR -> ECA without sockets: every outcome, checked against our own ECA grammar and
decoded by python-diameter (an independent codec)."""

from __future__ import annotations

import random

import pytest
from diameter.message import Message as RefMessage

from eir_server.checker import EquipmentChecker
from eir_server.diameter.answers import Identity
from eir_server.diameter.codec import CHILDREN, CODE, FLAG_P, FLAG_T, decode, validate
from eir_server.diameter.connection import AppRequest, Connection, PeerConfig
from eir_server.diameter.dedup import DuplicateCache
from eir_server.diameter.dictionary import load_dictionary
from eir_server.policy import Policy, PolicyConfig
from eir_server.policy.types import (
    BlacklistEntry,
    CheckRequest,
    EquipmentStatus,
    ExceptionEntry,
    ImeiRecord,
    NotificationEntry,
    Verdict,
)
from eir_server.s13.app import EcaBuilder
from eir_server.store import MemoryStore
from tests.diameter.builders import cer, ecr, proxy_info

D = load_dictionary()
ME = Identity("eir.localdomain", "localdomain", 7)
ECA_GRAMMAR = D.command(16777252, 324).answer  # type: ignore[union-attr]
BLACK = "35209900176148"
GREY = "35209900176149"
PAIRED = "35209900176150"


def checker(unknown: EquipmentStatus | None = EquipmentStatus.WHITELISTED) -> EquipmentChecker:
    store = MemoryStore()
    store.put(BLACK, ImeiRecord(blacklist=BlacklistEntry("20200101", ("stolen",))))
    store.put(GREY, ImeiRecord(notifications=(NotificationEntry("001010000000001", "1",
                                                                "29991231"),)))
    store.put(PAIRED, ImeiRecord(blacklist=BlacklistEntry("20200101"),
                                 exceptions=(ExceptionEntry("001010000000002"),)))
    policy = Policy(PolicyConfig(unknown_equipment=unknown))
    return EquipmentChecker(policy, store, today=lambda: "20260101")


def ecr_message(frame: bytes):  # noqa: ANN201
    conn = Connection(PeerConfig(ME), D, 0.0, "192.0.2.1", rng=random.Random(0))
    conn.receive_data(cer(), 0.0)
    conn.data_to_send()
    conn.events()
    conn.receive_data(frame, 0.0)
    (ev,) = conn.events()
    assert isinstance(ev, AppRequest)
    return ev.message


def run(frame: bytes, unknown: EquipmentStatus | None = EquipmentStatus.WHITELISTED) -> bytes:
    msg = ecr_message(frame)
    eca = EcaBuilder(ME, D)
    parsed = eca.parse(msg)
    if isinstance(parsed, bytes):
        return parsed
    req, prefix, suffix, _origin = parsed
    verdict = checker(unknown).check(req)
    assert isinstance(verdict, Verdict)
    return eca.answer(msg, prefix, suffix, verdict.status)


def u32(m, code: int, vendor: int = 0) -> int | None:  # noqa: ANN001
    a = m.find(code, vendor)
    return None if a is None else m.u32(a)


@pytest.mark.parametrize("imei, imsi, status", [
    ("49015420323751", None, 0),
    (BLACK, None, 1),
    (GREY, None, 2),
    (PAIRED, "001010000000002", 0),  # exception pairing wins over the blacklist
    (PAIRED, "001010000000009", 1),
])
def test_known_equipment_gets_2001_and_equipment_status(imei: str, imsi: str | None,
                                                        status: int) -> None:
    raw = run(ecr(imei=imei, imsi=imsi))
    m = decode(raw, D)
    validate(m, ECA_GRAMMAR)  # type: ignore[arg-type]
    assert m.problems == []
    assert u32(m, 268) == 2001
    assert u32(m, 1445, 10415) == status
    assert u32(m, 277) == 1
    assert m.avps[0][CODE] == 263 and m.text(m.avps[0]) == "mme1.epc.test;1;1"
    assert m.flags & FLAG_P and m.hop_by_hop == 2 and m.end_to_end == 2
    ref = RefMessage.from_bytes(raw)
    assert ref.header.command_code == 324 and ref.header.application_id == 16777252
    assert [a.code for a in ref.avps][0] == 263


def test_unknown_equipment_gets_experimental_result_5422_and_no_result_code() -> None:
    raw = run(ecr(imei="49015420323751"), unknown=None)
    m = decode(raw, D)
    validate(m, ECA_GRAMMAR)  # type: ignore[arg-type]
    assert m.problems == []
    assert m.find(268) is None and m.find(1445, 10415) is None
    er = m.find(297)
    assert er is not None
    assert {(c[CODE], m.u32(c)) for c in er[CHILDREN]} == {(266, 10415), (298, 5422)}
    RefMessage.from_bytes(raw)


def test_proxy_info_echoed_in_order_and_doic_drmp() -> None:
    from eir_server.diameter.codec import avp, grouped_avp, u32_avp
    proxies = [proxy_info("dra1", b"one"), proxy_info("dra2", b"two"), proxy_info("dra3", b"3")]
    frame = ecr(proxies=proxies, before=[u32_avp(301, 5, mandatory=False)],
                after=[grouped_avp(621, [avp(622, (1).to_bytes(8, "big"), mandatory=False)],
                                   mandatory=False)])
    m = decode(run(frame), D)
    got = [m.raw(a) for a in m.avps if a[CODE] == 284]
    assert got == proxies
    assert u32(m, 301) == 5  # DRMP priority kept
    oc = m.find(621)
    assert oc is not None and oc[CHILDREN][0][CODE] == 622
    validate(m, ECA_GRAMMAR)  # type: ignore[arg-type]
    assert m.problems == []


def test_terminal_information_without_imei_is_5005() -> None:
    from eir_server.diameter.codec import grouped_avp, str_avp
    frame = ecr(terminal=grouped_avp(1401, [str_avp(1403, "01", 10415)], 10415))
    m = decode(run(frame), D)
    assert u32(m, 268) == 5005
    failed = m.find(279)
    assert failed is not None
    ti = failed[CHILDREN][0]
    assert ti[CODE] == 1401 and ti[CHILDREN][0][CODE] == 1402
    validate(m, ECA_GRAMMAR)  # type: ignore[arg-type]
    assert m.problems == []


def test_t_flag_replay_is_byte_identical_except_hop_by_hop() -> None:
    """The answer is rebuilt from the cached outcome even if the register changed since."""
    cache: DuplicateCache[int] = DuplicateCache(window=240.0)
    eca = EcaBuilder(ME, D)
    first = ecr_message(ecr(hbh=10, e2e=99, imei=BLACK))
    req, prefix, suffix, origin = eca.parse(first)  # type: ignore[misc]
    verdict = checker().check(req)
    assert isinstance(verdict, Verdict) and verdict.status is not None
    original = eca.answer(first, prefix, suffix, verdict.status)
    cache.put((origin, first.end_to_end), int(verdict.status), 0.0)
    retx = ecr_message(ecr(hbh=11, e2e=99, imei=BLACK, flags=0x80 | FLAG_P | FLAG_T))
    _, prefix2, suffix2, origin2 = eca.parse(retx)  # type: ignore[misc]
    cached = cache.get((origin2, retx.end_to_end), 200.0)
    assert cached == EquipmentStatus.BLACKLISTED
    again = eca.answer(retx, prefix2, suffix2, cached)
    assert again[:12] == original[:12] and again[16:] == original[16:]
    assert again[12:16] != original[12:16]
    assert cache.get((origin2, 99), 241.0) is None  # outside the window


def test_duplicate_cache_is_bounded() -> None:
    cache: DuplicateCache[int] = DuplicateCache(window=240.0, max_entries=100)
    for i in range(1000):
        cache.put((b"h", i), i, float(i) / 1000)
    assert len(cache) == 100
    assert cache.get((b"h", 999), 1.0) == 999 and cache.get((b"h", 0), 1.0) is None


def test_checker_malformed_imei_uses_policy() -> None:
    v = checker().check(CheckRequest("12AB"))
    assert isinstance(v, Verdict) and v.rule == "malformed"

"""The S13 handler without sockets (production code, fed by a real in-memory Connection):
every outcome, checked against our own ECA grammar and decoded by python-diameter (an
independent codec); the duplicate cache, the overload gate, pending lookups, counters, audit."""

from __future__ import annotations

import random
from typing import Any

import pytest
from diameter.message import Message as RefMessage

from eir_server.checker import EquipmentChecker
from eir_server.diameter.answers import Identity
from eir_server.diameter.codec import CHILDREN, CODE, FLAG_P, FLAG_T, Message, decode, validate
from eir_server.diameter.connection import AppRequest, Connection, PeerConfig
from eir_server.diameter.dedup import DuplicateCache
from eir_server.diameter.dictionary import load_dictionary
from eir_server.obs.metrics import Metrics
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
from eir_server.s13.handler import PendingLookup, Rejected, S13Handler
from eir_server.service import CheckService
from eir_server.store import MemoryStore
from tests.diameter.builders import cer, ecr, proxy_info

D = load_dictionary()
ME = Identity("eir.localdomain", "localdomain", 7)
ECA_GRAMMAR = D.compiled.answer(16777252, 324)
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


def ecr_message(frame: bytes) -> Message:
    conn = Connection(PeerConfig(ME), D, 0.0, "192.0.2.1", rng=random.Random(0))
    conn.receive_data(cer(), 0.0)
    conn.data_to_send()
    conn.events()
    conn.receive_data(frame, 0.0)
    (ev,) = conn.events()
    assert isinstance(ev, AppRequest)
    return ev.message


class Audit:
    def __init__(self) -> None:
        self.records: list[tuple[CheckRequest, Verdict, str, str]] = []

    def __call__(self, req: CheckRequest, verdict: Verdict, peer: str, interface: str) -> None:
        self.records.append((req, verdict, peer, interface))


def handler(chk: Any = None, dedup: DuplicateCache | None = None,
            max_in_flight: int = 10_000) -> tuple[S13Handler, Metrics, Audit]:
    metrics = Metrics()
    audit = Audit()
    service = CheckService(chk if chk is not None else checker(), metrics, audit, max_in_flight)
    h = S13Handler(ME, D, service, dedup if dedup is not None else DuplicateCache(), metrics)
    return h, metrics, audit


def run(frame: bytes, unknown: EquipmentStatus | None = EquipmentStatus.WHITELISTED) -> bytes:
    h, _, _ = handler(checker(unknown))
    out = h.handle(ecr_message(frame), 0.0, "mme1.epc.test")
    if isinstance(out, Rejected):
        return out.answer
    assert isinstance(out, bytes)
    return out


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


def test_terminal_information_without_imei_is_rejected_with_an_event_to_log() -> None:
    from eir_server.diameter.codec import grouped_avp, str_avp
    h, metrics, audit = handler()
    frame = ecr(hbh=77, terminal=grouped_avp(1401, [str_avp(1403, "01", 10415)], 10415))
    out = h.handle(ecr_message(frame), 0.0, "mme1")
    assert isinstance(out, Rejected)
    assert (out.event.result_code, out.event.command, out.event.hop_by_hop) == (5005, 324, 77)
    assert u32(decode(out.answer, D), 268) == 5005
    assert audit.records == [] and not metrics.verdicts


def test_a_command_other_than_ecr_is_3001() -> None:
    h, _, _ = handler()
    msg = ecr_message(ecr())
    msg.code = 325
    out = h.handle(msg, 0.0, "mme1")
    assert isinstance(out, Rejected) and out.event.result_code == 3001
    m = decode(out.answer, D)
    assert u32(m, 268) == 3001 and m.flags & 0x20  # E bit: a protocol error


def test_verdicts_are_counted_audited_and_timed() -> None:
    h, metrics, audit = handler()
    out = h.handle(ecr_message(ecr(imei=BLACK, imsi="001010000000001")), 5.0, "mme1.epc.test")
    assert isinstance(out, bytes)
    assert metrics.requests[("s13", "ECR", "2001")] == 1
    assert metrics.verdicts[(EquipmentStatus.BLACKLISTED, "national_blacklist")] == 1
    ((req, verdict, peer, interface),) = audit.records
    assert (req.imei, req.imsi, peer, interface) == (BLACK, "001010000000001", "mme1.epc.test",
                                                     "s13")
    assert verdict.status is EquipmentStatus.BLACKLISTED
    # Answers of one batch are timed once, when the shell has written them.
    assert h.answered_now == 1
    h.observe_latency(0.0002)
    assert h.answered_now == 0 and sum(metrics.latency_s13.counts) == 1
    assert metrics.latency_s13.sum == 0.0002


def test_t_flag_replay_is_byte_identical_except_hop_by_hop() -> None:
    """The answer is rebuilt from the cached outcome even if the register changed since."""
    store = MemoryStore()
    chk = EquipmentChecker(Policy(PolicyConfig()), store, today=lambda: "20260101")
    h, metrics, audit = handler(chk, DuplicateCache(window=240.0))
    original = h.handle(ecr_message(ecr(hbh=10, e2e=99, imei=GREY)), 0.0, "mme1")
    assert isinstance(original, bytes) and u32(decode(original, D), 1445, 10415) == 0
    store.put(GREY, ImeiRecord(blacklist=BlacklistEntry("20200101")))  # the register changes
    retx = ecr(hbh=11, e2e=99, imei=GREY, flags=0x80 | FLAG_P | FLAG_T)
    again = h.handle(ecr_message(retx), 200.0, "mme1")
    assert isinstance(again, bytes)
    assert again[:12] == original[:12] and again[16:] == original[16:]
    assert again[12:16] != original[12:16]
    assert metrics.requests[("s13", "ECR", "duplicate")] == 1 and len(audit.records) == 1
    # Without the T flag the same end-to-end id is a new request.
    fresh = h.handle(ecr_message(ecr(hbh=12, e2e=99, imei=GREY)), 201.0, "mme1")
    assert isinstance(fresh, bytes) and u32(decode(fresh, D), 1445, 10415) == 1
    # Outside the window a T-flagged retransmission is evaluated again.
    store.put(GREY, None)
    late = h.handle(ecr_message(retx), 201.0 + 241.0, "mme1")
    assert isinstance(late, bytes) and u32(decode(late, D), 1445, 10415) == 0


class WaitingChecker:
    """A store that must be asked for every IMEI: the checker hands back a pending lookup."""

    def __init__(self) -> None:
        self.asked: list[CheckRequest] = []

    def check(self, req: CheckRequest) -> object:
        self.asked.append(req)
        return ("lookup", req.imei)


def test_pending_lookup_then_overload_gate_answers_3004() -> None:
    chk = WaitingChecker()
    h, metrics, audit = handler(chk, max_in_flight=1)
    first = h.handle(ecr_message(ecr(hbh=1, imei=BLACK)), 1.0, "mme1")
    assert isinstance(first, PendingLookup) and first.lookup == ("lookup", BLACK)
    assert h.service.in_flight == 1
    busy = h.handle(ecr_message(ecr(hbh=2, imei=GREY)), 1.5, "mme1")
    assert isinstance(busy, bytes)
    m = decode(busy, D)
    assert (m.hop_by_hop, u32(m, 268)) == (2, 3004) and m.flags & 0x20
    assert metrics.requests[("s13", "ECR", "3004")] == 1 and metrics.protocol_errors[3004] == 1
    assert len(chk.asked) == 1, "a refused request never reaches the store"
    # The lookup completes 30 ms later: answered, counted, audited, timed from its receipt.
    eca = h.complete(first, Verdict(EquipmentStatus.BLACKLISTED, "national_blacklist"), 1.03)
    m = decode(eca, D)
    assert (m.hop_by_hop, u32(m, 268), u32(m, 1445, 10415)) == (1, 2001, 1)
    assert h.service.in_flight == 0 and len(audit.records) == 1
    assert metrics.latency_s13.counts[metrics.latency_s13.bounds.index(0.05)] == 1
    # An abandoned lookup (its connection went away) frees its place without an answer.
    again = h.handle(ecr_message(ecr(hbh=3, imei=GREY)), 2.0, "mme1")
    assert isinstance(again, PendingLookup) and h.service.in_flight == 1
    h.abandon(again)
    assert h.service.in_flight == 0 and len(audit.records) == 1


def test_duplicate_of_a_pending_lookup_is_evaluated_again() -> None:
    """Only answered requests are remembered: a retransmission that arrives while the first
    copy still waits for the store is looked up too (both get the same kind of answer)."""
    h, _, _ = handler(WaitingChecker())
    first = h.handle(ecr_message(ecr(hbh=1, e2e=5, imei=BLACK)), 1.0, "mme1")
    retx = h.handle(ecr_message(ecr(hbh=2, e2e=5, imei=BLACK, flags=0x80 | FLAG_P | FLAG_T)),
                    1.1, "mme1")
    assert isinstance(first, PendingLookup) and isinstance(retx, PendingLookup)


def test_duplicate_cache_is_bounded() -> None:
    cache: DuplicateCache = DuplicateCache(window=240.0, max_entries=100)
    for i in range(1000):
        cache.put(b"h", i, i % 3, float(i) / 1000)
    assert len(cache) <= 100
    assert cache.get(b"h", 999, 1.0) == 0 and cache.get(b"h", 0, 1.0) is None


def test_checker_malformed_imei_uses_policy() -> None:
    v = checker().check(CheckRequest("12AB"))
    assert isinstance(v, Verdict) and v.rule == "malformed"

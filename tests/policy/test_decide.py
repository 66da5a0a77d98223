"""Table-driven tests for every rule of the precedence order and their interactions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eir_server.policy import (
    PRECEDENCE,
    RULES,
    BlacklistEntry,
    CheckRequest,
    EquipmentStatus,
    ExceptionEntry,
    ImeiRecord,
    LocalLists,
    NotificationEntry,
    Policy,
    PolicyConfig,
    SvnRule,
    TacDatabase,
    luhn_check_digit,
)
from eir_server.policy.engine import BLACKLIST_VERDICTS_MAX
from eir_server.policy.types import Verdict

W, G, B = EquipmentStatus.WHITELISTED, EquipmentStatus.GREYLISTED, EquipmentStatus.BLACKLISTED
TODAY = "20250615"
IMSI_A, IMSI_B = "001010000000001", "001010000000002"
MSISDN_1, MSISDN_2 = "491700000001", "491700000002"

PHONE = "35209900176148"        # allocated TAC, not listed anywhere locally
PHONE15 = PHONE + luhn_check_digit(PHONE)
SVN_DEV = "49015420323751"      # TAC with SVN rule 01-02 -> blacklisted
BARRED_DEV = "86123400000001"
LAB_BARRED = "86123400555555"   # local white inside the barred TAC
RANGE_DEV = "35332811012345"    # inside the local grey range
UNALLOC = "99887766123456"
LOCAL_BLACK = "35209900000017"
LOCAL_WHITE = "35209900000025"
BADCD_OVERRIDE = "35209900000033"  # local white; received with a wrong check digit below


def wrong_cd(body: str) -> str:
    return body + str((int(luhn_check_digit(body)) + 1) % 10 or 2)


BL_PAST = ImeiRecord(blacklist=BlacklistEntry("20240101", ("stolen",)))
BL_TODAY = ImeiRecord(blacklist=BlacklistEntry(TODAY, ("stolen",)))
BL_FUTURE = ImeiRecord(blacklist=BlacklistEntry("20991231", ("stolen",)))
NOTE_GRACE = ImeiRecord(notifications=(NotificationEntry(IMSI_A, MSISDN_1, "20250701",
                                                         ("duplicate IMEI",)),))
NOTE_PAST = ImeiRecord(notifications=(NotificationEntry(IMSI_A, MSISDN_1, "20250601",
                                                        ("duplicate IMEI",)),))
NOTE_TODAY = ImeiRecord(notifications=(NotificationEntry(IMSI_A, MSISDN_1, TODAY),))
NOTE_TWO = ImeiRecord(notifications=(NotificationEntry(IMSI_A, MSISDN_1, "20250901"),
                                     NotificationEntry(IMSI_B, MSISDN_2, "20250701")))
NOTE_AMNESTY = ImeiRecord(notifications=(NotificationEntry(IMSI_A, MSISDN_1, "20250701", (),
                                                           amnesty_granted=True),))
PAIRED_BL = ImeiRecord(blacklist=BlacklistEntry("20240101", ("stolen",)),
                       exceptions=(ExceptionEntry(IMSI_A), ExceptionEntry(IMSI_B)))
PAIRED_BL_MSISDN = ImeiRecord(blacklist=BlacklistEntry("20240101"),
                              exceptions=(ExceptionEntry(IMSI_A, MSISDN_1),))
PAIRED_NOTE = ImeiRecord(notifications=NOTE_PAST.notifications,
                         exceptions=(ExceptionEntry(IMSI_A),))
PAIR_ONLY = ImeiRecord(exceptions=(ExceptionEntry(IMSI_A),))
BL_AND_NOTE = ImeiRecord(blacklist=BlacklistEntry("20240101", ("stolen",)),
                         notifications=NOTE_GRACE.notifications)


@dataclass(frozen=True)
class Case:
    id: str
    req: CheckRequest
    expected: tuple[EquipmentStatus | None, str]
    record: ImeiRecord | None = None
    config: dict[str, Any] = field(default_factory=dict)
    reasons_contain: tuple[str, ...] = ()


def R(imei: str, svn: str | None = None, imsi: str | None = None,
      msisdn: str | None = None) -> CheckRequest:
    return CheckRequest(imei, svn, imsi, msisdn)


BASE = {"unallocated_tac": G}

CASES = [
    # 1. malformed, unusable identity
    Case("non_digit", R("35209900x76148"), (G, "malformed"), reasons_contain=("non_digit",)),
    Case("bad_length", R("3520990017614"), (G, "malformed"), reasons_contain=("bad_length",)),
    Case("non_digit_ignores_record", R("35209900x76148", imsi=IMSI_A), (G, "malformed"),
         record=PAIR_ONLY),
    Case("malformed_configured_black", R("abc"), (B, "malformed"), config={"malformed": B}),
    Case("malformed_configured_unknown", R("abc"), (None, "malformed"),
         config={"malformed": None}),
    # 3. malformed with a readable body
    Case("bad_check_digit", R(wrong_cd(PHONE)), (G, "malformed"),
         reasons_contain=("bad_check_digit",)),
    Case("zero_tac", R("00000000123456"), (G, "malformed"), reasons_contain=("zero_tac",)),
    Case("test_tac", R("00123456123456"), (G, "malformed"), reasons_contain=("test_tac",)),
    Case("test_tac_imeisv", R("0012345612345601"), (G, "malformed"),
         reasons_contain=("test_tac",)),
    Case("test_tac_off", R("00123456123456"), (W, "default"),
         config={"test_tacs": (), "unallocated_tac": None}),
    Case("zero_spare_digit_accepted", R(PHONE + "0"), (W, "default")),
    Case("zero_spare_digit_refused", R(PHONE + "0"), (G, "malformed"),
         config={"accept_zero_spare_digit": False}),
    Case("luhn_off", R(wrong_cd(PHONE)), (W, "default"), config={"check_luhn": False}),
    Case("luhn_off_non_digit", R("35209900176148x"), (G, "malformed"),
         config={"check_luhn": False}),
    Case("bad_check_digit_ignores_record", R(wrong_cd(PHONE)), (G, "malformed"), record=BL_PAST),
    # malformed + operator override (the body is readable, local lists come first)
    Case("bad_check_digit_local_white", R(wrong_cd(BADCD_OVERRIDE)), (W, "local_white"),
         reasons_contain=("bad check digit we accept",)),
    Case("test_tac_local_white_prefix", R("00100100123456"), (W, "local_white"),
         reasons_contain=("001001*: our lab's test handsets",)),
    Case("non_digit_cannot_be_overridden", R("0010010012345x"), (G, "malformed")),
    # 2. operator-local lists
    Case("local_black_exact", R(LOCAL_BLACK), (B, "local_black"),
         reasons_contain=("35209900000017: stolen: operator ticket 4711",)),
    Case("local_black_15_digit", R(LOCAL_BLACK + luhn_check_digit(LOCAL_BLACK)),
         (B, "local_black")),
    Case("local_black_imeisv", R(LOCAL_BLACK + "05"), (B, "local_black")),
    Case("local_black_beats_exception_pair", R(LOCAL_BLACK, imsi=IMSI_A), (B, "local_black"),
         record=PAIR_ONLY),
    Case("local_white_beats_national_blacklist", R(LOCAL_WHITE), (W, "local_white"),
         record=BL_PAST),
    Case("local_grey_range", R(RANGE_DEV), (G, "local_grey"),
         reasons_contain=("35332811000000-35332811099999: batch under investigation, NOC-12",)),
    Case("local_grey_range_end_inclusive", R("35332811099999"), (G, "local_grey")),
    Case("outside_local_range", R("35332811100000"), (W, "default")),
    Case("local_white_beats_barred_tac", R(LAB_BARRED), (W, "local_white")),
    # 4. exception pair
    Case("blacklisted_paired_imsi", R(PHONE, imsi=IMSI_A), (W, "exception_pair"),
         record=PAIRED_BL, reasons_contain=("overrides national_blacklist",)),
    Case("blacklisted_second_paired_imsi", R(PHONE, imsi=IMSI_B), (W, "exception_pair"),
         record=PAIRED_BL),
    Case("blacklisted_unpaired_imsi", R(PHONE, imsi="001010000000099"),
         (B, "national_blacklist"), record=PAIRED_BL),
    Case("blacklisted_pair_no_imsi", R(PHONE), (B, "national_blacklist"), record=PAIRED_BL),
    Case("pair_msisdn_matches", R(PHONE, imsi=IMSI_A, msisdn=MSISDN_1), (W, "exception_pair"),
         record=PAIRED_BL_MSISDN),
    Case("pair_msisdn_absent_in_request", R(PHONE, imsi=IMSI_A), (W, "exception_pair"),
         record=PAIRED_BL_MSISDN),
    Case("pair_msisdn_differs", R(PHONE, imsi=IMSI_A, msisdn=MSISDN_2),
         (B, "national_blacklist"), record=PAIRED_BL_MSISDN),
    Case("notification_blocked_paired", R(PHONE, imsi=IMSI_A), (W, "exception_pair"),
         record=PAIRED_NOTE, reasons_contain=("overrides notification_blocked",)),
    Case("barred_tac_paired", R(BARRED_DEV, imsi=IMSI_A), (W, "exception_pair"),
         record=PAIR_ONLY, reasons_contain=("overrides tac_barred",)),
    Case("unknown_default_paired", R(PHONE, imsi=IMSI_A), (W, "exception_pair"),
         record=PAIR_ONLY, config={"unknown_equipment": None},
         reasons_contain=("overrides default",)),
    Case("pair_not_needed", R(PHONE, imsi=IMSI_A), (W, "default"), record=PAIR_ONLY),
    # 5. national blacklist
    Case("national_blacklist", R(PHONE15), (B, "national_blacklist"), record=BL_PAST,
         reasons_contain=("block_date 20240101", "stolen")),
    Case("national_blacklist_from_block_date", R(PHONE), (B, "national_blacklist"),
         record=BL_TODAY),
    Case("national_blacklist_not_yet", R(PHONE), (W, "default"), record=BL_FUTURE),
    Case("national_blacklist_beats_notification", R(PHONE, imsi=IMSI_A),
         (B, "national_blacklist"), record=BL_AND_NOTE),
    Case("national_blacklist_beats_barred_tac", R(BARRED_DEV), (B, "national_blacklist"),
         record=BL_PAST),
    # 6. notification list
    Case("notification_grace", R(PHONE, imsi=IMSI_A), (G, "notification_grace"),
         record=NOTE_GRACE, reasons_contain=("grace period until 20250701", "duplicate IMEI")),
    Case("notification_past_date", R(PHONE, imsi=IMSI_A), (B, "notification_blocked"),
         record=NOTE_PAST, reasons_contain=("block_date 20250601 reached",)),
    Case("notification_on_block_date", R(PHONE), (B, "notification_blocked"),
         record=NOTE_TODAY),
    Case("notification_earliest_grace_shown", R(PHONE), (G, "notification_grace"),
         record=NOTE_TWO, reasons_contain=("grace period until 20250701",)),
    Case("notification_amnesty", R(PHONE), (G, "notification_grace"), record=NOTE_AMNESTY,
         reasons_contain=("amnesty granted",)),
    Case("notification_grace_notify_only", R(PHONE), (W, "notification_grace"),
         record=NOTE_GRACE, config={"notification_grace": W}),
    Case("notification_soft_block", R(PHONE), (G, "notification_blocked"), record=NOTE_PAST,
         config={"notification_blocked": G}),
    Case("notification_other_imsi_device_scope", R(PHONE, imsi=IMSI_B),
         (B, "notification_blocked"), record=NOTE_PAST),
    Case("notification_other_imsi_imsi_scope", R(PHONE, imsi=IMSI_B), (W, "default"),
         record=NOTE_PAST, config={"notification_match_imsi": True}),
    Case("notification_same_imsi_imsi_scope", R(PHONE, imsi=IMSI_A),
         (B, "notification_blocked"), record=NOTE_PAST, config={"notification_match_imsi": True}),
    Case("notification_grace_beats_barred_tac", R(BARRED_DEV), (G, "notification_grace"),
         record=NOTE_GRACE),
    # 7-9. TAC rules
    Case("tac_barred", R(BARRED_DEV), (B, "tac_barred"),
         reasons_contain=("TAC 86123400: counterfeit model",)),
    Case("tac_barred_beats_svn", R(BARRED_DEV, svn="01"), (B, "tac_barred")),
    Case("config_barred_tac", R(PHONE), (B, "tac_barred"),
         config={"barred_tacs": ("35209900",)}),
    Case("svn_rule_software_version", R(SVN_DEV, svn="02"), (B, "svn_rule"),
         reasons_contain=("TAC 49015420 SVN 02: vulnerable firmware",)),
    Case("svn_rule_imeisv", R(SVN_DEV + "01"), (B, "svn_rule")),
    Case("svn_rule_explicit_svn_wins_over_imeisv", R(SVN_DEV + "01", svn="07"), (W, "default")),
    Case("svn_rule_other_svn", R(SVN_DEV, svn="03"), (W, "default")),
    Case("svn_rule_no_svn", R(SVN_DEV), (W, "default")),
    Case("config_svn_rule", R(PHONE, svn="09"), (G, "svn_rule"),
         config={"svn_rules": (SvnRule("35209900", frozenset({"09"}), G),)}),
    Case("tac_unallocated", R(UNALLOC), (G, "tac_unallocated")),
    Case("tac_unallocated_imeisv", R(UNALLOC + "01"), (G, "tac_unallocated")),
    Case("tac_unallocated_off", R(UNALLOC), (W, "default"), config={"unallocated_tac": None}),
    Case("tac_unallocated_with_record", R(UNALLOC), (G, "tac_unallocated"), record=BL_FUTURE),
    # 10. default
    Case("default", R(PHONE15), (W, "default")),
    Case("default_unknown", R(PHONE), (None, "default"), config={"unknown_equipment": None}),
    Case("default_black", R(PHONE), (B, "default"), config={"unknown_equipment": B}),
    Case("default_empty_record", R(PHONE), (W, "default"), record=ImeiRecord()),
]


@pytest.fixture
def build(local: LocalLists, tacdb: TacDatabase):
    def make(overrides: dict[str, Any]) -> Policy:
        return Policy(PolicyConfig(**{**BASE, **overrides}), local, tacdb)
    return make


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decide(case: Case, build) -> None:
    v = build(case.config).decide(case.req, case.record, TODAY)
    assert (v.status, v.rule) == case.expected
    for fragment in case.reasons_contain:
        assert any(fragment in r for r in v.reasons), (fragment, v.reasons)


def test_every_rule_is_exercised() -> None:
    rules = {c.expected[1] for c in CASES}
    assert rules == set(RULES) == set(PRECEDENCE)


def test_no_sources_at_all() -> None:
    p = Policy()
    assert p.decide(R(PHONE15), None, TODAY).rule == "default"
    assert p.decide(R(UNALLOC), None, TODAY).rule == "default"  # no TAC database: rule off
    assert p.decide(R(PHONE), BL_PAST, TODAY).rule == "national_blacklist"


def test_unallocated_needs_allocation_data() -> None:
    rules_only = TacDatabase(None, barred=["86123400"])
    p = Policy(PolicyConfig(unallocated_tac=B), None, rules_only)
    assert p.decide(R(UNALLOC), None, TODAY).rule == "default"
    assert p.decide(R(BARRED_DEV), None, TODAY).rule == "tac_barred"


def test_common_paths_return_shared_verdicts(build) -> None:
    # Allocation-lean: the no-record paths hand out precomputed Verdict objects.
    p = build({})
    assert p.decide(R(PHONE), None, TODAY) is p.decide(R("35209900999998"), None, TODAY)
    assert p.decide(R(UNALLOC), None, TODAY) is p.decide(R("99887766000000"), None, TODAY)
    assert p.decide(R(wrong_cd(PHONE)), None, TODAY) is p.decide(
        R(wrong_cd("35209900999998")), None, TODAY)
    assert p.decide(R(LOCAL_BLACK), None, TODAY) is p.decide(R(LOCAL_BLACK + "01"), None, TODAY)


def test_wide_local_ranges_still_match(tacdb: TacDatabase) -> None:
    # A range spanning more TACs than the index flags switches to an unconditional bisect.
    local = LocalLists.parse_csv(["grey,3*,,whole reporting body", "black,35209900176148,,x",
                                  "white,35209900000000,35209900099999,y"])
    p = Policy(PolicyConfig(), local, tacdb)
    assert p._ranges_everywhere
    assert p.decide(R(PHONE), None, TODAY).rule == "local_black"
    assert p.decide(R("35209900012345"), None, TODAY).rule == "local_white"
    assert p.decide(R("39999999999999"), None, TODAY).rule == "local_grey"
    assert p.decide(R("49015420323751"), None, TODAY).rule == "default"


_body = st.text(alphabet="0123456789", min_size=14, max_size=14)
_tac = st.sampled_from(["35209900", "49015420", "86123400", "35332811", "99887766", "00100100",
                        "00000000", "35209901"])


_PROP_POLICY = Policy(
    PolicyConfig(unallocated_tac=G),
    LocalLists.parse_csv(["black,35209900100000,35209900199999,r", "white,001001*,,lab"]),
    TacDatabase(["35209900", "49015420", "86123400"], barred=["86123400"],
                svn_rules=[SvnRule("49015420", frozenset({"01"}), B)]),
)


@given(_tac, st.text(alphabet="0123456789", min_size=6, max_size=6),
       st.sampled_from(["01", "07"]),
       st.sampled_from([None, BL_PAST, NOTE_GRACE, PAIRED_BL, PAIR_ONLY]),
       st.sampled_from([None, IMSI_A]))
def test_all_forms_of_one_device_get_one_verdict(tac, snr, svn, record, imsi) -> None:
    # 14-digit, 15-digit (Luhn), PEI and IMEISV forms of one device with one SVN must be
    # decided identically; this also pins the inlined fast paths to the slow normaliser.
    body = tac + snr
    cd = luhn_check_digit(body)
    forms = [CheckRequest(body, svn, imsi), CheckRequest(body + cd, svn, imsi),
             CheckRequest(body + svn, None, imsi), CheckRequest(f"imei-{body}{cd}", svn, imsi),
             CheckRequest(f"imeisv-{body}{svn}", None, imsi)]
    verdicts = {_PROP_POLICY.decide(r, record, TODAY) for r in forms}
    assert len(verdicts) == 1, verdicts
    key = _PROP_POLICY.imei_key(body + cd)
    assert key in (body, None)


@given(st.lists(st.tuples(st.sampled_from(["20200101", "20250614", TODAY, "20990101"]),
                          st.lists(st.sampled_from(["stolen", "lost", "fraud"]), max_size=2)),
                max_size=30))
def test_blacklist_verdicts_are_memoized_by_value(entries: list[tuple[str, list[str]]]) -> None:
    """The memo of blacklist verdicts gives what building each one would, and stays bounded."""
    policy = Policy(PolicyConfig())
    for date, reasons in entries:
        rec = ImeiRecord(blacklist=BlacklistEntry(date, tuple(reasons)))
        got = policy.decide(CheckRequest("35209900176148"), rec, TODAY)
        if date <= TODAY:
            assert got == Verdict(B, "national_blacklist", (f"block_date {date}", *reasons))
        else:
            assert got.rule != "national_blacklist"


def test_blacklist_verdict_memo_is_bounded() -> None:
    policy = Policy(PolicyConfig())
    for i in range(BLACKLIST_VERDICTS_MAX + 10):
        rec = ImeiRecord(blacklist=BlacklistEntry("20200101", (f"case {i}",)))
        assert policy.decide(CheckRequest("35209900176148"), rec, TODAY).reasons[1] == f"case {i}"
    assert len(policy._v_blacklist) <= BLACKLIST_VERDICTS_MAX

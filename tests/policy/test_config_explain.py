"""PolicyConfig.from_mapping validation, explain() text and CLI exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from eir_server.policy import (
    BlacklistEntry,
    CheckRequest,
    EquipmentStatus,
    ExceptionEntry,
    ImeiRecord,
    LoadError,
    Policy,
    PolicyConfig,
    SvnRule,
    TacDatabase,
    TacInfo,
    Verdict,
    exit_code_for,
    explain,
    load_policy,
)

W, G, B = EquipmentStatus.WHITELISTED, EquipmentStatus.GREYLISTED, EquipmentStatus.BLACKLISTED


def test_defaults_are_permissive() -> None:
    c = PolicyConfig()
    assert c.unknown_equipment is W and c.malformed is G and c.unallocated_tac is None
    assert c.notification_grace is G and c.notification_blocked is B
    assert c.check_luhn and c.accept_zero_spare_digit and c.test_tacs == ("00",)
    assert PolicyConfig.from_mapping({}) == c


def test_from_mapping_full() -> None:
    c = PolicyConfig.from_mapping({
        "unknown_equipment": "unknown",
        "malformed": "Blacklisted",
        "unallocated_tac": "greylisted",
        "notification_grace": "whitelisted",
        "notification_match_imsi": True,
        "check_luhn": False,
        "test_tacs": ["001", "00"],
        "barred_tacs": ["86123400"],
        "svn_rules": [{"tac": "49015420", "svn": ["01", "03-05"], "status": "greylisted",
                       "reason": "old firmware"}, {"tac": "35209900", "svn": "07"}],
        "tac_database_file": "/etc/eir/tac.txt",
    })
    assert c.unknown_equipment is None and c.malformed is B and c.unallocated_tac is G
    assert c.notification_grace is W and c.notification_match_imsi and not c.check_luhn
    assert c.svn_rules == (
        SvnRule("49015420", frozenset({"01", "03", "04", "05"}), G, "old firmware"),
        SvnRule("35209900", frozenset({"07"}), B, ""),
    )
    assert PolicyConfig.from_mapping(c.to_mapping()) == c


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"unknown_equipmnet": "whitelisted"}, "unknown key.*unknown_equipmnet"),
        ({"malformed": "red"}, "policy.malformed: expected one of"),
        ({"unallocated_tac": "unknown"}, "policy.unallocated_tac"),
        ({"check_luhn": "yes"}, "policy.check_luhn: expected true or false"),
        ({"test_tacs": "00"}, "policy.test_tacs: expected a list"),
        ({"test_tacs": ["0x"]}, "test_tacs: entries must be 1-8 digit"),
        ({"barred_tacs": ["1234567"]}, "barred_tacs: entries must be 8-digit"),
        ({"svn_rules": [{"tac": "49015420"}]}, r"svn_rules\[0\]: 'tac' and 'svn' are required"),
        ({"svn_rules": [{"tac": "49015420", "svn": ["1"]}]}, r"svn_rules\[0\]: SVN must be"),
        ({"svn_rules": [{"tac": "4901542", "svn": ["01"]}]}, "TAC must be 8 digits"),
        ({"svn_rules": [{"tac": "49015420", "svn": "01", "x": 1}]}, "unknown key"),
        ({"local_lists_file": 3}, "expected a file path"),
    ],
)
def test_from_mapping_rejects(mapping: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PolicyConfig.from_mapping(mapping)


def test_exit_codes() -> None:
    assert [exit_code_for(Verdict(s, "default")) for s in (W, B, G, None)] == [0, 1, 2, 3]


def test_explain_blacklisted() -> None:
    tacs = TacDatabase({"35209900": TacInfo("Apple", "iPhone X")})
    policy = Policy(PolicyConfig(), None, tacs)
    req = CheckRequest("352099001761481", "23", "001010000000001")
    v = policy.decide(req, ImeiRecord(blacklist=BlacklistEntry("20240101", ("stolen",))),
                      "20250615")
    text = explain(v, req, tacs=tacs)
    assert text.splitlines() == [
        "IMEI      352099001761481 -> 35209900176148 (TAC 35209900, SNR 176148, "
        "check digit 1 ok)",
        "SVN       23",
        "IMSI      001010000000001",
        "Device    Apple iPhone X",
        "Verdict   BLACKLISTED (exit 1)",
        "Rule      national_blacklist: national blacklist, in force from its block_date",
        "Reasons   block_date 20240101",
        "          stolen",
    ]


def test_explain_malformed_pair_and_unknown() -> None:
    p = Policy(PolicyConfig(unknown_equipment=None))
    req = CheckRequest("352099001761482")
    text = explain(p.decide(req, None, "20250615"), req)
    assert "check digit 2 expected 1" in text and "Rule      malformed" in text
    bad = CheckRequest("35x")
    assert "malformed: contains characters other than ASCII digits" in explain(
        p.decide(bad, None, "20250615"), bad)
    req = CheckRequest("35209900176148", imsi="001010000000001")
    rec = ImeiRecord(exceptions=(ExceptionEntry("001010000000001"),))
    text = explain(p.decide(req, rec, "20250615"), req)
    assert "WHITELISTED (exit 0)" in text and "overrides default" in text
    unknown = explain(p.decide(CheckRequest("35209900176148"), None, "20250615"),
                      CheckRequest("35209900176148"))
    assert "UNKNOWN (exit 3)" in unknown


def test_load_policy_reads_files(tmp_path: Path) -> None:
    (tmp_path / "local.csv").write_text("black,35209900176148,,stolen\n")
    (tmp_path / "tac.txt").write_text("TAC|Manufacturer\n35209900|Apple\nxx|bad\n")
    cfg = PolicyConfig(local_lists_file=str(tmp_path / "local.csv"),
                       tac_database_file=str(tmp_path / "tac.txt"), unallocated_tac=G)
    p = load_policy(cfg)
    assert p.decide(CheckRequest("35209900176148"), None, "20250615").rule == "local_black"
    assert p.decide(CheckRequest("49015420323751"), None, "20250615").rule == "tac_unallocated"
    assert p.tacs is not None and [b.line for b in p.tacs.bad_lines] == [3]
    (tmp_path / "local.csv").write_text("black,nope\n")
    with pytest.raises(LoadError):
        load_policy(cfg)

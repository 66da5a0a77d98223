"""IMEI normalisation: table of forms, Luhn, and hypothesis properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eir_server.policy import (
    Malformed,
    NormalizedImei,
    Policy,
    PolicyConfig,
    luhn_check_digit,
    normalize_imei,
)


def luhn_ref(body: str) -> str:
    """Textbook Luhn: double every second digit from the right of body+check."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:  # rightmost body digit is doubled once the check digit is appended
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


bodies = st.text(alphabet="0123456789", min_size=14, max_size=14).filter(
    lambda s: not s.startswith("00000000"))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("35209900176148", NormalizedImei("35209900176148")),
        ("352099001761481", NormalizedImei("35209900176148", "1")),
        ("3520990017614823", NormalizedImei("35209900176148", None, "23")),
        ("490154203237518", NormalizedImei("49015420323751", "8")),
        ("imei-352099001761481", NormalizedImei("35209900176148", "1")),
        ("imei-35209900176148", NormalizedImei("35209900176148")),
        ("imeisv-3520990017614823", NormalizedImei("35209900176148", None, "23")),
        ("352099001761482", Malformed("bad_check_digit", "35209900176148")),
        ("3520990017614", Malformed("bad_length")),
        ("35209900176148231", Malformed("bad_length")),
        ("", Malformed("non_digit")),
        ("35209900x76148", Malformed("non_digit")),
        (" 35209900176148", Malformed("non_digit")),
        ("3520990017614\u00b2", Malformed("non_digit")),  # superscript two: isdigit() is True
        ("\u0663\u0665209900176148", Malformed("non_digit")),  # Arabic-Indic digits
        ("imeisv-352099001761481", Malformed("bad_length")),  # imeisv- needs 16 digits
        ("imei-3520990017614823", Malformed("bad_length")),
        ("IMEI-352099001761481", Malformed("non_digit")),  # prefixes are lower case (TS 29.571)
        ("00000000123456", Malformed("zero_tac", "00000000123456")),
        ("000000000000000", Malformed("zero_tac", "00000000000000")),  # all-zero: Luhn 0 is valid
    ],
)
def test_normalize_table(raw: str, expected: NormalizedImei | Malformed) -> None:
    assert normalize_imei(raw) == expected


def test_luhn_known_values() -> None:
    assert luhn_check_digit("35209900176148") == "1"
    assert luhn_check_digit("49015420323751") == "8"


def test_zero_spare_digit_and_luhn_switches() -> None:
    body = "35209900176148"  # real check digit 1
    assert isinstance(normalize_imei(body + "0"), Malformed)
    assert normalize_imei(body + "0", accept_zero_spare=True) == NormalizedImei(body, "0")
    assert normalize_imei(body + "7", check_luhn=False) == NormalizedImei(body, "7")


@given(bodies)
def test_fast_luhn_matches_reference(body: str) -> None:
    assert luhn_check_digit(body) == luhn_ref(body)


@given(bodies)
def test_body_with_its_luhn_digit_normalises_to_itself(body: str) -> None:
    r = normalize_imei(body + luhn_ref(body))
    assert isinstance(r, NormalizedImei)
    assert r.imei14 == body and r.tac == body[:8] and r.snr == body[8:]
    assert r.imei15 == body + luhn_ref(body)
    assert normalize_imei(body) == NormalizedImei(body)


@given(bodies, st.integers(0, 99))
def test_imeisv_and_imei_of_one_device_agree(body: str, svn: int) -> None:
    sv = normalize_imei(f"{body}{svn:02d}")
    imei = normalize_imei(body + luhn_ref(body))
    assert isinstance(sv, NormalizedImei) and isinstance(imei, NormalizedImei)
    assert sv.imei14 == imei.imei14 and sv.tac == imei.tac
    assert sv.svn == f"{svn:02d}" and imei.svn is None


@given(bodies, st.integers(1, 9))
def test_every_wrong_check_digit_is_caught(body: str, delta: int) -> None:
    wrong = str((int(luhn_ref(body)) + delta) % 10)
    assert normalize_imei(body + wrong) == Malformed("bad_check_digit", body)


@given(bodies, st.integers(0, 13), st.integers(1, 9))
def test_single_digit_substitution_is_caught(body: str, pos: int, delta: int) -> None:
    # Luhn detects every single-digit error: the point of checking it.
    changed = body[:pos] + str((int(body[pos]) + delta) % 10) + body[pos + 1 :]
    r = normalize_imei(changed + luhn_ref(body))
    assert isinstance(r, Malformed)


_raw = st.one_of(
    st.text(alphabet="0123456789", min_size=12, max_size=17),
    st.text(min_size=0, max_size=17),
    bodies.map(lambda b: b + luhn_ref(b)),
    bodies.map(lambda b: "00" + b[2:]),
    bodies.map(lambda b: "imei-" + b + luhn_ref(b)),
    bodies.map(lambda b: b + "0"),
)


@given(_raw)
def test_imei_key_fast_path_agrees_with_normalize(raw: str) -> None:
    for cfg in (PolicyConfig(), PolicyConfig(check_luhn=False, test_tacs=()),
                PolicyConfig(accept_zero_spare_digit=False, test_tacs=("35", "4901"))):
        p = Policy(cfg)
        r = p.normalize(raw)
        assert p.imei_key(raw) == (r.imei14 if isinstance(r, NormalizedImei) else None)


@given(_raw)
def test_identify_agrees_with_normalize(raw: str) -> None:
    """Policy.identify inlines parse_imei's 15-digit case: same body, SVN and reason."""
    for cfg in (PolicyConfig(), PolicyConfig(check_luhn=False, test_tacs=()),
                PolicyConfig(accept_zero_spare_digit=True, test_tacs=("35", "4901"))):
        p = Policy(cfg)
        r = p.normalize(raw)
        body, svn, bad = p.identify(raw)
        if isinstance(r, NormalizedImei):
            assert (body, svn, bad) == (r.imei14, r.svn, None)
        else:
            assert body == r.imei14 and bad is not None
            assert bad.reasons[0].startswith(f"{r.reason}: ")


def test_policy_normalize_applies_test_tacs() -> None:
    p = Policy(PolicyConfig(test_tacs=("001001",)))
    assert p.normalize("00100100123456") == Malformed("test_tac", "00100100123456")
    assert p.imei_key("00100100123456") is None
    assert p.imei_key("35209900176148") == "35209900176148"
    assert Policy(PolicyConfig(test_tacs=())).imei_key("00100100123456") == "00100100123456"

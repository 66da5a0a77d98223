"""IMEI / IMEISV normalisation (3GPP TS 23.003 §6.2).

An IMEI is TAC (8 digits) + SNR (6 digits) + one check or spare digit; an IMEISV is TAC + SNR +
SVN (2 digits), without a check digit. The national (DIRBS) lists and the store are keyed by the
14-digit body TAC+SNR, so every accepted form normalises to that body:

    "35209900176148"      -> imei14 "35209900176148"                  (no check digit)
    "352099001761481"     -> imei14 "35209900176148", check digit "1"  (Luhn verified)
    "3520990017614823"    -> imei14 "35209900176148", svn "23"         (IMEISV, no Luhn)
    "imei-352099001761481" / "imeisv-3520990017614823"                  (TS 29.571 PEI forms)

Anything else is `Malformed` with a short reason code from `MALFORMED_REASONS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import FunctionType
from typing import Final

MALFORMED_REASONS: Final[dict[str, str]] = {
    "non_digit": "contains characters other than ASCII digits",
    "bad_length": "not 14 or 15 digits (IMEI) or 16 digits (IMEISV)",
    "bad_check_digit": "the 15th digit fails the Luhn check",
    "zero_tac": "all-zero TAC",
    "test_tac": "test TAC (policy test_tacs)",
}

# Codes for which the 14-digit body is still known, so operator-local lists can override them.
BODY_KNOWN: Final = frozenset({"bad_check_digit", "zero_tac", "test_tac"})

ZERO_TAC: Final = "00000000"


# Luhn over the 14-digit body's bytes: digits at even offsets count as they are, those at odd
# offsets doubled (they sit at even positions counted from the right once the check digit is
# appended), both summed in C. No large tables: the previous version read 1.7 MB of lists at
# random, and the cache misses cost more on the request path than the arithmetic saved.
_DOUBLED: Final[bytes] = bytes.maketrans(  # "d" -> the digit sum of 2*d, as a byte value
    b"0123456789", bytes(2 * d - 9 if d > 4 else 2 * d for d in range(10)))
# Check digit by partial sum (max 126): indexing beats `(10 - s % 10) % 10`.
_CHECK_BY_SUM: Final[str] = "".join(str((10 - s % 10) % 10) for s in range(127))
_ZEROS_AT_EVEN_OFFSETS: Final = 7 * ord("0")


def _check_digit(body: str) -> str:
    """Luhn check digit of a 14-digit body already known to be ASCII digits."""
    b = body.encode()
    if _COMPILED:
        # Indexing bytes is a native operation once compiled (~300 instructions here against
        # ~4,000 for the slices, sum() and translate() below); interpreted, it is the slower.
        d = _DOUBLED
        return _CHECK_BY_SUM[b[0] + d[b[1]] + b[2] + d[b[3]] + b[4] + d[b[5]] + b[6] + d[b[7]]
                             + b[8] + d[b[9]] + b[10] + d[b[11]] + b[12] + d[b[13]]
                             - _ZEROS_AT_EVEN_OFFSETS]
    return _CHECK_BY_SUM[sum(b[0::2]) - _ZEROS_AT_EVEN_OFFSETS + sum(b[1::2].translate(_DOUBLED))]


def luhn_check_digit(imei14: str) -> str:
    """The Luhn check digit of a 14-digit IMEI body: luhn_check_digit("35209900176148") == "1"."""
    if not (len(imei14) == 14 and imei14.isascii() and imei14.isdigit()):
        raise ValueError(f"not a 14-digit IMEI body: {imei14!r}")
    return _check_digit(imei14)


# mypyc makes functions builtins: True in the compiled build (see `_check_digit`).
_COMPILED: Final = not isinstance(luhn_check_digit, FunctionType)


@dataclass(frozen=True, slots=True)
class NormalizedImei:
    """A well-formed identity. `check_digit` is the received 15th digit (None for 14-digit and
    IMEISV input); `svn` is the IMEISV's software version (None for IMEI input)."""

    imei14: str
    check_digit: str | None = None
    svn: str | None = None

    @property
    def tac(self) -> str:
        return self.imei14[:8]

    @property
    def snr(self) -> str:
        return self.imei14[8:]

    @property
    def imei15(self) -> str:
        """The IMEI with its computed Luhn check digit, for display."""
        return self.imei14 + luhn_check_digit(self.imei14)


@dataclass(frozen=True, slots=True)
class Malformed:
    """Not a valid identity. `reason` is a key of MALFORMED_REASONS; `imei14` is the 14-digit
    body when it could still be read (bad check digit, zero or test TAC), else None."""

    reason: str
    imei14: str | None = None

    @property
    def description(self) -> str:
        return MALFORMED_REASONS[self.reason]


# (malformed reason or None, 14-digit body or None, received check digit, SVN)
ParsedImei = tuple[str | None, str | None, str | None, str | None]
_NON_DIGIT: ParsedImei = ("non_digit", None, None, None)
_BAD_LENGTH: ParsedImei = ("bad_length", None, None, None)
_ANY_LENGTH: tuple[int, ...] = (14, 15, 16)


def parse_imei(raw: str, check_luhn: bool = True, accept_zero_spare: bool = False) -> ParsedImei:
    """The one IMEI/IMEISV parser (every other entry point wraps it): a plain tuple, because
    it runs once per request. See `normalize_imei` for the rules."""
    s = raw
    want = _ANY_LENGTH
    if s[:1] == "i":  # TS 29.571 PEI prefixes, as N5g-eir carries them
        if s.startswith("imeisv-"):
            s, want = s[7:], (16,)
        elif s.startswith("imei-"):
            s, want = s[5:], (14, 15)
    if not (s.isascii() and s.isdigit()):
        # isascii first: str.isdigit() alone accepts e.g. "²" and Arabic-Indic digits.
        return _NON_DIGIT
    n = len(s)
    if n not in want:
        return _BAD_LENGTH
    body = s[:14]
    if n == 15:
        cd = s[14]
        if (check_luhn and cd != _check_digit(body)
                and not (accept_zero_spare and cd == "0")):
            return ("bad_check_digit", body, cd, None)
        return ("zero_tac" if body.startswith(ZERO_TAC) else None, body, cd, None)
    reason = "zero_tac" if body.startswith(ZERO_TAC) else None
    if n == 16:
        return (reason, body, None, s[14:])
    return (reason, body, None, None)


def normalize_imei(
    raw: str, *, check_luhn: bool = True, accept_zero_spare: bool = False
) -> NormalizedImei | Malformed:
    """Normalise a received IMEI/IMEISV to its 14-digit body.

    check_luhn: verify the 15th digit of a 15-digit IMEI. accept_zero_spare: accept a 15th digit
    "0" without the Luhn check (TS 23.003: the spare digit is 0 when sent by the MS; some cores
    pass it on). All-zero TACs are always malformed; test TACs are a policy setting
    (`Policy.normalize` applies them).
    """
    reason, body, cd, svn = parse_imei(raw, check_luhn, accept_zero_spare)
    if reason is not None:
        return Malformed(reason, body)
    assert body is not None
    return NormalizedImei(body, cd, svn)

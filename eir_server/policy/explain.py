"""Human-readable explanation of a verdict and CLI exit codes (`eir-server check`)."""

from __future__ import annotations

from typing import Final

from .common import status_name
from .imei import Malformed, luhn_check_digit, normalize_imei
from .rules import RULES
from .tac import TacDatabase
from .types import CheckRequest, EquipmentStatus, Verdict

# Exit codes of `eir-server check`: scriptable without parsing text.
EXIT_WHITELISTED: Final = 0
EXIT_BLACKLISTED: Final = 1
EXIT_GREYLISTED: Final = 2
EXIT_UNKNOWN: Final = 3

_EXIT: Final[dict[EquipmentStatus | None, int]] = {
    EquipmentStatus.WHITELISTED: EXIT_WHITELISTED,
    EquipmentStatus.BLACKLISTED: EXIT_BLACKLISTED,
    EquipmentStatus.GREYLISTED: EXIT_GREYLISTED,
    None: EXIT_UNKNOWN,
}


def exit_code_for(verdict: Verdict) -> int:
    """0 whitelisted, 1 blacklisted, 2 greylisted, 3 unknown (status None)."""
    return _EXIT[verdict.status]


def _identity(raw: str) -> str:
    r = normalize_imei(raw, check_luhn=False)
    if isinstance(r, Malformed):
        if r.imei14 is None:
            return f"{raw!r} (malformed: {r.description})"
        return f"{raw} -> {r.imei14} (TAC {r.imei14[:8]}, malformed: {r.description})"
    parts = [f"TAC {r.tac}", f"SNR {r.snr}"]
    if r.svn is not None:
        parts.append(f"SVN {r.svn}")
    if r.check_digit is not None:
        good = luhn_check_digit(r.imei14)
        parts.append(f"check digit {r.check_digit} "
                     + ("ok" if r.check_digit == good else f"expected {good}"))
    return f"{raw} -> {r.imei14} ({', '.join(parts)})"


def explain(verdict: Verdict, req: CheckRequest, *, tacs: TacDatabase | None = None) -> str:
    """Multi-line text for the NOC: identity, verdict, deciding rule and reasons.

    Example:
        IMEI      352099001761481 -> 35209900176148 (TAC 35209900, SNR 176148, check digit 1 ok)
        IMSI      001010123456789
        Verdict   BLACKLISTED (exit 1)
        Rule      national_blacklist: national blacklist, in force from its block_date
        Reasons   block_date 20240101
                  stolen
    """
    lines = [f"IMEI      {_identity(req.imei)}"]
    if req.software_version is not None:
        lines.append(f"SVN       {req.software_version}")
    if req.imsi is not None:
        lines.append(f"IMSI      {req.imsi}")
    if req.msisdn is not None:
        lines.append(f"MSISDN    {req.msisdn}")
    if tacs is not None:
        r = normalize_imei(req.imei, check_luhn=False)
        tac = r.imei14[:8] if r.imei14 is not None else None
        info = tacs.info(tac) if tac else None
        if info is not None:
            lines.append(f"Device    {info.manufacturer} {info.model_name}".rstrip())
        elif tac and tacs.allocations is not None:
            lines.append("Device    TAC not in the GSMA TAC database")
    lines.append(f"Verdict   {status_name(verdict.status).upper()} (exit {exit_code_for(verdict)})")
    lines.append(f"Rule      {verdict.rule}: {RULES.get(verdict.rule, '?')}")
    for i, reason in enumerate(verdict.reasons):
        lines.append(f"{'Reasons' if i == 0 else '':<10}{reason}")
    return "\n".join(lines)

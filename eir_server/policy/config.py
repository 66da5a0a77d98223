"""PolicyConfig: every knob of the verdict policy, with safe defaults, and its dict loader."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .common import parse_status, status_name
from .tac import SvnRule, parse_svns
from .types import EquipmentStatus

W, G, B = EquipmentStatus.WHITELISTED, EquipmentStatus.GREYLISTED, EquipmentStatus.BLACKLISTED


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Policy settings. Defaults favour availability: nothing is blocked unless a list says so.

    unknown_equipment        status for an IMEI no rule matched; None = "unknown" (S13 5422,
                             N5g-eir 404). Default WHITELISTED.
    malformed                status for a malformed identity; None = unknown. Default GREYLISTED
                             (a counterfeit signal to watch, not proof to block on).
    check_luhn               verify the check digit of 15-digit IMEIs. Default True.
    accept_zero_spare_digit  accept a 15th digit "0" unchecked: TS 23.003 says the MS sends the
                             spare digit as 0 and some cores pass it on. Default True.
    test_tacs                TAC prefixes (1-8 digits) treated as malformed test identities.
                             Default ("00",): reporting body 00 is used by test IMEIs, and
                             covers the all-zero TAC (always malformed anyway).
    notification_grace       status while a notified device is before its block_date.
                             Default GREYLISTED; WHITELISTED = notify only.
    notification_blocked     status once the block_date is reached. Default BLACKLISTED.
    notification_match_imsi  apply a notification only when the request's IMSI is the notified
                             one (default False: the notification is about the device).
    unallocated_tac          status for a TAC missing from the GSMA database; None (default)
                             disables the rule. It never fires without a loaded TAC database.
    barred_tacs              8-digit TACs whose devices are BLACKLISTED (tac_barred).
    svn_rules                per-TAC software version rules (svn_rule).
    local_lists_file         optional path of the operator-local CSV (see lists.py).
    tac_database_file        optional path of the GSMA TAC file.
    """

    unknown_equipment: EquipmentStatus | None = W
    malformed: EquipmentStatus | None = G
    check_luhn: bool = True
    accept_zero_spare_digit: bool = True
    test_tacs: tuple[str, ...] = ("00",)
    notification_grace: EquipmentStatus | None = G
    notification_blocked: EquipmentStatus | None = B
    notification_match_imsi: bool = False
    unallocated_tac: EquipmentStatus | None = None
    barred_tacs: tuple[str, ...] = ()
    svn_rules: tuple[SvnRule, ...] = ()
    local_lists_file: str | None = None
    tac_database_file: str | None = None

    def __post_init__(self) -> None:
        for p in self.test_tacs:
            if not (1 <= len(p) <= 8 and p.isascii() and p.isdigit()):
                raise ValueError(f"test_tacs: entries must be 1-8 digit TAC prefixes, got {p!r}")
        for t in self.barred_tacs:
            if not (len(t) == 8 and t.isascii() and t.isdigit()):
                raise ValueError(f"barred_tacs: entries must be 8-digit TACs, got {t!r}")
        for r in self.svn_rules:
            if not isinstance(r, SvnRule):
                raise ValueError(f"svn_rules: expected SvnRule, got {r!r}")

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> PolicyConfig:
        """Build from the `[policy]` TOML table. Statuses are names ("whitelisted", "greylisted",
        "blacklisted", "unknown"; `unallocated_tac` takes "off" instead of "unknown").
        `svn_rules` is a list of tables {tac, svn = ["01", "03-05"], status, reason}.
        Raises ValueError naming the bad key."""
        if not isinstance(d, Mapping):
            raise ValueError(f"[policy] must be a table, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"[policy]: unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"allowed: {', '.join(sorted(known))}")
        kw: dict[str, Any] = {}
        for key, value in d.items():
            what = f"policy.{key}"
            if key in ("unknown_equipment", "malformed", "notification_grace",
                       "notification_blocked"):
                kw[key] = parse_status(value, what)
            elif key == "unallocated_tac":
                off = value is None or (isinstance(value, str) and value.strip().lower() == "off")
                kw[key] = None if off else parse_status(value, what, allow_unknown=False)
            elif key in ("check_luhn", "accept_zero_spare_digit", "notification_match_imsi"):
                if not isinstance(value, bool):
                    raise ValueError(f"{what}: expected true or false, got {value!r}")
                kw[key] = value
            elif key in ("test_tacs", "barred_tacs"):
                if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{what}: expected a list of digit strings, got {value!r}")
                kw[key] = tuple(v.strip() for v in value)
            elif key == "svn_rules":
                kw[key] = tuple(_svn_rule(i, r) for i, r in enumerate(_as_list(value, what)))
            else:  # file paths
                if value is not None and not (isinstance(value, str) and value):
                    raise ValueError(f"{what}: expected a file path string, got {value!r}")
                kw[key] = value
        try:
            return cls(**kw)
        except ValueError as exc:
            raise ValueError(f"[policy]: {exc}") from None

    def to_mapping(self) -> dict[str, Any]:
        """The inverse of from_mapping (for `eir-server config` dumps and round-trip tests)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "unallocated_tac":
                out[f.name] = "off" if v is None else status_name(v)
            elif f.name in ("unknown_equipment", "malformed", "notification_grace",
                            "notification_blocked"):
                out[f.name] = status_name(v)
            elif f.name == "svn_rules":
                out[f.name] = [{"tac": r.tac, "svn": sorted(r.svns), "status": status_name(r.status),
                                "reason": r.reason} for r in v]
            elif isinstance(v, tuple):
                out[f.name] = list(v)
            elif v is not None:
                out[f.name] = v
        return out


def _as_list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"{what}: expected a list, got {value!r}")
    return list(value)


def _svn_rule(i: int, r: object) -> SvnRule:
    what = f"policy.svn_rules[{i}]"
    if isinstance(r, SvnRule):
        return r
    if not isinstance(r, Mapping):
        raise ValueError(f"{what}: expected a table {{tac, svn, status, reason}}, got {r!r}")
    extra = sorted(set(r) - {"tac", "svn", "status", "reason"})
    if extra:
        raise ValueError(f"{what}: unknown key(s) {extra}")
    if "tac" not in r or "svn" not in r:
        raise ValueError(f"{what}: 'tac' and 'svn' are required")
    try:
        svn = r["svn"]
        svns = parse_svns([svn] if isinstance(svn, str) else _as_list(svn, "svn"))
        status = parse_status(r.get("status", "blacklisted"), "status")
        reason = r.get("reason", "")
        if not isinstance(reason, str):
            raise ValueError(f"reason must be a string, got {reason!r}")
        return SvnRule(str(r["tac"]), svns, status, reason)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None

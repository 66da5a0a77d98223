"""Verdict policy: pure decision logic over register records (no I/O on the hot path, no clock).

    policy = Policy(PolicyConfig(), LocalLists.load_csv(path), TacDatabase.load_gsma(path))
    key = policy.imei_key(req.imei)            # 14-digit store key, None if malformed
    record = store.get(key) if key else None   # the store's ImeiRecord | None
    verdict = policy.decide(req, record, "20250131")

See docs/policy.md for the precedence order and every rule.
"""

from .common import STATUS_BY_NAME, BadLine, LoadError, parse_status, status_name
from .config import PolicyConfig
from .engine import Policy, load_policy
from .explain import (
    EXIT_BLACKLISTED,
    EXIT_GREYLISTED,
    EXIT_UNKNOWN,
    EXIT_WHITELISTED,
    exit_code_for,
    explain,
)
from .imei import MALFORMED_REASONS, Malformed, NormalizedImei, luhn_check_digit, normalize_imei
from .lists import LocalEntry, LocalLists, make_entry
from .rules import PRECEDENCE, RULES
from .tac import SvnRule, TacDatabase, TacInfo, parse_svns
from .types import (
    BlacklistEntry,
    CheckRequest,
    EquipmentStatus,
    ExceptionEntry,
    ImeiRecord,
    NotificationEntry,
    Verdict,
)

__all__ = [
    "BadLine", "BlacklistEntry", "CheckRequest", "EXIT_BLACKLISTED", "EXIT_GREYLISTED",
    "EXIT_UNKNOWN", "EXIT_WHITELISTED", "EquipmentStatus", "ExceptionEntry", "ImeiRecord",
    "LoadError", "LocalEntry", "LocalLists", "MALFORMED_REASONS", "Malformed", "NormalizedImei",
    "NotificationEntry", "PRECEDENCE", "Policy", "PolicyConfig", "RULES", "STATUS_BY_NAME",
    "SvnRule", "TacDatabase", "TacInfo", "Verdict", "exit_code_for", "explain", "load_policy",
    "luhn_check_digit", "make_entry", "normalize_imei", "parse_status", "parse_svns",
    "status_name",
]

"""The fixed set of rule names a `Verdict.rule` can carry, in precedence order.

The names are stable, short and few: the interfaces use them as Prometheus label values
(bounded cardinality) and the NOC greps logs for them. Never build a rule name at run time.
"""

from __future__ import annotations

from typing import Final

MALFORMED: Final = "malformed"
LOCAL_WHITE: Final = "local_white"
LOCAL_GREY: Final = "local_grey"
LOCAL_BLACK: Final = "local_black"
EXCEPTION_PAIR: Final = "exception_pair"
NATIONAL_BLACKLIST: Final = "national_blacklist"
NOTIFICATION_BLOCKED: Final = "notification_blocked"
NOTIFICATION_GRACE: Final = "notification_grace"
TAC_BARRED: Final = "tac_barred"
SVN_RULE: Final = "svn_rule"
TAC_UNALLOCATED: Final = "tac_unallocated"
DEFAULT: Final = "default"

# Precedence order (first match wins) with the one-line description `explain` prints.
# `malformed` appears once here but is checked in two places: an identity with no usable
# 14-digit body is decided before anything else; one with a body (bad check digit, test or
# all-zero TAC) is decided right after the operator-local lists, so an operator can override it.
RULES: Final[dict[str, str]] = {
    MALFORMED: "the identity is not a valid IMEI/IMEISV (first counterfeit signal)",
    LOCAL_WHITE: "operator-local white list (exact IMEI or range)",
    LOCAL_GREY: "operator-local grey list (exact IMEI or range)",
    LOCAL_BLACK: "operator-local black list (exact IMEI or range)",
    EXCEPTION_PAIR: "national exception list: this IMEI is paired with the subscriber's IMSI",
    NATIONAL_BLACKLIST: "national blacklist, in force from its block_date",
    NOTIFICATION_BLOCKED: "national notification list, block_date reached",
    NOTIFICATION_GRACE: "national notification list, in its grace period until block_date",
    TAC_BARRED: "the device's TAC is barred",
    SVN_RULE: "per-TAC software version rule",
    TAC_UNALLOCATED: "the TAC is not allocated in the GSMA TAC database (counterfeit indicator)",
    DEFAULT: "no list or rule matched: unknown-equipment default",
}

PRECEDENCE: Final[tuple[str, ...]] = tuple(RULES)

"""Shared contract between the interfaces (S13, N5g-eir), the stores and the policy.

Pure data, standard library only. The store hands the policy an `ImeiRecord` (what the national
register says about one 14-digit IMEI); the policy turns (request, record, date) into a `Verdict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple


class EquipmentStatus(IntEnum):
    """TS 29.272 Equipment-Status (AVP 1445) values; N5g-eir uses the same three names."""

    WHITELISTED = 0
    BLACKLISTED = 1
    GREYLISTED = 2


class CheckRequest(NamedTuple):
    """One "may this device be used?" question, as the interfaces received it.

    `imei` is the digit string as received (14 or 15 digits, or 16 for an IMEISV from N5g-eir);
    `software_version` is the 2-digit SVN when the peer sent one. A NamedTuple rather than a
    frozen dataclass: one is built per request, and this is half the cost.
    """

    imei: str
    software_version: str | None = None
    imsi: str | None = None
    msisdn: str | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer and why. `status` None means "equipment unknown" (S13 5422, N5g-eir 404)."""

    status: EquipmentStatus | None
    rule: str
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BlacklistEntry:
    block_date: str  # YYYYMMDD
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NotificationEntry:
    imsi: str
    msisdn: str
    block_date: str  # YYYYMMDD
    reasons: tuple[str, ...] = ()
    amnesty_granted: bool = False


@dataclass(frozen=True, slots=True)
class ExceptionEntry:
    imsi: str
    msisdn: str = ""


@dataclass(frozen=True, slots=True)
class ImeiRecord:
    """Everything the national register lists for one 14-digit IMEI (TAC 8 + SNR 6)."""

    blacklist: BlacklistEntry | None = None
    notifications: tuple[NotificationEntry, ...] = field(default=())
    exceptions: tuple[ExceptionEntry, ...] = field(default=())

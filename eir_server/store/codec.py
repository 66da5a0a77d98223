"""Compact byte encoding of one IMEI's register listing, shared by sync (writer) and store (reader).

A listing is the merge of every list naming the IMEI, with the operator kept for each
notification/exception so a later per-operator delta or full load can replace exactly its own
entries (`NotificationEntry` itself has no operator field).

Encoding: entries joined by RS (0x1e); each entry is a type letter then fields joined by US (0x1f):
  B<block_date>US<reasons joined by |>
  N<operator>US<imsi>US<msisdn>US<block_date>US<reasons>US<"1" if amnesty else "">
  E<operator>US<imsi>US<msisdn>
The first byte is always a letter, so a bucket value can also be a decimal id into the
version's record table (blacklist-only listings are shared that way) without ambiguity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from eir_server.policy.types import BlacklistEntry, ExceptionEntry, ImeiRecord, NotificationEntry

RS = "\x1e"
US = "\x1f"
FORBIDDEN = frozenset(RS + US)


@dataclass(slots=True)
class Listing:
    """Mutable merged view of one IMEI across all lists (sync side)."""

    blacklist: BlacklistEntry | None = None
    # (operator, imsi) -> entry; keyed like the DIRBS per-operator (imei, imsi) pair lists.
    notifications: dict[tuple[str, str], NotificationEntry] = field(default_factory=dict)
    exceptions: dict[tuple[str, str], ExceptionEntry] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return self.blacklist is None and not self.notifications and not self.exceptions

    def blacklist_only(self) -> bool:
        return self.blacklist is not None and not self.notifications and not self.exceptions

    def to_record(self) -> ImeiRecord:
        return ImeiRecord(
            blacklist=self.blacklist,
            notifications=tuple(self.notifications[k] for k in sorted(self.notifications)),
            exceptions=tuple(self.exceptions[k] for k in sorted(self.exceptions)),
        )

    def encode(self) -> bytes:
        parts: list[str] = []
        b = self.blacklist
        if b is not None:
            parts.append(f"B{b.block_date}{US}{'|'.join(b.reasons)}")
        for (op, _), n in sorted(self.notifications.items()):
            parts.append(
                f"N{op}{US}{n.imsi}{US}{n.msisdn}{US}{n.block_date}{US}"
                f"{'|'.join(n.reasons)}{US}{'1' if n.amnesty_granted else ''}"
            )
        for (op, _), e in sorted(self.exceptions.items()):
            parts.append(f"E{op}{US}{e.imsi}{US}{e.msisdn}")
        return RS.join(parts).encode()


def _reasons(s: str) -> tuple[str, ...]:
    return tuple(s.split("|")) if s else ()


def encode_blacklist(block_date: str, reasons: tuple[str, ...]) -> bytes:
    return f"B{block_date}{US}{'|'.join(reasons)}".encode()


def decode_listing(data: bytes) -> Listing:
    out = Listing()
    if not data:
        return out
    for part in data.decode().split(RS):
        kind, body = part[0], part[1:].split(US)
        if kind == "B":
            out.blacklist = BlacklistEntry(body[0], _reasons(body[1]))
        elif kind == "N":
            op, imsi, msisdn, date, reasons, amnesty = body
            out.notifications[(op, imsi)] = NotificationEntry(
                imsi, msisdn, date, _reasons(reasons), amnesty == "1"
            )
        elif kind == "E":
            op, imsi, msisdn = body
            out.exceptions[(op, imsi)] = ExceptionEntry(imsi, msisdn)
        else:
            raise ValueError(f"unknown listing entry type {kind!r}")
    return out


def decode_record(data: bytes) -> ImeiRecord | None:
    """Bytes -> the contract type; empty bytes is a tombstone (not listed)."""
    if not data:
        return None
    if data[0] == 0x42 and RS.encode() not in data:  # "B" alone: the common case, fast path
        date, _, reasons = data[1:].decode().partition(US)
        return ImeiRecord(blacklist=BlacklistEntry(date, _reasons(reasons)))
    return decode_listing(data).to_record()

"""Where the generator's IMEIs come from: a file `imei[,expected[,sv[,imsi]]]` or
`range:START:COUNT` (14-digit bodies from START, each sent with its Luhn check digit).

`expected` is what the answer must say: an Equipment-Status name or number
(whitelisted|blacklisted|greylisted or 0|1|2), `unknown` for Experimental-Result 5422, or any
other Result-Code number (e.g. 5004 for a request the EIR should refuse). Empty: not checked.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..policy.imei import luhn_check_digit

NOT_CHECKED = -1
UNKNOWN_EQUIPMENT = 5422
STATUS_CODES = {"whitelisted": 0, "white": 0, "blacklisted": 1, "black": 1, "greylisted": 2,
                "grey": 2, "unknown": UNKNOWN_EQUIPMENT}
STATUS_NAMES = {0: "whitelisted", 1: "blacklisted", 2: "greylisted"}
MAX_RANGE = 5_000_000  # every entry is pre-encoded; beyond this the start-up cost dominates


@dataclass(frozen=True, slots=True)
class ImeiEntry:
    imei: str  # 14-16 digits as sent in the IMEI AVP (15: check digit; 16: IMEISV)
    expected: int = NOT_CHECKED  # 0/1/2 Equipment-Status, or a Result-Code; -1: not checked
    sv: str | None = None  # Software-Version AVP; None: "01"
    imsi: str | None = None  # User-Name; None: derived from the IMEI (one subscriber per device)


def parse_expected(text: str) -> int:
    t = text.strip().lower()
    if not t:
        return NOT_CHECKED
    if t in STATUS_CODES:
        return STATUS_CODES[t]
    if t.isdigit() and (int(t) in (0, 1, 2) or 1000 <= int(t) <= 9999):
        return int(t)
    raise ValueError(f"expected status {text!r}: not whitelisted|blacklisted|greylisted|"
                     "unknown|0|1|2 or a 4-digit Result-Code")


def parse_line(line: str, where: str = "") -> ImeiEntry | None:
    """One line of an IMEI file; None for blank and comment lines, ValueError for bad ones."""
    s = line.strip()
    if not s or s.startswith("#"):
        return None
    parts = [p.strip() for p in s.split(",")]
    if len(parts) > 4:
        raise ValueError(f"{where}more than 4 fields: {s!r}")
    imei = parts[0]
    if not (imei.isdigit() and imei.isascii() and 14 <= len(imei) <= 16):
        raise ValueError(f"{where}IMEI {imei!r}: not 14-16 digits")
    try:
        expected = parse_expected(parts[1]) if len(parts) > 1 else NOT_CHECKED
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None
    sv = parts[2] if len(parts) > 2 and parts[2] else None
    if sv is not None and not (sv.isdigit() and sv.isascii() and len(sv) == 2):
        raise ValueError(f"{where}software version {sv!r}: not 2 digits")
    imsi = parts[3] if len(parts) > 3 and parts[3] else None
    if imsi is not None and not (imsi.isdigit() and imsi.isascii() and 5 <= len(imsi) <= 15):
        raise ValueError(f"{where}IMSI {imsi!r}: not 5-15 digits")
    return ImeiEntry(imei, expected, sv, imsi)


def parse_lines(lines: Iterable[str], name: str = "") -> list[ImeiEntry]:
    out = []
    for n, line in enumerate(lines, 1):
        e = parse_line(line, f"{name}:{n}: ")
        if e is not None:
            out.append(e)
    return out


def parse_range(spec: str) -> list[ImeiEntry]:
    """`range:START:COUNT`: COUNT consecutive 14-digit bodies from START, sent as 15 digits."""
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] != "range" or not parts[1].isdigit() or not parts[2].isdigit():
        raise ValueError(f"IMEI source {spec!r}: expected range:START:COUNT")
    start, count = int(parts[1]), int(parts[2])
    if not 0 < count <= MAX_RANGE:
        raise ValueError(f"range COUNT {count}: must be 1..{MAX_RANGE}")
    if len(parts[1]) != 14 or start + count > 10**14:
        raise ValueError(f"range START {parts[1]!r}: must be 14 digits and leave room for COUNT")
    out = []
    for body in range(start, start + count):
        b = f"{body:014d}"
        out.append(ImeiEntry(b + luhn_check_digit(b)))
    return out


def load_source(spec: str) -> list[ImeiEntry]:
    """A file path or range:START:COUNT; ValueError (with the line) for anything unusable."""
    if spec.startswith("range:"):
        return parse_range(spec)
    path = Path(spec)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"IMEI file {spec}: {e.strerror or e}") from e
    entries = parse_lines(text.splitlines(), spec)
    if not entries:
        raise ValueError(f"IMEI file {spec}: no IMEIs")
    return entries


def mix(base: list[ImeiEntry], listed: list[ImeiEntry], share: float, n: int,
        seed: int = 1) -> list[ImeiEntry]:
    """The request sequence: `n` entries, a `share` of them drawn from `listed` (spread evenly,
    in a seeded random order), the rest walking through `base` in order."""
    if not listed or share <= 0:
        return base[:n] if len(base) >= n else base
    rng = random.Random(seed)
    out = []
    bi = 0
    acc = 0.0
    for _ in range(n):
        acc += share
        if acc >= 1.0:
            acc -= 1.0
            out.append(listed[rng.randrange(len(listed))])
        else:
            out.append(base[bi % len(base)])
            bi += 1
    return out

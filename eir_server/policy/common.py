"""Small shared pieces: status names for config files, loader bad-line reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .types import EquipmentStatus

# Names accepted in TOML/CSV (case-insensitive). "unknown" is status None: S13 5422, N5g-eir 404.
STATUS_BY_NAME: Final[dict[str, EquipmentStatus | None]] = {
    "whitelisted": EquipmentStatus.WHITELISTED,
    "greylisted": EquipmentStatus.GREYLISTED,
    "blacklisted": EquipmentStatus.BLACKLISTED,
    "unknown": None,
}


def status_name(status: EquipmentStatus | None) -> str:
    return "unknown" if status is None else status.name.lower()


def parse_status(value: object, what: str, *, allow_unknown: bool = True) -> EquipmentStatus | None:
    """`EquipmentStatus`, None or a name from STATUS_BY_NAME -> status; ValueError otherwise."""
    if value is None or isinstance(value, EquipmentStatus):
        if value is None and not allow_unknown:
            raise ValueError(f"{what}: 'unknown' is not allowed here")
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        if key in STATUS_BY_NAME and (allow_unknown or key != "unknown"):
            return STATUS_BY_NAME[key]
    names = [n for n in STATUS_BY_NAME if allow_unknown or n != "unknown"]
    raise ValueError(f"{what}: expected one of {', '.join(names)}; got {value!r}")


@dataclass(frozen=True, slots=True)
class BadLine:
    """One rejected input line: 1-based line number, why, and the (truncated) text."""

    line: int
    reason: str
    text: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}: {self.text!r}"


class LoadError(ValueError):
    """A data file could not be used; `bad_lines` holds what was rejected."""

    def __init__(self, source: str, bad_lines: tuple[BadLine, ...], message: str = "") -> None:
        self.source = source
        self.bad_lines = bad_lines
        head = message or f"{len(bad_lines)} bad line(s)"
        detail = "; ".join(str(b) for b in bad_lines[:5])
        super().__init__(f"{source}: {head}" + (f": {detail}" if detail else ""))


def clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."

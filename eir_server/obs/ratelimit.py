"""Log rate limiting for lines a peer can cause (error answers, framing errors, rejected CERs,
failed TLS handshakes): the first line per key is logged, later ones within `period` are only
counted, and a summary line with the count follows once the period is over. A misconfigured
MME sending 22k wrong-realm requests a second then costs two lines a minute, not 22k.

Pure: time is an argument; the caller logs what `hit` and `due` return.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

DEFAULT_PERIOD = 60.0
DEFAULT_MAX_KEYS = 4096
OVERFLOW: tuple[str, ...] = ("*",)  # the key that stands for every key beyond max_keys


class LogLimiter:
    """Per-key state: [start of the current period, lines suppressed in it]."""

    __slots__ = ("period", "max_keys", "overflow", "_keys", "suppressed_total")

    def __init__(self, period: float = DEFAULT_PERIOD, max_keys: int = DEFAULT_MAX_KEYS,
                 overflow: Hashable = OVERFLOW) -> None:
        self.period = period
        self.max_keys = max_keys
        self.overflow = overflow
        self._keys: OrderedDict[Hashable, list[float]] = OrderedDict()
        self.suppressed_total = 0

    def __len__(self) -> int:
        return len(self._keys)

    def hit(self, key: Hashable, now: float) -> tuple[bool, int]:
        """(log this line?, lines suppressed for `key` since its last logged line). A peer
        cycling through endless keys (new ports, new codes) shares one overflow key."""
        keys = self._keys
        state = keys.get(key)
        if state is None:
            if len(keys) >= self.max_keys:
                key = self.overflow
                state = keys.get(key)
            if state is None:
                keys[key] = [now, 0]
                return True, 0
        if now - state[0] >= self.period:
            suppressed = int(state[1])
            state[0] = now
            state[1] = 0
            keys.move_to_end(key)
            return True, suppressed
        state[1] += 1
        self.suppressed_total += 1
        return False, 0

    def flush(self) -> list[tuple[Hashable, int]]:
        """Every count still owed (at shutdown), whatever its period."""
        out = [(k, int(v[1])) for k, v in self._keys.items() if v[1]]
        self._keys.clear()
        return out

    def due(self, now: float) -> list[tuple[Hashable, int]]:
        """Summaries owed: (key, count) for keys whose period ended with lines suppressed.
        Keys quiet for a whole period are forgotten (the next line is a first line again)."""
        out = []
        period = self.period
        for key in list(self._keys):
            state = self._keys[key]
            if now - state[0] < period:
                continue
            if state[1]:
                out.append((key, int(state[1])))
                state[0] = now
                state[1] = 0
            else:
                del self._keys[key]
        return out

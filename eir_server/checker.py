"""One call that both interfaces make: store lookup + pure policy decision + fallback.

`check()` answers synchronously when it can (embedded store, or an IMEI in the worker's local
cache) and returns an asyncio Future only on a cache miss that needs Redis; the Diameter shell
then attaches a callback instead of creating a task per request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from .policy.types import CheckRequest, EquipmentStatus, ImeiRecord, Verdict
from .store import MISSING, RecordStore, StoreUnavailable


class PolicyLike(Protocol):
    def imei_key(self, raw: str) -> str | None: ...

    def decide(self, req: CheckRequest, record: ImeiRecord | None, today: str) -> Verdict: ...


class Today:
    """Today's date as YYYYMMDD (UTC), recomputed at most once a second."""

    __slots__ = ("_clock", "_until", "_value")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._until = 0.0
        self._value = ""

    def __call__(self) -> str:
        now = self._clock()
        if now >= self._until:
            self._value = time.strftime("%Y%m%d", time.gmtime(now))
            self._until = now - (now % 1.0) + 1.0
        return self._value


class EquipmentChecker:
    __slots__ = ("policy", "store", "fallback", "today", "fallbacks")

    def __init__(self, policy: PolicyLike, store: RecordStore,
                 fallback: EquipmentStatus | None = EquipmentStatus.WHITELISTED,
                 today: Callable[[], str] | None = None) -> None:
        self.policy = policy
        self.store = store
        # Returned when the store cannot answer (Redis down and the IMEI not cached).
        self.fallback = Verdict(fallback, "store_fallback", ("register store unreachable",))
        self.today = today or Today()
        self.fallbacks = 0

    def check(self, req: CheckRequest) -> Verdict | asyncio.Future[Verdict]:
        policy = self.policy
        key = policy.imei_key(req.imei)
        if key is None:
            return policy.decide(req, None, self.today())
        record = self.store.get_nowait(key)
        if record is not MISSING:
            return policy.decide(req, record, self.today())  # type: ignore[arg-type]
        pending = self.store.fetch(key)
        result: asyncio.Future[Verdict] = pending.get_loop().create_future()

        def done(f: asyncio.Future[ImeiRecord | None]) -> None:
            if result.cancelled():
                return
            try:
                verdict = policy.decide(req, f.result(), self.today())
            except (StoreUnavailable, asyncio.CancelledError):
                self.fallbacks += 1
                verdict = self.fallback
            except Exception:  # a bug must not leave the peer without an answer
                self.fallbacks += 1
                verdict = self.fallback
            result.set_result(verdict)

        pending.add_done_callback(done)
        return result

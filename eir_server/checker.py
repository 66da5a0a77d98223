"""One call that both interfaces make: store lookup + pure policy decision + fallback.

`check()` answers synchronously when it can (embedded store, or an IMEI in the worker's local
cache) and returns an asyncio Future only on a cache miss that needs Redis; the Diameter shell
then attaches a callback instead of creating a task per request.

When the store cannot answer, the configured fallback applies: a status (fail open with
whitelisted, fail closed with greylisted/blacklisted), or an error answer (`too_busy`: the MME
tries another EIR; `unable_to_comply`) carried as a Verdict with rule STORE_ERROR whose reason
names the error. A lookup that failed because our own loop was overloaded is always answered
`too_busy`. Each fallback episode is logged when it starts, once a minute while it lasts, and
when a verdict comes from the store again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final, Protocol

from .obs.logging import get_logger
from .policy.config import PolicyConfig
from .policy.engine import Identified
from .policy.lists import LocalLists
from .policy.types import CheckRequest, EquipmentStatus, ImeiRecord, Verdict
from .service import STORE_ERROR  # Verdict.rule of an error answer; reasons[0] names the error
from .store import MISSING, BucketLost, RecordStore, StoreOverloaded, StoreUnavailable

log = get_logger("eir.checker")

FALLBACK_ERRORS: Final = ("too_busy", "unable_to_comply")
EPISODE_LOG_INTERVAL: Final = 60.0  # seconds between "still falling back" lines


class PolicyLike(Protocol):
    config: PolicyConfig  # a TAC database reload builds a new policy from these
    local: LocalLists | None

    def identify(self, raw: str) -> Identified: ...

    def decide_identified(self, req: CheckRequest, identified: Identified,
                          record: ImeiRecord | None, today: str) -> Verdict: ...


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
    __slots__ = ("policy", "store", "fallback", "busy", "today", "fallbacks", "episodes",
                 "clock", "_get_nowait", "_episode_start", "_episode_count", "_next_log")

    def __init__(self, policy: PolicyLike, store: RecordStore,
                 fallback: EquipmentStatus | str | None = EquipmentStatus.WHITELISTED,
                 today: Callable[[], str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.store = store
        # Bound once: the stores hand out a compiled callable here (store/tiers.py), which a
        # call through `store.get_nowait` each time would reach through interpreted code.
        self._get_nowait = store.get_nowait
        # Returned when the store cannot answer (Redis down and the IMEI not cached).
        if isinstance(fallback, str):
            if fallback not in FALLBACK_ERRORS:
                raise ValueError(f"store fallback error must be one of {FALLBACK_ERRORS}")
            self.fallback = Verdict(None, STORE_ERROR, (fallback,))
        else:
            self.fallback = Verdict(fallback, "store_fallback", ("register store unreachable",))
        self.busy = Verdict(None, STORE_ERROR, ("too_busy",))
        self.today = today or Today()
        self.clock = clock
        self.fallbacks = 0  # verdicts from the fallback (incl. too_busy for our own overload)
        self.episodes = 0
        self._episode_start: float | None = None
        self._episode_count = 0
        self._next_log = 0.0

    @property
    def fallback_active(self) -> bool:
        return self._episode_start is not None

    def _fell_back(self, error: BaseException) -> Verdict:
        self.fallbacks += 1
        now = self.clock()
        verdict = self.busy if isinstance(error, StoreOverloaded) else self.fallback
        if self._episode_start is None:
            self._episode_start, self._episode_count = now, 0
            self._next_log = now + EPISODE_LOG_INTERVAL
            self.episodes += 1
            log.warning("store_fallback_started", answer=_answer_name(verdict),
                        error=str(error) or type(error).__name__)
        self._episode_count += 1
        if now >= self._next_log:
            self._next_log = now + EPISODE_LOG_INTERVAL
            log.warning("store_fallback_continues", answer=_answer_name(verdict),
                        verdicts=self._episode_count,
                        seconds=round(now - self._episode_start, 1))
        return verdict

    def _episode_over(self) -> None:
        start = self._episode_start
        if start is not None:
            self._episode_start = None
            log.info("store_fallback_ended", verdicts=self._episode_count,
                     seconds=round(self.clock() - start, 1))

    def check(self, req: CheckRequest) -> Verdict | asyncio.Future[Verdict]:
        policy = self.policy
        # The IMEI is parsed once: its body is the store key, and decide reuses the parse.
        identified = policy.identify(req.imei)
        key, _, bad = identified
        if key is None or bad is not None:
            return policy.decide_identified(req, identified, None, self.today())
        record = self._get_nowait(key)
        if record is not MISSING:
            if self._episode_start is not None and self.store.ready:
                self._episode_over()  # e.g. a snapshot now answers what Redis could not
            # The date matters only to a listed IMEI (block dates); most are not listed.
            return policy.decide_identified(req, identified, record,  # type: ignore[arg-type]
                                            self.today() if record is not None else "")
        pending = self.store.fetch(key)
        result: asyncio.Future[Verdict] = pending.get_loop().create_future()

        def done(f: asyncio.Future[ImeiRecord | None]) -> None:
            if result.cancelled():
                return
            try:
                verdict = policy.decide_identified(req, identified, f.result(), self.today())
                if self._episode_start is not None:
                    self._episode_over()
            except BucketLost:
                # One bucket of a register that otherwise answers: the fallback for this IMEI,
                # counted, but no episode (the store logged it; episodes would start and end
                # with every such lookup among good ones).
                self.fallbacks += 1
                verdict = self.fallback
            except (StoreUnavailable, asyncio.CancelledError) as e:
                verdict = self._fell_back(e)
            except Exception as e:  # a bug must not leave the peer without an answer
                verdict = self._fell_back(e)
            result.set_result(verdict)

        pending.add_done_callback(done)
        return result


def _answer_name(verdict: Verdict) -> str:
    if verdict.rule == STORE_ERROR:
        return verdict.reasons[0]
    return "unknown" if verdict.status is None else verdict.status.name.lower()

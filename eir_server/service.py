"""The interface-neutral half of answering "may this device be used?": overload gate, the
checker call (store lookup + policy), verdict counters and the audit record.

Every front end (S13 over Diameter today, N5g-eir over HTTP/2) puts its own wire format around
the same four steps::

    if not service.admit(peer):          -> "too busy" in the interface's words (3004, 503)
    result = service.check(req)          -> Verdict, or a pending lookup (the store must be asked)
    service.started() / finished()      -> around a pending lookup: the in-flight count
    service.record(req, verdict, peer, interface)   -> verdict counters and audit

Pure code: no sockets, no clocks, no asyncio. A pending lookup is whatever the checker returned
(an asyncio Future for the Redis store); this module only passes it through to the shell, which
waits for it and calls back.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Final, Protocol

from .policy.types import CheckRequest, Verdict

# A verdict whose rule is STORE_ERROR is no verdict: the store could not answer and the
# configured fallback is an error answer (or our own loop was overloaded); reasons[0] names it,
# and each interface says it in its own words (S13: the Result-Codes below).
STORE_ERROR: Final = "store_error"


class Checker(Protocol):
    """Store lookup + policy decision: a Verdict now, or a pending lookup for the shell."""

    def check(self, req: CheckRequest) -> Verdict | object: ...


class VerdictCounters(Protocol):
    """The counters the service keeps (`obs.metrics.Metrics` has them)."""

    @property
    def verdicts(self) -> MutableMapping[tuple[object, str], int]: ...


# (request, verdict, peer, interface): the shell binds the wall-clock time (obs.audit stamps
# each record), so the core stays clock-free.
Audit = Callable[[CheckRequest, Verdict, str, str], None]


class CheckService:
    """Shared by every connection and every interface of one worker."""

    __slots__ = ("checker", "counters", "audit", "max_in_flight", "in_flight", "_verdicts")

    def __init__(self, checker: Checker, counters: VerdictCounters, audit: Audit | None = None,
                 max_in_flight: int = 10_000) -> None:
        self.checker = checker
        self.counters = counters
        self.audit = audit
        self.max_in_flight = max_in_flight
        self.in_flight = 0  # requests waiting for a store lookup, all peers, all interfaces
        self._verdicts = counters.verdicts

    def admit(self, peer: str) -> bool:
        """The overload gate: may a new request from `peer` go to the store now? Refused
        requests are answered "too busy" at once, never left to time out at the client: it can
        try another EIR straight away. Today one bound on requests waiting for the store;
        this is the one place where load-based shedding and per-peer fairness plug in."""
        return self.in_flight < self.max_in_flight

    def check(self, req: CheckRequest) -> Verdict | object:
        """The verdict, or a pending lookup (`type(result) is not Verdict`) for the shell."""
        return self.checker.check(req)

    def started(self) -> None:
        """A pending lookup is now in flight."""
        self.in_flight += 1

    def finished(self) -> None:
        """A pending lookup completed or was abandoned."""
        self.in_flight -= 1

    def record(self, req: CheckRequest, verdict: Verdict, peer: str, interface: str) -> None:
        """Count a verdict that was answered and hand it to the audit."""
        self._verdicts[(verdict.status, verdict.rule)] += 1
        if self.audit is not None:
            self.audit(req, verdict, peer, interface)

"""The S13 ME-Identity-Check flow, sans I/O: a validated ECR in, ECA bytes (or a pending lookup)
out. Time is an argument; no sockets, clocks or asyncio.

Per request, in order (TS 29.272 5.3, RFC 6733 6.2.1):

1. a command other than ECR: 3001 (the dictionary lets no other S13 request through);
2. read the identities; Terminal-Information without IMEI: 5005;
3. T flag set and (Origin-Host, End-to-End-Id) answered within the duplicate window: the same
   answer again, rebuilt from the cached outcome (RFC 6733 5.5.4);
4. the overload gate (`CheckService.admit`): 3004 at once rather than a timeout at the MME;
5. the checker: a Verdict now, or a pending lookup the shell waits for before `complete()`;
6. the ECA from pre-encoded templates; the outcome is remembered for T-flagged retransmissions,
   and the verdict counted and audited (`CheckService.record`). A store that could not answer
   with an error fallback configured (or our own overload) gets 3004/5012 instead, never
   remembered as a duplicate's answer.

The shell feeds `handle()` the AppRequest events of every connection (TCP or TLS alike) and
sends what it returns; see docs/design.md.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Final, Protocol

from ..diameter import errors
from ..diameter.answers import Identity
from ..diameter.codec import FLAG_T, Message
from ..diameter.connection import ErrorAnswered
from ..diameter.dedup import DuplicateCache
from ..diameter.dictionary import Dictionary
from ..policy.types import Verdict
from ..service import STORE_ERROR, CheckService
from .app import COMMAND_CODE, EcaBuilder, Parsed

INTERFACE: Final = "s13"
_DUPLICATE: Final = (INTERFACE, "ECR", "duplicate")
_SUCCESS: Final = (INTERFACE, "ECR", "2001")
_UNKNOWN: Final = (INTERFACE, "ECR", "5422")
_BUSY: Final = (INTERFACE, "ECR", str(errors.TOO_BUSY))
_SHED_IN_FLIGHT: Final = (INTERFACE, "in_flight")  # refused by the overload gate
# --store-fallback error answers (and our own overload) -> Result-Code
STORE_ERROR_CODES = {"too_busy": errors.TOO_BUSY, "unable_to_comply": errors.UNABLE_TO_COMPLY}


class Histogram(Protocol):
    def observe_many(self, seconds: float, n: int) -> None: ...


class S13Counters(Protocol):
    """The counters the S13 flow bumps (`obs.metrics.Metrics` has them)."""

    @property
    def requests(self) -> MutableMapping[tuple[str, str, str | int], int]: ...

    @property
    def protocol_errors(self) -> MutableMapping[int, int]: ...

    @property
    def latency_s13(self) -> Histogram: ...

    @property
    def shed(self) -> MutableMapping[tuple[str, str], int]: ...


class PendingLookup:
    """An ECR whose verdict waits for the store. `lookup` is what the checker returned (an
    asyncio Future for Redis); the shell waits for it, then calls `S13Handler.complete` (or
    `abandon` when the connection is gone)."""

    __slots__ = ("msg", "parsed", "peer", "received", "lookup")

    def __init__(self, msg: Message, parsed: Parsed, peer: str, received: float,
                 lookup: object) -> None:
        self.msg = msg
        self.parsed = parsed
        self.peer = peer
        self.received = received
        self.lookup = lookup


class Rejected:
    """An error ECA caused by what the peer sent: send `answer`, count and log `event` once."""

    __slots__ = ("answer", "event")

    def __init__(self, answer: bytes, event: ErrorAnswered) -> None:
        self.answer = answer
        self.event = event


Outcome = bytes | PendingLookup | Rejected
# (peer's CER Origin-Host, the ECR's Origin-Host bytes, refused?)
OriginReport = Callable[[str, bytes, bool], None]


class S13Handler:
    """One per worker, shared by all its connections."""

    __slots__ = ("eca", "service", "dedup", "answered_now", "_check", "_requests",
                 "_protocol_errors", "_latency", "_shed", "_origin_check", "_peer_names")

    def __init__(self, identity: Identity, dictionary: Dictionary, service: CheckService,
                 dedup: DuplicateCache, counters: S13Counters) -> None:
        self.eca = EcaBuilder(identity, dictionary)
        self.service = service
        # The checker's own method, bound once (CheckService.check is this call, for front ends
        # that do not keep a reference; the checker of a service never changes).
        self._check = service.checker.check
        self.dedup = dedup
        # Verdict answers produced since the shell last called `observe_latency`: all of them
        # are written by the same flush, so their latency is measured once, per batch.
        self.answered_now = 0
        self._requests = counters.requests
        self._protocol_errors = counters.protocol_errors
        self._latency = counters.latency_s13
        self._shed = counters.shed  # eir_requests_shed_total{interface, reason}
        self._origin_check: tuple[bool, OriginReport] | None = None
        self._peer_names: dict[str, bytes] = {}

    def check_origin(self, refuse: bool, report: OriginReport) -> None:
        """Compare each ECR's Origin-Host with the peer's CER Origin-Host (`peer` in `handle`).
        A relay (DRA) in between makes them differ by design; a peer that speaks for another
        MME too. `report(peer, origin, refused)` hears of each mismatch; with `refuse` the ECR
        is answered 5003 DIAMETER_AUTHORIZATION_REJECTED."""
        self._origin_check = (refuse, report)

    def handle(self, msg: Message, now: float, peer: str) -> Outcome:
        """Answer one validated S13 request received at `now` from `peer` (the name audited)."""
        eca = self.eca
        if msg.code != COMMAND_CODE:
            return Rejected(eca.failure(msg, errors.COMMAND_UNSUPPORTED, "not supported"),
                            ErrorAnswered(errors.COMMAND_UNSUPPORTED, msg.code, msg.hop_by_hop,
                                          "not supported"))
        parsed = eca.parse(msg)
        if isinstance(parsed, bytes):
            return Rejected(parsed, ErrorAnswered(errors.MISSING_AVP, msg.code, msg.hop_by_hop,
                                                  "Terminal-Information without IMEI"))
        req, prefix, suffix, origin = parsed
        if self._origin_check is not None:
            names = self._peer_names
            known = names.get(peer)
            if known is None:
                if len(names) >= 4096:  # peer names of closed connections: start over
                    names.clear()
                known = names[peer] = peer.lower().encode()
            if origin != known and origin.lower() != known:
                refuse, report = self._origin_check
                report(peer, origin, refuse)
                if refuse:
                    reason = "Origin-Host differs from the peer's CER Origin-Host"
                    return Rejected(eca.failure(msg, errors.AUTHORIZATION_REJECTED, reason),
                                    ErrorAnswered(errors.AUTHORIZATION_REJECTED, msg.code,
                                                  msg.hop_by_hop, reason))
        if msg.flags & FLAG_T:
            cached = self.dedup.get(origin, msg.end_to_end, now)
            if cached is not None:
                self._requests[_DUPLICATE] += 1
                return eca.answer(msg, prefix, suffix, None if cached < 0 else cached)
        service = self.service
        if not service.admit(peer):
            self._shed[_SHED_IN_FLIGHT] += 1
            return self.busy(msg)
        verdict = self._check(req)
        if type(verdict) is not Verdict:
            service.started()
            return PendingLookup(msg, parsed, peer, now, verdict)
        # From here on `_answer`, inlined: this is the per-request path.
        status = verdict.status
        if status is None and verdict.rule == STORE_ERROR:
            return self._store_error(msg, verdict)
        self.answered_now += 1
        # The cache keeps a plain int, not the Verdict: ints are untracked by the cyclic GC, so
        # a cache of millions of entries does not lengthen collections.
        self.dedup.put(origin, msg.end_to_end, -1 if status is None else int(status), now)
        self._requests[_SUCCESS if status is not None else _UNKNOWN] += 1
        service.record(req, verdict, peer, INTERFACE)
        return eca.answer(msg, prefix, suffix, status)

    def busy(self, msg: Message) -> bytes:
        """3004 DIAMETER_TOO_BUSY for `msg`, counted (not logged: it comes in floods)."""
        self._requests[_BUSY] += 1
        self._protocol_errors[errors.TOO_BUSY] += 1
        return self.eca.failure(msg, errors.TOO_BUSY, "too many requests waiting for the store")

    def complete(self, pending: PendingLookup, verdict: Verdict, now: float) -> bytes:
        """The ECA for a lookup that finished at `now`."""
        self.service.finished()
        if verdict.status is not None or verdict.rule != STORE_ERROR:
            self._latency.observe_many(now - pending.received, 1)
        return self._answer(pending.msg, pending.parsed, verdict, pending.peer, pending.received)

    def _store_error(self, msg: Message, verdict: Verdict) -> bytes:
        """3004 makes the MME try another EIR; 5012 if so configured. Counted, not logged here
        (the checker logs each fallback episode)."""
        code = STORE_ERROR_CODES[verdict.reasons[0]]
        self._requests[(INTERFACE, "ECR", str(code))] += 1
        self._protocol_errors[code] += 1
        self.service.counters.verdicts[(verdict.reasons[0], verdict.rule)] += 1
        return self.eca.failure(msg, code, "register store unavailable")

    def abandon(self, pending: PendingLookup) -> None:
        """The lookup was cancelled or its connection is gone: nothing to answer."""
        self.service.finished()

    def observe_latency(self, seconds: float) -> None:
        """The shell wrote the answers of `handle()` calls `seconds` after reading them."""
        if self.answered_now:
            self._latency.observe_many(seconds, self.answered_now)
            self.answered_now = 0

    def _answer(self, msg: Message, parsed: Parsed, verdict: Verdict, peer: str,
                received: float) -> bytes:
        status = verdict.status
        if status is None and verdict.rule == STORE_ERROR:
            return self._store_error(msg, verdict)
        req, prefix, suffix, origin = parsed
        # The cache keeps a plain int, not the Verdict: ints are untracked by the cyclic GC, so
        # a cache of millions of entries does not lengthen collections.
        self.dedup.put(origin, msg.end_to_end, -1 if status is None else int(status), received)
        self._requests[_SUCCESS if status is not None else _UNKNOWN] += 1
        self.service.record(req, verdict, peer, INTERFACE)
        return self.eca.answer(msg, prefix, suffix, status)

"""Overload of one worker, measured and acted on. Pure and interface-neutral: time and the
measurements are arguments; S13 answers 3004 (+ DOIC OC-OLR) from it, N5g-eir 503/429 with
Retry-After, and neither is known here.

A worker is behind when requests wait before it looks at them. A CPU-bound worker leaves them in
kernel socket buffers where no in-process counter sees them, so the shell reports, once per tick,
what it can observe:

- loop lag: how late the tick's own timer fired (the loop's queue of ready work);
- pending delay: bytes still in the kernel after a full read, over the rate it reads bytes;
- the age of the oldest request still waiting for an answer (for the store, say).

Their maximum is the queueing-delay estimate. Nothing counts unless the loop thread was busy for
at least half of the tick (CPU time over the wall time it was allowed to run, a cgroup quota's
throttling taken out): a worker that the OS did not run for a while (a host shared with other
busy processes, a SIGSTOP) was late without a queue of its own, and with CPU to spare it works
any backlog off by itself. Shedding starts once the estimate has been above `target` and not
draining (at least half the tick before) for `confirm` ticks in a row: one late tick is a
hiccup. While it sheds, every request source (a Diameter connection, an HTTP client) gets a
fair share of an admission budget per tick (max-min: a source sending less than an equal share
keeps what it sends), and requests beyond its share are refused cheaply by the interface.
The budget follows the delay: cut while it is above target and not draining, the deeper the
further above (x0.9 down to x0.5), held between half the target and the target, grown by a
tenth below that; shedding ends once the budget covers what arrives and the delay is low.
Counting requests that wait for the store (the previous gate) sheds the wrong thing: a slow
store is not a busy worker.

The DOIC report (RFC 7683 loss algorithm) is the same state seen from a reacting node: the
reduction percentage is the share of the offered load that is shed, the offered load being what
arrives scaled back up by the reduction the peers already apply; a new sequence number whenever
the percentage changes, and a withdrawal (validity 0) for one validity period after shedding
stops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class OverloadConfig:
    target: float = 0.05  # seconds of queueing delay above which requests are shed
    tick: float = 0.05  # seconds between measurements (the shell's timer)
    validity: int = 10  # OC-Validity-Duration of an OLR, seconds (RFC 7683 default 30)
    min_budget: int = 20  # admissions per tick never go below this (the worker keeps serving)
    step: int = 5  # reduction percentages are multiples of this (fewer sequence numbers)
    # Loop lag counts only in a tick with at least this many requests: a lightly loaded worker
    # that the OS did not schedule for a while (a busy host) has no queue to shed.
    min_load: int = 50
    min_busy: float = 0.5  # no shedding unless the loop thread ran this share of the tick
    confirm: int = 2  # ticks in a row above target before shedding starts
    # A source held to its fair share gets it in this many slices per tick (`refill`): all at
    # once, a tick's admissions are checked first and the rest of what arrives waits behind
    # them, up to a tick of delay for every request read after them.
    slices: int = 1


class Source:
    """One request source's counters (a connection). `quota`: admissions left this tick."""

    __slots__ = ("arrivals", "quota", "shed", "demand", "reacting", "slice", "credit")

    def __init__(self) -> None:
        # Applies the reported reduction itself (a DOIC peer); None: not known yet.
        self.reacting: bool | None = None
        self.arrivals = 0
        self.quota = 0
        self.shed = 0
        self.demand = 0.0  # arrivals per tick, smoothed
        self.slice = 0.0  # admissions added to `quota` per slice of a tick; 0: all at the tick
        self.credit = 0.0  # the fraction of an admission not yet handed out


class OverloadSignal:
    """The overload state of one worker; see the module docstring."""

    __slots__ = ("config", "shedding", "delay", "budget", "reduction", "sequence", "report",
                 "sources", "shed_total", "_withdraw_until", "retry_after", "delay_before",
                 "_above", "_drain")

    def __init__(self, config: OverloadConfig | None = None, now: float = 0.0,
                 epoch: int = 0) -> None:
        self.config = config or OverloadConfig()
        self.shedding = False
        self.delay = 0.0
        self.delay_before = 0.0
        self.budget = math.inf
        self.reduction = 0  # percent of the offered load to shed, as DOIC reports it
        # RFC 7683 5.5: sequence numbers only grow, across restarts too: start from a time.
        self.sequence = max(int(epoch), 0)
        # What to tell DOIC peers: (sequence, reduction %, validity s); validity 0 withdraws an
        # earlier report (RFC 7683 5.5.3), sent for one validity period; None: nothing to say.
        self.report: tuple[int, int, int] | None = None
        self.sources: dict[object, Source] = {}
        self.shed_total = 0
        self.retry_after = 0  # seconds, for interfaces that say so (HTTP Retry-After)
        self._withdraw_until = -math.inf
        self._above = 0  # ticks in a row with the delay above target
        self._drain = False  # this tick admits nothing from share-limited sources

    # -- sources -------------------------------------------------------------------------------

    def source(self, key: object) -> Source:
        src = self.sources.get(key)
        if src is None:
            src = self.sources[key] = Source()
            src.quota = self.config.min_budget
        return src

    def forget(self, key: object) -> None:
        self.sources.pop(key, None)

    def admit(self, src: Source) -> bool:
        """One request from `src`: True to serve it, False to refuse it now (cheaply)."""
        src.arrivals += 1
        if not self.shedding:
            return True
        if src.quota > 0:
            src.quota -= 1
            return True
        src.shed += 1
        self.shed_total += 1
        return False

    def left(self, src: Source) -> int:
        """How many more requests `admit` lets through from `src` now; -1: no limit."""
        return src.quota if self.shedding else -1

    def refused(self, src: Source, n: int) -> None:
        """`n` more requests from `src` refused without a call to `admit` each (after one it
        refused: its quota is spent until the next slice; or the older head of a read that the
        quota does not cover)."""
        src.arrivals += n
        src.shed += n
        self.shed_total += n

    # -- the tick ------------------------------------------------------------------------------

    def tick(self, now: float, lag: float, pending_delay: float = 0.0,
             oldest_age: float = 0.0, busy: float = 1.0) -> None:
        """`busy`: the share of the tick the loop thread spent running (its CPU time over
        the tick's wall time)."""
        cfg = self.config
        srcs = list(self.sources.values())
        if sum(s.arrivals for s in srcs) < cfg.min_load:
            lag = 0.0
        d = max(lag, pending_delay, oldest_age)
        if busy < cfg.min_busy:
            # The loop thread had CPU to spare (it was stopped, or the host ran others): any
            # backlog drains by itself. Nothing to shed, however old the waiting requests.
            d = 0.0
        self.delay = d
        # A backlog that is draining fast (a burst after a pause of the process) is not a
        # standing queue: only ticks above target and not well below the last one count.
        if d > cfg.target and (self._above == 0 or d >= 0.5 * self.delay_before):
            self._above += 1
        else:
            self._above = 0
        arrivals = 0
        shed = 0
        reacting = 0
        for s in srcs:
            s.demand = s.arrivals if s.demand == 0 else 0.5 * s.demand + 0.5 * s.arrivals
            arrivals += s.arrivals
            shed += s.shed
            if s.reacting:
                reacting += s.arrivals
        admitted = arrivals - shed
        if d > cfg.target and (self.shedding or self._above >= cfg.confirm):
            cut = min(0.9, max(0.5, cfg.target / d))
            if not self.shedding:
                # Above target for `confirm` ticks already: what was admitted built the queue.
                self.shedding = True
                self.budget = max(admitted * cut, cfg.min_budget)
            elif d >= self.delay_before or d > 2 * cfg.target:
                # Not draining, or draining too slowly to get below target soon: admit less
                # (multiplicative decrease). A worker saturated by reading and refusing alone
                # sits at a queue that neither grows nor shrinks until the budget goes below
                # what refusals leave for checks. From the budget, or twice what was admitted
                # if that is less: a throttled tick admits little, and the budget must not
                # collapse on one such tick.
                # The further above target, the deeper the cut (down to half): the queue drains
                # only with the CPU that checks leave unused, and a storm's refusals alone take
                # most of it, so a shallow cut leaves a standing queue for seconds.
                self.budget = max(cfg.min_budget, min(self.budget, 2 * admitted) * cut)
        elif self.shedding and d < cfg.target / 2:
            # Grow only well below target: between half and all of it, hold (a dead band
            # against the oscillation of cutting and growing around the target itself).
            # Not lower: a client that keeps a window of requests outstanding (an MME, the
            # bench's closed loop: 256 at capacity, ~30 ms) holds a queue of its own making;
            # a band below it (a quarter to half of 50 ms was tried) did not let shedding end
            # within 10 s, and 32-46 % of that client's answers after a storm were 3004.
            # Never far beyond what was admitted: a budget the sources did not use says nothing
            # about what the worker could do, and grown on, lets a burst admit more than it can.
            self.budget = min(self.budget + max(cfg.min_budget, self.budget * 0.1),
                              max(self.budget, 1.5 * admitted + cfg.min_budget))
            if shed == 0 and self.budget > 1.5 * arrivals and self.reduction <= cfg.step:
                self.shedding = False
                self.budget = math.inf
        self.delay_before = d
        # A backlog more than twice the target old (the queue that built up before shedding
        # started, or after a stall): what is read first is that old already, and a verdict
        # that late is worth less than a 3004 the MME retries elsewhere at once. For one tick
        # the sources held to a share get nothing: refused at a fraction of a check's cost,
        # the backlog is gone within the tick, and later verdicts wait behind none of it.
        self._drain = self.shedding and d > 2 * cfg.target
        if self.shedding:
            self._share(srcs)
        for s in srcs:
            s.arrivals = 0
            s.shed = 0
        self._report(now, arrivals, reacting)

    def _share(self, srcs: list[Source]) -> None:
        """Max-min fair quotas: sources asking less than an equal share get what they ask
        (and a little slack) at once, so a burst of theirs is not cut; the rest split what is
        left equally, handed out in `slices` per tick."""
        left = self.budget
        n = len(srcs)
        k = self.config.slices
        for i, s in enumerate(sorted(srcs, key=lambda s: s.demand)):
            share = left / (n - i)
            want = s.demand * 1.2 + 1
            if want <= share or k == 1:
                q = want if want <= share else share
                s.quota = max(1, int(q))
                s.slice = 0.0
            else:
                q = share
                s.slice = max(q, 1) / k
                s.quota = 0
            left -= q
        self.refill()

    def refill(self) -> None:
        """The next slice of each share-limited source's quota (the shell calls this
        `slices - 1` times between two ticks, evenly spaced; the tick hands out the first).
        Unused quota is kept for one slice only: kept longer, it piles up while the worker is
        held (a throttled CPU, a long read) and comes back as a burst of checks that the next
        reads wait behind; dropped at once, a slice that falls while the worker is held is lost
        and the budget is not admitted."""
        if not self.shedding:
            return
        drain = self._drain
        for s in self.sources.values():
            if s.slice and drain:
                s.quota = 0
            elif s.slice:
                c = s.credit + s.slice
                q = int(c)
                s.credit = c - q
                s.quota = min(s.quota + q, 2 * q)

    def _report(self, now: float, arrivals: int, reacting: int) -> None:
        cfg = self.config
        if self.shedding:
            # Nothing arrived: nothing to compute from; below target, step down so that the
            # report (and the shedding) can end.
            pct = self.reduction - cfg.step if self.delay < cfg.target else self.reduction
            pct = max(pct, cfg.step)
            if arrivals:
                # What peers would send without the reduction the reacting ones apply.
                offered = arrivals - reacting + reacting / max(0.05, 1 - self.reduction / 100)
                want = 100 * (1 - min(self.budget, offered) / offered)
                # Move by at most two steps up or one down per tick: reacting peers answer
                # a report a round trip later, and a jumpy percentage makes them oscillate.
                want = min(want, self.reduction + 2 * cfg.step)
                want = max(want, self.reduction - cfg.step)
                pct = int(min(100, max(cfg.step, round(want / cfg.step) * cfg.step)))
            self.retry_after = max(1, math.ceil(self.delay))
        else:
            pct = 0
            self.retry_after = 0
        if pct != self.reduction:
            self.sequence += 1
            self.reduction = pct
            if pct == 0:
                self._withdraw_until = now + cfg.validity
        if pct:
            self.report = (self.sequence, pct, cfg.validity)
        elif now < self._withdraw_until:
            self.report = (self.sequence, 0, 0)
        else:
            self.report = None

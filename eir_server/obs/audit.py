"""Audit trail of checks (what the EIR saw) and device-change / clone signals.

The hot path calls `AuditRecorder.record_now(...)`: a sampling decision and one deque append, no
I/O, no formatting. A background task (`start()`) drains the buffer in batches: it feeds the
`DeviceChangeDetector` and writes the sampled observations to a sink, a bounded Redis Stream
(pipelined `XADD ... MAXLEN ~`), daily JSON-lines files, or a bounded in-memory deque. When the
buffer is full new observations are dropped and counted (`eir_audit_records_total{outcome=
"dropped"}`): answers never wait for the audit.

Stream entry fields (all strings, "" when unknown): t (unix seconds, ms precision), imei,
imeisv, imsi, msisdn, peer, interface (s13 | n5g_eir), verdict (whitelisted | greylisted |
blacklisted | unknown), rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from eir_server.obs.logging import get_logger
from eir_server.obs.metrics import Metrics
from eir_server.policy.types import CheckRequest, EquipmentStatus, Verdict
from eir_server.recent import RecentMap

DEFAULT_STREAM: Final = "eir:audit"
FIELDS = ("t", "imei", "imeisv", "imsi", "msisdn", "peer", "interface", "verdict", "rule")

Row = dict[str, str]


def verdict_name(status: EquipmentStatus | None) -> str:
    return "unknown" if status is None else status.name.lower()


def observation(when: float, req: CheckRequest, verdict: Verdict, peer: str, interface: str) -> Row:
    """The stored form of one check. IMEI keeps what was received minus a software version."""
    imei = req.imei
    imeisv = ""
    if len(imei) == 16:  # an IMEISV (N5g-eir PEI): 14 digits + 2-digit SVN
        imeisv, imei = imei, imei[:14]
    elif req.software_version:
        imeisv = imei[:14] + req.software_version
    return {
        "t": f"{when:.3f}",
        "imei": imei,
        "imeisv": imeisv,
        "imsi": req.imsi or "",
        "msisdn": req.msisdn or "",
        "peer": peer,
        "interface": interface,
        "verdict": verdict_name(verdict.status),
        "rule": verdict.rule,
    }


class AuditSink(Protocol):
    async def write(self, rows: Sequence[Row]) -> None: ...


class RedisStreamSink:
    """One pipelined round trip per batch; the stream is trimmed approximately to `maxlen`."""

    def __init__(self, redis: Any, stream: str = DEFAULT_STREAM, maxlen: int = 10_000_000) -> None:
        self.redis = redis  # redis.asyncio.Redis
        self.stream = stream
        self.maxlen = maxlen

    async def write(self, rows: Sequence[Row]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for row in rows:
            pipe.xadd(self.stream, row, maxlen=self.maxlen, approximate=True)
        await pipe.execute()


class MemorySink:
    """Embedded, bounded: keeps the newest `maxlen` observations in this process only."""

    def __init__(self, maxlen: int = 100_000) -> None:
        self.rows: deque[Row] = deque(maxlen=maxlen)

    async def write(self, rows: Sequence[Row]) -> None:
        self.rows.extend(rows)


class JsonlDirSink:
    """Embedded and readable by `eir-server export`: one `audit-YYYYMMDD.jsonl` per UTC day,
    files older than `keep_days` deleted. Writes run in a thread (file I/O off the loop)."""

    def __init__(self, directory: str, keep_days: int = 35) -> None:
        self.directory = directory
        self.keep_days = keep_days
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def _write_sync(self, rows: Sequence[Row]) -> None:
        by_day: dict[str, list[str]] = {}
        for row in rows:
            day = datetime.fromtimestamp(float(row["t"]), UTC).strftime("%Y%m%d")
            by_day.setdefault(day, []).append(json.dumps(row, separators=(",", ":")))
        for day, lines in by_day.items():
            # 0600 whatever the umask: the files hold IMEI/IMSI/MSISDN of every subscriber
            fd = os.open(os.path.join(self.directory, f"audit-{day}.jsonl"),
                         os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with open(fd, "a") as f:
                f.write("\n".join(lines) + "\n")
        cutoff = datetime.fromtimestamp(time.time() - self.keep_days * 86400, UTC)
        oldest_kept = cutoff.strftime("%Y%m%d")
        for name in os.listdir(self.directory):
            if name.startswith("audit-") and name.endswith(".jsonl") and name[6:14] < oldest_kept:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory, name))

    async def write(self, rows: Sequence[Row]) -> None:
        await asyncio.to_thread(self._write_sync, rows)


def make_sink(
    store_url: str,
    *,
    redis: Any = None,
    audit_dir: str | None = None,
    stream: str = DEFAULT_STREAM,
    maxlen: int = 10_000_000,
) -> AuditSink:
    """redis:// or rediss:// store -> Redis Stream (reusing `redis` if given); otherwise daily
    files in `audit_dir` if set, else an in-memory ring."""
    if store_url.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://",
                             "redis+cluster://")):
        if redis is None:
            from eir_server.store.urls import async_client, parse_store_url

            # the same client serve's store uses: single node, TLS, Sentinel, Cluster
            redis = async_client(parse_store_url(store_url), 5.0)
        return RedisStreamSink(redis, stream=stream, maxlen=maxlen)
    if audit_dir:
        return JsonlDirSink(audit_dir)
    return MemorySink()


class _ImeiEntry:
    __slots__ = ("imsis", "flagged_at")

    def __init__(self) -> None:
        self.imsis: dict[int, float] = {}  # IMSI (as _code) -> last seen
        self.flagged_at = float("-inf")


REFRESH = 60.0  # seconds: how stale the last-seen time of an unchanged pair may get
# Pairs the hot path can skip within one REFRESH period: ~20 MB per worker at ~150 bytes a pair
# (an int key, a 14-digit string, their table slots). Two generations of half this, the least
# recently written forgotten first, so a set of devices a little larger than half still skips.
FRESH_MAX: Final = 131_072
_NONE: Final[list[str]] = []  # no signal (never appended to)

# The maps hold ints: (the other identity's code << STAMP_BITS) | last seen in ms (see
# eir_server.recent: one int-keyed table per generation instead of a value and a stamp table
# keyed by strings; with every device new that was a fifth of a worker's CPU, in cache misses).
STAMP_BITS: Final = 42  # ms since 1970: enough until the year 2109
STAMP_MAX: Final = (1 << STAMP_BITS) - 1
MAX_DIGITS: Final = 17  # IMSIs have at most 15: longer User-Names are not tracked
_MULTI: Final = 0  # the code in place of an IMSI: this IMEI has several (see _multi)


_LEAD: Final[tuple[int, ...]] = tuple(10 ** n for n in range(MAX_DIGITS + 1))


def _code(digits: str) -> int:
    """An identity of up to MAX_DIGITS ASCII digits as an int; the leading 1 keeps leading
    zeros and the length ("001" and "01" differ)."""
    return _LEAD[len(digits)] + int(digits)


def _digits(code: int) -> str:
    return str(code)[1:]


def _stamp(when: float) -> int:
    ms = when * 1000.0 + 0.5  # rounded (int() truncates); round() costs twice as much
    return int(ms) if 0.0 <= ms <= STAMP_MAX else (0 if ms < 0.0 else STAMP_MAX)


class DeviceChangeDetector:
    """Counts and logs (event "device_signal"):

    - imei_multi_imsi: one IMEI (14 digits) seen with more than `max_imsis` IMSIs within
      `window` seconds (a cloned IMEI, or a shared test device). Signalled at most once per
      IMEI per window.
    - imsi_imei_change: an IMSI seen with a different IMEI than last time, within `window`
      (a device change, or a SIM moved into a cloned/stolen device).

    State is bounded by `max_tracked` IMEIs and IMSIs (those not seen for longest forgotten
    first, by generations: see eir_server.recent) and is per worker process: a subscriber whose
    MME connections land on different workers is tracked by each separately. Times are kept
    to the millisecond. A User-Name that is not an IMSI (not all digits, or longer than
    MAX_DIGITS) is not tracked: there is nothing to correlate it with.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        max_imsis: int = 2,
        window: float = 86400.0,
        max_tracked: int = 1_000_000,
        log_events: bool = True,
        log_identities: bool = False,
    ) -> None:
        self.metrics = metrics
        self.max_imsis = max_imsis
        self.window = window
        self.max_tracked = max_tracked
        self.log_events = log_events
        # IMEIs and IMSIs are security data: log lines carry them only when the operator
        # asked (--log-identities on); otherwise the TAC and the IMSI's MCC+MNC.
        self.log_identities = log_identities
        # Signals are all counted, but a burst (a cloned IMEI farm, a test harness cycling
        # IMEIs on one SIM) must not become one log line per request.
        self.log_per_second = 5
        self._log_second = -1
        self._logged_this_second = 0
        self._suppressed = 0
        # IMEI (14) code -> its one IMSI's code, or _MULTI; IMSI code -> IMEI (14) code; each
        # packed with the last-seen time (see STAMP_BITS).
        self._by_imei: RecentMap[int] = RecentMap(max_tracked)
        self._by_imsi: RecentMap[int] = RecentMap(max_tracked)
        # IMEIs seen with several IMSIs: rare, but GC-tracked objects, so kept apart.
        self._multi: RecentMap[_ImeiEntry] = RecentMap(max_tracked)
        # hash(IMSI) -> IMEI body of the pairs written in this REFRESH period whose state is exactly
        # "this IMEI has only this IMSI, this IMSI last had this IMEI": seeing them again has
        # nothing to signal and nothing to write, so it costs one lookup (here, and before
        # queuing in AuditRecorder.record). Entries leave when either side changes, all of
        # them when the period ends. Keyed by the IMSI's str hash (cached in the request's
        # string): an int-keyed table compares the hashes it holds, a str-keyed one read each
        # probed key object, cold memory (with every device new, 11% of a worker). Two IMSIs
        # with one hash would also need one IMEI body to be taken for each other (1 in 2^64).
        # A RecentMap rather than a dict, so that neither its growth nor its end is one long
        # pause (a 65k-pair dict cleared or rehashed whole took 2 ms in one slice of this task).
        self.fresh: RecentMap[str] = RecentMap(min(FRESH_MAX, max_tracked))
        self.fresh_until = float("-inf")
        self._log = get_logger("eir_server.audit")

    def observe(self, when: float, imei: str, imsi: str | None) -> list[str]:
        if not imsi:
            return []
        fresh = self.fresh
        pair = hash(imsi)  # the fresh pairs' key (see __init__)
        known = fresh.get(pair)
        if known is not None and when < self.fresh_until and imei.startswith(known):
            return _NONE  # an unchanged pair, written this period (the common case)
        self.expire(when)
        key = imei[:14]  # TAC + serial identify the device; check digit / SVN do not
        if not (key.isascii() and key.isdigit() and imsi.isascii() and imsi.isdigit()
                and len(imsi) <= MAX_DIGITS):
            return _NONE
        k = _code(key)
        s = _code(imsi)
        stamp = _stamp(when)
        signals = _NONE
        # Nearly every IMEI is only ever seen with one IMSI: keep that as its code and build
        # an _ImeiEntry only for the second one. Writing it again keeps it young; the write
        # comes first (one call), and is made _MULTI below when it was not a single.
        prev = self._by_imei.swap(k, s << STAMP_BITS | stamp)
        single = True
        if prev is not None:
            seen = prev >> STAMP_BITS
            if seen != s:
                single = seen == _MULTI and self._multi.get(k) is None  # forgotten: start again
                if not single:
                    signals = self._more(when, k, key, s, imsi, seen,
                                         (prev & STAMP_MAX) / 1000.0)
        prev = self._by_imsi.swap(s, k << STAMP_BITS | stamp)
        if prev is not None:
            seen = prev >> STAMP_BITS
            if seen != k and when - (prev & STAMP_MAX) / 1000.0 <= self.window:
                if signals is _NONE:
                    signals = []
                signals.append("imsi_imei_change")
                self._signal(when, "imsi_imei_change", imsi=imsi, imei=key,
                             previous_imei=_digits(seen))
        if single and len(key) == 14:  # 14: `startswith` above then means "same body"
            fresh.put(pair, key)
        else:
            fresh.discard(pair)
        return signals

    def last_seen(self, imsi: str) -> tuple[str, float] | None:
        """(IMEI body, time) of the last sighting of `imsi` that was written, or None."""
        v = self._by_imsi.get(_code(imsi))
        return None if v is None else (_digits(v >> STAMP_BITS), (v & STAMP_MAX) / 1000.0)

    def tracks(self, imei: str) -> bool:
        """Whether the IMEI (its first 14 digits) is still remembered."""
        return _code(imei[:14]) in self._by_imei

    def tracked(self) -> tuple[int, int]:
        """(IMEIs, IMSIs) remembered (a key in both generations counts twice)."""
        return len(self._by_imei), len(self._by_imsi)

    def _more(self, when: float, k: int, key: str, s: int, imsi: str, seen: int,
              seen_at: float) -> list[str]:
        """A second IMSI (or another) for IMEI `key` (code `k`), which held `seen` (an IMSI's
        code, or _MULTI) last written at `seen_at`."""
        if seen != _MULTI:
            self.fresh.discard(hash(_digits(seen)))  # its IMEI is no longer its alone
            entry = _ImeiEntry()
            entry.imsis[seen] = seen_at
        else:
            found = self._multi.get(k)
            assert found is not None  # observe: a _MULTI without its entry is a single
            entry = found
        self._multi.put(k, entry)  # (again): recently seen
        entry.imsis[s] = when
        signals = _NONE
        if len(entry.imsis) > self.max_imsis:
            horizon = when - self.window
            entry.imsis = {c: t for c, t in entry.imsis.items() if t >= horizon}
            if len(entry.imsis) > self.max_imsis and when - entry.flagged_at >= self.window:
                entry.flagged_at = when
                signals = ["imei_multi_imsi"]
                self._signal(when, "imei_multi_imsi", imei=key, imsi=imsi,
                             imsi_count=len(entry.imsis))
        self._by_imei.put(k, _MULTI << STAMP_BITS | _stamp(when))
        return signals

    def expire(self, now: float) -> None:
        """End the REFRESH period of `fresh` once `now` is past it (or the clock jumped back)."""
        if not self.fresh_until - REFRESH <= now < self.fresh_until:
            self.fresh.forget()
            self.fresh_until = now + REFRESH

    def _signal(self, when: float, kind: str, **context: Any) -> None:
        self.metrics.device_signals[kind] += 1
        if not self.log_events:
            return
        second = int(when)
        if second != self._log_second:
            self._log_second = second
            self._logged_this_second = 0
        if self._logged_this_second >= self.log_per_second:
            self._suppressed += 1
            return
        self._logged_this_second += 1
        if self._suppressed:
            context["suppressed_before"] = self._suppressed
            self._suppressed = 0
        if not self.log_identities:
            context = {k: redact(k, v) for k, v in context.items()}
        self._log.info("device_signal", kind=kind, window_s=self.window, **context)


def redact(key: str, value: Any) -> Any:
    """IMEI -> its TAC (device model) + '*'; IMSI -> its MCC+MNC (network) + '*'."""
    if not isinstance(value, str):
        return value
    if key in ("imei", "previous_imei"):
        return value[:8] + "*" * (len(value) - 8)
    if key == "imsi":
        return value[:5] + "*" * (len(value) - 5)
    return value


# Sampled for the audit: (when, request, verdict, peer, interface). For the device-signal
# detector only: (when, imei, imsi), atomics only, so the collector stops tracking the tuple and
# a backlog under load does not lengthen full collections (it did: 100k queued requests and
# verdicts made each one walk 20-60 ms).
_Item = tuple[float, CheckRequest, Verdict, str, str] | tuple[float, str, str | None]


SLICE: Final = 64  # observations handled between two yields to the event loop


class AuditRecorder:
    """Non-blocking audit of checks. One per worker process.

    Wiring (worker): `rec = AuditRecorder(metrics, make_sink(cfg.store, redis=client),
    sample=cfg.audit_sample, detector=DeviceChangeDetector(metrics))`; `rec.start()` once the
    loop runs; `rec.record_now(req, verdict, peer_name, "s13")` after each answer;
    `await rec.close()` on shutdown (flushes what is buffered). With `--audit off` pass
    `sink=None`: the detector (if any) still sees every check, nothing is written.

    Sampling applies to what is written; the detector sees every check so that sampling does
    not hide clones.
    """

    def __init__(
        self,
        metrics: Metrics,
        sink: AuditSink | None,
        *,
        sample: float = 1.0,
        capacity: int = 100_000,
        batch_size: int = 500,
        flush_interval: float = 0.25,
        detector: DeviceChangeDetector | None = None,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0.0 <= sample <= 1.0:
            raise ValueError("audit sample must be between 0 and 1")
        self.metrics = metrics
        self.sink = sink
        self.sample = sample if sink is not None else 0.0
        self._keep_all = self.sample >= 1.0
        self._sampling = 0.0 < self.sample < 1.0
        self.capacity = capacity
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.detector = detector
        # nothing is written (no sink, or sample 0): only the detector wants the checks
        self._detect_only = detector if self.sample == 0.0 else None
        self._rng = rng
        self._clock = clock  # wall-clock time: record_now's stamp, the end of `fresh` periods
        self._buf: deque[_Item] = deque()
        self._counts = metrics.audit
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._log = get_logger("eir_server.audit")
        self._last_error_log = float("-inf")

    @property
    def pending(self) -> int:
        return len(self._buf)

    def record(
        self,
        when: float,
        req: CheckRequest,
        verdict: Verdict,
        peer: str,
        interface: str = "s13",
    ) -> None:
        # Hot path: one branch for sampling, one append.
        if self._keep_all:
            keep = True
        else:
            keep = self._sampling and self._rng() < self.sample
            if not keep:
                det = self.detector
                if det is None or not req.imsi:
                    return
                known = det.fresh.get(hash(req.imsi))
                if known is not None and when < det.fresh_until and req.imei.startswith(known):
                    return  # the detector would skip it too (see observe): no need to queue
        self._enqueue((when, req, verdict, peer, interface) if keep
                      else (when, req.imei, req.imsi))

    def _enqueue(self, item: _Item) -> None:
        """Queue for the flush task; "queued" is counted when drained."""
        buf = self._buf
        n = len(buf)
        if n >= self.capacity:
            self._counts["dropped"] += 1
            return
        buf.append(item)
        if n + 1 == self.batch_size:
            self._wake.set()

    def record_now(self, req: CheckRequest, verdict: Verdict, peer: str,
                   interface: str) -> None:
        """`record` stamped with the wall-clock time: the service's audit hook. With auditing
        off, an unchanged pair the detector has already seen this period (nearly every check)
        returns after one lookup, before reading the clock; the period's end is then enforced
        by the flush task (`_run`), which empties `fresh`."""
        det = self._detect_only
        if det is None:
            self.record(self._clock(), req, verdict, peer, interface)
            return
        # Auditing off: every check comes here; `record` would test the fresh pair again.
        imsi = req.imsi
        if not imsi:
            return
        imei = req.imei
        known = det.fresh.get(hash(imsi))
        if known is not None and imei.startswith(known):
            return
        self._enqueue((self._clock(), imei, imsi))

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-flush")
        return self._task

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.flush_interval):
                    await self._wake.wait()
            self._wake.clear()
            det = self.detector
            if det is not None:
                det.expire(self._clock())  # record_now trusts `fresh` without reading the clock
            await self.flush()

    async def flush(self) -> int:
        """Drain the buffer now; returns the number of observations written."""
        written = 0
        buf = self._buf
        while buf:
            n = min(len(buf), self.batch_size)
            items = [buf.popleft() for _ in range(n)]
            written += await self._write(items)
        return written

    async def _write(self, items: Iterable[_Item]) -> int:
        det = self.detector
        rows: list[Row] = []
        pause = SLICE
        for n, item in enumerate(items, 1):
            if len(item) == 3:
                if det is not None:
                    det.observe(item[0], item[1], item[2])
            else:
                when, req, verdict, peer, interface = item
                if det is not None:
                    det.observe(when, req.imei, req.imsi)
                rows.append(observation(when, req, verdict, peer, interface))
            if n == pause:
                # A batch is milliseconds of work: let requests that arrived meanwhile be
                # answered between slices rather than wait for all of it (the latency tail).
                await asyncio.sleep(0)
                # A turn of the loop may bring more than SLICE requests (many connections):
                # take a share of the backlog per turn, so it stays bounded instead of growing
                # until `capacity` drops observations.
                pause = n + max(SLICE, len(self._buf) // 8)
        self._counts["queued"] += len(rows)
        if not rows or self.sink is None:
            return 0
        try:
            await self.sink.write(rows)
        except Exception as exc:  # noqa: BLE001 - the audit must never take the server down
            self._counts["write_failed"] += len(rows)
            now = time.monotonic()
            if now - self._last_error_log >= 10.0:  # one line per 10 s while the sink is down
                self._last_error_log = now
                self._log.error("audit_write_failed", error=repr(exc), rows=len(rows))
            return 0
        self._counts["written"] += len(rows)
        return len(rows)

    async def close(self, timeout: float = 5.0) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.flush()

"""Redis-backed store: shared register in Redis, an in-process cache in each worker.

Hot path: `get_nowait` is one dict probe in the local cache (negative answers cached too), then
the version's overlay dict, then the node's register snapshot when there is one (tiers.py).
Misses go through `fetch`, which parks a future and, once per event loop tick, sends every
pending key in one round trip: a Lua script (single node / Sentinel) or a pipeline (Cluster,
where one script cannot touch keys in several slots). The round trip also reads `N:cur`, so
a batch answered under a version that is no longer current is retried after switching; a
background poller notices version changes on idle nodes (`poll_interval`).

Redis down: futures fail fast with StoreUnavailable (the caller applies its fallback verdict),
the cache keeps answering, and the poller reconnects with exponential backoff. One log line per
state change, never per request.

What counts as "down" (a wrong call answers the fallback verdict from a healthy Redis):
- a connection error that repeats on a fresh connection: the first error after a restart is a
  stale pooled connection, so idle connections are dropped and the round trip retried once;
- a round trip overdue by `timeout` of *responsive* loop time: time during which our own loop
  was busy (CPU overload, a long callback, the process not scheduled) is measured by a heartbeat
  and not counted, so a slow worker never declares a healthy Redis dead. A round trip still
  unanswered after `HARD_TIMEOUT_FACTOR` x `timeout` of wall time fails with StoreOverloaded
  (the caller answers "too busy") without marking Redis down;
- the register vanishing (N:cur gone, or the version's meta replaced: a Redis restarted empty
  or re-fed): answering "not listed" from an empty store would whitelist every device.
Version switches load outside any lookup's deadline: a lookup that meets a new version waits for
the shared refresh, whose own round trips are bounded one by one.

Lookup client (`lookup_client`, default "lean"): the misses of a loop tick go out on the lean
RESP connection (resp.py, lean.py) straight from the flush callback, and their reply resolves
the futures from the connection's own callback: no task, coroutine or redis-py machinery per
round trip. Anything unusual takes the general path (`_lookup_batch`, a coroutine): no
connection yet, a version change, NOSCRIPT, a lost connection (retried there once, on a fresh
connection), a Cluster redirection (MOVED/ASK: the Cluster's general path is redis-py's
pipeline, which follows it and updates the slot map the lean path routes by).
"lookup_client=redis-py" keeps every lookup on redis-py (the previous path).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import islice
from pathlib import Path
from types import TracebackType
from typing import Any

import hiredis
import structlog
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from eir_server.policy.types import ImeiRecord
from eir_server.recent import RecentMap

from . import layout, snapshot
from .base import MISSING, BucketLost, StoreOverloaded, StoreStats, StoreUnavailable, _Missing
from .codec import decode_record
from .lean import BucketPacker, LeanLinks, bulk
from .resp import HARD_TIMEOUT_FACTOR, RespConnectionError, RespTimeout
from .snapshot import Snapshot
from .tiers import LocalTiers
from .tiers import cache_key as _ck
from .urls import RedisTarget, async_client

log = structlog.get_logger("eir.store")

# KEYS[1] = N:cur, KEYS[2] = meta of the version served (its `created` tells a re-fed Redis's
# version "1" from ours), KEYS[3..] = bucket keys; ARGV = fields. A missing field comes back
# false (nil), a missing bucket key 0 (a lost bucket, when the load has markers).
_LOOKUP_LUA = """
local out = {redis.call('GET', KEYS[1]), redis.call('HGET', KEYS[2], 'created')}
for i = 3, #KEYS do
  local v = redis.call('HGET', KEYS[i], ARGV[i - 2])
  if not v and redis.call('EXISTS', KEYS[i]) == 0 then v = 0 end
  out[i] = v
end
return out
"""

_ERRORS = (RedisError, OSError, TimeoutError, asyncio.TimeoutError)
# Errors after which the same round trip on a fresh connection may well succeed.
_CONNECTION_ERRORS = (RedisConnectionError, OSError)

HEARTBEAT = 0.02  # seconds between loop-lag samples
LOOKUP_CLIENTS = ("lean", "redis-py")


def _pack(parts: list[bytes]) -> bytes:
    """One RESP command (an array of bulk strings)."""
    return b"".join([b"*%d\r\n" % len(parts), *[b"$%d\r\n%b\r\n" % (len(p), p) for p in parts]])


class LoopLag:
    """Cumulative time the event loop ran late: a heartbeat every HEARTBEAT seconds adds how
    late it ran. `busy()` includes the lateness of the heartbeat still due, so a check made at
    the end of a long stall already sees it."""

    __slots__ = ("_loop", "_busy", "_due", "_handle")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._busy = 0.0
        self._due = loop.time() + HEARTBEAT
        self._handle = loop.call_at(self._due, self._beat)

    def _beat(self) -> None:
        now = self._loop.time()
        self._busy += max(0.0, now - self._due)
        self._due = now + HEARTBEAT
        self._handle = self._loop.call_at(self._due, self._beat)

    def busy(self) -> float:
        return self._busy + max(0.0, self._loop.time() - self._due)

    def stop(self) -> None:
        self._handle.cancel()


class _Slots:
    """The bound on concurrent lookup round trips (`max_inflight`), shared by the lean path
    (callbacks: `try_take` or `when_free`) and the general path (`await take()`)."""

    __slots__ = ("free", "_waiters")

    def __init__(self, n: int) -> None:
        self.free = n
        self._waiters: deque[asyncio.Future[None] | Callable[[], None]] = deque()

    def try_take(self) -> bool:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        return False

    def when_free(self, cb: Callable[[], None]) -> None:
        """Call `cb` holding a slot as soon as one is free."""
        if self.try_take():
            cb()
        else:
            self._waiters.append(cb)

    async def take(self) -> None:
        if self.try_take():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.give()  # handed a slot just as it was cancelled: pass it on
            raise

    def give(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if isinstance(w, asyncio.Future):
                if w.done():
                    continue
                w.set_result(None)
            else:
                w()
            return
        self.free += 1


class _Fast:
    """What the lean path needs per register version, built once per version."""

    __slots__ = ("st", "ver", "created", "packer", "cmd", "keys2", "cur_key", "meta_key",
                 "cur_slot", "meta_slot")

    def __init__(self, st: _State, ns: str, cur_key: str, sha: str) -> None:
        assert st.version is not None and st.buckets is not None
        self.st = st
        self.ver = st.version.encode()
        self.created = st.created.encode() if st.created is not None else None
        self.packer = BucketPacker(st.buckets)
        self.cur_key = cur_key
        self.meta_key = layout.meta_key(ns, st.version)
        self.cmd = b"$7\r\nEVALSHA\r\n" + bulk(sha)
        self.keys2 = bulk(cur_key) + bulk(self.meta_key)  # KEYS[1], KEYS[2] of the script
        self.cur_slot = int(key_slot(cur_key.encode()))
        self.meta_slot = int(key_slot(self.meta_key.encode()))

    def evalsha(self, imeis: list[str]) -> bytes:
        """The lookup script's EVALSHA for `imeis` (what _evalsha packs, byte for byte)."""
        n = len(imeis)
        p = self.packer
        return b"".join((b"*%d\r\n" % (2 * n + 5), self.cmd, bulk(str(n + 2)), self.keys2,
                         p.keys(imeis), p.fields(imeis)))


class _ClusterBatch:
    """One lean Cluster lookup in flight: a pipeline per node, joined here."""

    __slots__ = ("chunk", "imeis", "fast", "left", "cur", "created", "values", "done")

    def __init__(self, chunk: dict[str, list[asyncio.Future[ImeiRecord | None]]],
                 imeis: list[str], fast: _Fast, parts: int) -> None:
        self.chunk = chunk
        self.imeis = imeis
        self.fast = fast
        self.left = parts
        self.cur: Any = None
        self.created: Any = None
        self.values: dict[str, Any] = {}
        self.done = False


@dataclass(slots=True)
class _State:
    """Everything needed to answer for one register version; replaced as a whole."""

    version: str | None
    created: str | None = None  # meta `created`: tells two versions with the same id apart
    buckets: layout.Buckets | None = None
    table: dict[int, ImeiRecord] = field(default_factory=dict)
    overlay_raw: dict[str, bytes] = field(default_factory=dict)
    overlay: dict[str, ImeiRecord | None] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    base_created: str | None = None  # `created` of the full load the buckets belong to
    snap: Snapshot | None = None  # that full load, memory-mapped (snapshot_dir set)
    # That full load has every bucket key (layout.MARKER_FIELD): a missing one is a lost bucket.
    markers: bool = False


class _Bounded:
    """RedisStore._bounded's context manager (a class: mypyc compiles no async generators)."""

    __slots__ = ("loop", "lag", "timeout", "t0", "b0", "hard", "overloaded", "handle", "cm")

    def __init__(self, loop: asyncio.AbstractEventLoop, lag: LoopLag | None,
                 timeout: float) -> None:
        self.loop = loop
        self.lag = lag
        self.timeout = timeout
        self.t0 = loop.time()
        self.b0 = lag.busy() if lag is not None else 0.0
        self.hard = self.t0 + timeout * HARD_TIMEOUT_FACTOR
        self.overloaded = False
        self.handle: asyncio.TimerHandle | None = None
        self.cm = asyncio.timeout(None)

    async def __aenter__(self) -> None:
        await self.cm.__aenter__()
        self.handle = self.loop.call_at(self.t0 + self.timeout, self._check)

    def _check(self) -> None:
        now = self.loop.time()
        lag = self.lag
        waited = now - self.t0 - ((lag.busy() - self.b0) if lag is not None else 0.0)
        if waited >= self.timeout or now >= self.hard:
            self.overloaded = waited < self.timeout
            self.cm.reschedule(now)  # expire now: the await raises TimeoutError
        else:
            self.handle = self.loop.call_at(min(now + self.timeout - waited, self.hard),
                                            self._check)

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self.handle is not None:
            self.handle.cancel()
        try:
            await self.cm.__aexit__(et, e, tb)
        except TimeoutError:
            if self.overloaded:
                raise StoreOverloaded("event loop too busy to read redis") from None
            raise
        if self.overloaded and isinstance(e, TimeoutError):
            raise StoreOverloaded("event loop too busy to read redis") from None


class RedisStore:
    name = "redis"
    # LocalTiers.get_nowait (see __init__): the cache, the overlay, then the snapshot.
    get_nowait: Callable[[str], ImeiRecord | None | type[_Missing]]

    def __init__(
        self,
        target: RedisTarget,
        *,
        namespace: str = "eir",
        cache_size: int = 1_000_000,
        poll_interval: float = 0.25,
        timeout: float = 0.5,
        batch_max: int = 256,
        max_inflight: int = 16,
        backoff_min: float = 0.05,
        backoff_max: float = 0.5,
        snapshot_dir: str = "",
        lookup_client: str = "lean",
    ) -> None:
        if lookup_client not in LOOKUP_CLIENTS:
            raise ValueError(f"lookup_client must be one of {LOOKUP_CLIENTS}")
        self.lookup_client = lookup_client
        self.target = target
        self.ns = namespace
        self.cache_size = cache_size
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.batch_max = batch_max
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else None
        self._snap_task: asyncio.Task[None] | None = None
        self._snap_for: tuple[str, str | None] | None = None
        self._snaps: dict[str, Snapshot] = {}  # open snapshots by path
        self._lost_logged: str | None = None  # version whose missing bucket was logged
        self.stats = StoreStats()
        self.general_batches = 0  # batches that took the general (coroutine) path
        self.ready = False
        # IMEIs Redis said are not listed (nearly all of them: None values, a map the cyclic GC
        # never walks) and the listed ones (records: objects), each bounded by cache_size.
        # Keyed by _ck(imei14): with every device new, probes of str keys were cache misses.
        self._cache: RecentMap[None] = RecentMap(cache_size)
        self._listed: RecentMap[ImeiRecord] = RecentMap(cache_size)
        # The lookups answered in-process (caches, overlay, snapshot): compiled, and bound as
        # this instance's get_nowait so that the checker's call reaches it directly.
        self._tiers = LocalTiers(self._cache, self._listed, self.stats)
        self.get_nowait = self._tiers.get_nowait
        self._state = _State(None)
        self._pending: dict[str, list[asyncio.Future[ImeiRecord | None]]] = {}
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = _Slots(max_inflight)
        self._refresh_lock = asyncio.Lock()
        self._client: Any = None
        self._script: Any = None
        self._lean: LeanLinks | None = None
        self._fast: _Fast | None = None
        self._poller: asyncio.Task[None] | None = None
        self._up: bool | None = None  # None until the first contact either way
        self._vanished_logged = False  # "register vanished" said once per outage
        self._down_reason = ""
        self._closed = False
        self._cur_key = layout.cur_key(namespace)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lag: LoopLag | None = None

    @property
    def version(self) -> str | None:
        return self._state.version

    @property
    def queue_depth(self) -> int:
        """Lookups waiting for the next batched round trip to Redis (a gauge, read on scrape)."""
        return sum(len(v) for v in self._pending.values())

    @property
    def meta(self) -> dict[str, str]:
        """Meta of the version being served (lists and run ids, counts, kind)."""
        return self._state.meta

    # -- hot path ------------------------------------------------------------------------------
    @property
    def _state(self) -> _State:
        return self._st

    @_state.setter
    def _state(self, st: _State) -> None:
        # One switch for the lookups too: the tiers answer from the version served.
        self._st = st
        self._tiers.serve(st.overlay, st.snap, st.table)

    def fetch(self, imei14: str) -> asyncio.Future[ImeiRecord | None]:
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[ImeiRecord | None] = loop.create_future()
        self.stats.fetches += 1
        r: Any = self._tiers.fetched_locally(imei14)  # (mypy cannot narrow by `is MISSING`)
        if r is not MISSING:
            fut.set_result(r)
            return fut
        if self._closed or self._client is None or not self._up:
            self.stats.unavailable_fetches += 1
            fut.set_exception(StoreUnavailable("redis unavailable"))
            return fut
        waiters = self._pending.get(imei14)
        if waiters is None:
            self._pending[imei14] = [fut]
        else:
            waiters.append(fut)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        it = iter(pending.items())
        lean = self._lean is not None
        while chunk := dict(islice(it, self.batch_max)):
            self.stats.fetch_batches += 1
            self.stats.fetch_keys += len(chunk)
            if lean:
                self._slots.when_free(partial(self._lean_send, chunk))
            else:
                self._spawn(self._lookup_batch(chunk))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the lean path: callbacks only, holding a slot of self._slots ---------------------------
    def _fast_for(self, st: _State) -> _Fast | None:
        f = self._fast
        if f is not None and f.st is st:
            return f
        if st.version is None or st.buckets is None:
            return None  # no register, or no full load: the general path says what to do
        sha = self._script.sha if self._script is not None else ""
        f = self._fast = _Fast(st, self.ns, self._cur_key, sha)
        return f

    def _lean_send(self, chunk: dict[str, list[asyncio.Future[ImeiRecord | None]]]) -> None:
        """Send one batch on the lean connection(s); called holding a slot."""
        if self._closed:
            self._to_general(chunk)  # fails it
            return
        try:
            if not self._up:  # went down while this batch waited for a slot
                raise StoreUnavailable("redis unavailable")
            st = self._state
            fast = self._fast_for(st)
            if fast is None:
                self._to_general(chunk)
                return
            imeis = list(chunk)
            if st.overlay:  # IMEIs changed by deltas are answered by the overlay
                overlay = st.overlay
                todo = [i for i in imeis if i not in overlay]
                if len(todo) < len(imeis):
                    for i in imeis:
                        if i in overlay:
                            self._resolve_one(chunk[i], overlay[i])
                    if not todo:
                        self._slots.give()
                        return
                    imeis = todo
            if self._script is not None:
                self._lean_send_single(chunk, imeis, fast)
            else:
                self._lean_send_cluster(chunk, imeis, fast)
        except ValueError:  # an IMEI the packer cannot take: the general path says why
            self._to_general(chunk)
        except BaseException as e:  # noqa: BLE001 - every waiter must be released, always
            self._slots.give()
            self._spawn(self._batch_failed(chunk, e))

    def _to_general(self, chunk: dict[str, list[asyncio.Future[ImeiRecord | None]]],
                    retry: bool = True) -> None:
        self._slots.give()
        if self._closed:  # a task now might be cancelled before it ran: fail them here
            exc = StoreUnavailable("store closed")
            for futs in chunk.values():
                for f in futs:
                    if not f.done():
                        f.set_exception(exc)
            return
        self._spawn(self._lookup_batch(chunk, retry))

    def _lean_send_single(self, chunk: dict[str, list[asyncio.Future[ImeiRecord | None]]],
                          imeis: list[str], fast: _Fast) -> None:
        assert self._lean is not None
        conn = self._lean.get()
        if conn is None:  # not connected (yet, or since a failure): the general path connects
            self._to_general(chunk)
            return
        conn.send(fast.evalsha(imeis), 1, partial(self._lean_reply, chunk, imeis, fast))

    def _lean_reply(self, chunk: dict[str, list[asyncio.Future[ImeiRecord | None]]],
                    imeis: list[str], fast: _Fast, res: Any) -> None:
        if (type(res) is list and len(res) == len(imeis) + 2 and res[0] == fast.ver
                and res[1] == fast.created):
            self._slots.give()
            self._lean_resolve(chunk, imeis, fast.st, res, 2)
        else:
            self._lean_trouble(chunk, res)

    def _lean_trouble(self, chunk: dict[str, list[asyncio.Future[ImeiRecord | None]]],
                      res: Any) -> None:
        """A lean round trip that did not simply answer (called holding the batch's slot)."""
        if type(res) is list or (isinstance(res, hiredis.ReplyError)
                                 and str(res).startswith(("NOSCRIPT", "MOVED", "ASK"))):
            # Another version (the general path switches to it), a script to load again, a
            # Cluster redirection (redis-py's pipeline follows it and fixes the slot map).
            self._to_general(chunk)
        elif isinstance(res, RespConnectionError):
            # The connection broke: one more try, on a fresh connection.
            self._to_general(chunk, retry=False)
        else:
            if isinstance(res, hiredis.ReplyError):
                res = ResponseError(str(res))
            elif not isinstance(res, BaseException):
                res = RespConnectionError(f"unexpected reply {res!r:.100}")
            self._slots.give()
            self._spawn(self._batch_failed(chunk, res))

    def _resolve_one(self, futs: list[asyncio.Future[ImeiRecord | None]],
                     rec: ImeiRecord | None) -> None:
        for f in futs:
            if not f.done():
                f.set_result(rec)

    @staticmethod
    def _split_lost(st: _State, imeis: list[str], values: list[Any], lost: dict[str, str]
                    ) -> tuple[list[str], list[Any]]:
        """The IMEIs and values left once those whose bucket key is missing (value 0, see
        _LOOKUP_LUA) of a load with markers are moved to `lost` (IMEI -> bucket key). They are
        never cached: a bucket restored (or a new load) answers again at once."""
        if not st.markers or 0 not in values:
            return imeis, values
        assert st.buckets is not None
        keep_i: list[str] = []
        keep_v: list[Any] = []
        for i, v in zip(imeis, values, strict=True):
            if type(v) is int:
                lost[i] = st.buckets.locate(i)[0]
            else:
                keep_i.append(i)
                keep_v.append(v)
        return keep_i, keep_v

    def _bucket_lost(self, st: _State, key: str,
                     futs: list[asyncio.Future[ImeiRecord | None]]) -> None:
        self.stats.redis_errors += 1
        if self._lost_logged != st.version:  # loud once per version, not once per lookup
            self._lost_logged = st.version
            log.error("register incomplete in Redis: a bucket is missing; its IMEIs get the "
                      "store fallback", key=key, version=st.version,
                      action="eir-server sync --force-full, or repair the Redis Cluster")
        exc = BucketLost(f"register bucket {key} missing from Redis")
        for f in futs:
            if not f.done():
                f.set_exception(exc)

    def _lean_resolve(self, chunk: dict[str, list[asyncio.Future[ImeiRecord | None]]],
                      imeis: list[str], st: _State, values: list[Any], at: int) -> None:
        """values[at:] answer imeis, in order: decode, cache, resolve the futures."""
        try:
            lost: dict[str, str] = {}
            imeis, vals = self._split_lost(st, imeis, values[at:] if at else values, lost)
            for imei, key in lost.items():
                self._bucket_lost(st, key, chunk[imei])
            recs = [None if not v else self._decode(st, v) for v in vals]
        except Exception as e:  # noqa: BLE001 - a record id not in the table, a bad value
            self._spawn(self._batch_failed(chunk, e))
            return
        listed = self._remember(st, imeis, recs)
        self.stats.redis_hits += listed
        self.stats.redis_misses += len(recs) - listed
        for i, rec in zip(imeis, recs, strict=True):
            for f in chunk[i]:
                if not f.done():
                    f.set_result(rec)

    def _remember(self, st: _State, imeis: list[str], recs: list[ImeiRecord | None]) -> int:
        """Cache what Redis answered for `imeis` (unless another version is served by now);
        returns how many are listed."""
        listed = len(recs) - recs.count(None)
        if self._state is st and st.version is not None:
            if listed:
                lput = self._listed.put
                for i, rec in zip(imeis, recs, strict=True):
                    if rec is not None:
                        lput(_ck(i), rec)
                self._cache.put_many([_ck(i) for i, rec in zip(imeis, recs, strict=True)
                                      if rec is None], None)
            else:  # the common case: nothing listed
                self._cache.put_many(map(_ck, imeis), None)
            self.stats.cache_evictions = self._cache.evicted + self._listed.evicted
        return listed

    def _lean_send_cluster(self, chunk: dict[str, list[asyncio.Future[ImeiRecord | None]]],
                           imeis: list[str], fast: _Fast) -> None:
        """One pipeline per Cluster primary (by redis-py's slot map): GET N:cur and HGET of
        the meta's `created` on the nodes holding them, HGET of each bucket field."""
        assert self._lean is not None
        slots = self._client.nodes_manager.slots_cache
        slot_of = fast.packer.slot
        groups: dict[str, list[str]] = {}
        try:
            for i in imeis:
                name = slots[slot_of(i)][0].name
                g = groups.get(name)
                if g is None:
                    groups[name] = [i]
                else:
                    g.append(i)
            cur_node = slots[fast.cur_slot][0].name
            meta_node = slots[fast.meta_slot][0].name
        except (KeyError, IndexError):  # slot map incomplete: redis-py's path fixes it
            self._to_general(chunk)
            return
        groups.setdefault(cur_node, [])
        groups.setdefault(meta_node, [])
        conns = {name: self._lean.get(name) for name in groups}
        missing = [name for name, c in conns.items() if c is None]
        if missing:
            for name in missing:  # open them for the next batches; this one goes via redis-py
                self._spawn(self._lean_connect(name))
            self._to_general(chunk)
            return
        batch = _ClusterBatch(chunk, imeis, fast, len(groups))
        for name, part in groups.items():
            head = []
            if name == cur_node:
                head.append(b"*2\r\n$3\r\nGET\r\n" + bulk(fast.cur_key))
            if name == meta_node:
                head.append(b"*3\r\n$4\r\nHGET\r\n" + bulk(fast.meta_key) + bulk("created"))
            markers = fast.st.markers
            n = len(head) + len(part) * (2 if markers else 1)
            conns[name].send(  # type: ignore[union-attr]
                b"".join(head) + fast.packer.hgets(part, markers), n,
                partial(self._cluster_part, batch, part, name == cur_node,
                        name == meta_node, n))

    async def _lean_connect(self, name: str) -> None:
        with contextlib.suppress(Exception):
            async with self._bounded():
                assert self._lean is not None
                await self._lean.connect(name)

    def _cluster_part(self, batch: _ClusterBatch, part: list[str], has_cur: bool,
                      has_meta: bool, n: int, res: Any) -> None:
        if batch.done:
            return
        if n == 1 and not isinstance(res, RespConnectionError | RespTimeout | StoreOverloaded):
            res = [res]
        if type(res) is not list:
            batch.done = True
            self._lean_trouble(batch.chunk, res)
            return
        for r in res:
            if isinstance(r, hiredis.ReplyError):
                batch.done = True
                self._lean_trouble(batch.chunk, r)
                return
        at = 0
        if has_cur:
            batch.cur = res[0]
            at = 1
        if has_meta:
            batch.created = res[at]
            at += 1
        values = batch.values
        if batch.fast.st.markers:  # HGET, EXISTS per IMEI: 0 for a missing bucket key
            it = islice(res, at, None)
            for i, v, e in zip(part, it, it, strict=True):
                values[i] = v if v is not None or e else 0
        else:
            for i, v in zip(part, islice(res, at, None), strict=True):
                values[i] = v
        batch.left -= 1
        if batch.left:
            return
        batch.done = True
        fast = batch.fast
        if batch.cur != fast.ver or batch.created != fast.created:
            self._lean_trouble(batch.chunk, [])  # another version: the general path switches
            return
        self._slots.give()
        self._lean_resolve(batch.chunk, batch.imeis, fast.st, [values[i] for i in batch.imeis],
                           0)

    # -- the general path ----------------------------------------------------------------------
    async def _lookup_batch(
        self, chunk: dict[str, list[asyncio.Future[ImeiRecord | None]]], retry: bool = True
    ) -> None:
        """`retry`: whether a connection error on the first round trip may be retried on a
        fresh connection (False: the lean path's try was that first attempt)."""
        self.general_batches += 1
        try:
            await self._slots.take()
            try:
                if not self._up:  # went down while this batch waited for a slot
                    raise StoreUnavailable("redis unavailable")
                lost: dict[str, str] = {}
                results = await self._lookup(list(chunk), retry, lost)
            finally:
                self._slots.give()
        except BaseException as e:  # noqa: BLE001 - every waiter must be released, always
            await self._batch_failed(chunk, e)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        listed = sum(1 for rec in results.values() if rec is not None)
        self.stats.redis_hits += listed  # eir_store_lookups_total{tier="redis"}
        self.stats.redis_misses += len(results) - listed
        for imei, key in lost.items():
            self._bucket_lost(self._state, key, chunk[imei])
        for imei, futs in chunk.items():
            if imei in lost:
                continue
            rec = results[imei]
            for f in futs:
                if not f.done():
                    f.set_result(rec)

    async def _batch_failed(self, chunk: dict[str, list[asyncio.Future[ImeiRecord | None]]],
                            e: BaseException) -> None:
        """Count, maybe mark Redis down, and fail every waiter of the batch."""
        try:
            if isinstance(e, _ERRORS):
                self.stats.redis_errors += 1
                await self._mark_down(e)
            elif not isinstance(e, asyncio.CancelledError | StoreUnavailable):
                self.stats.redis_errors += 1
                log.error("store lookup failed", error=repr(e))
        finally:
            exc = e if isinstance(e, StoreUnavailable) else StoreUnavailable(repr(e))
            for futs in chunk.values():
                for f in futs:
                    if not f.done():
                        f.set_exception(exc)

    # -- bounded round trips -------------------------------------------------------------------
    def _bounded(self) -> _Bounded:
        """Bound a round trip by `timeout` of responsive loop time (see the module docstring):
        TimeoutError when Redis did not answer although we were ready to read the answer,
        StoreOverloaded when our loop was too busy for HARD_TIMEOUT_FACTOR x `timeout`."""
        return _Bounded(self._loop or asyncio.get_running_loop(), self._lag, self.timeout)

    async def _call(self, fn: Any, *args: Any, _retry: bool = True, **kw: Any) -> Any:
        """One bounded round trip; a connection error is retried once on a fresh connection
        (after a Redis restart every pooled connection is stale, and that is not an outage).
        `_retry=False`: this is already the retry (the lean path made the first attempt)."""
        if _retry:
            try:
                async with self._bounded():
                    return await fn(*args, **kw)
            except _CONNECTION_ERRORS as e:
                if isinstance(e, TimeoutError):  # redis-py's TimeoutError is not a connection error
                    raise
                await self._drop_connections(lean=False)  # a broken lean one is gone already
        async with self._bounded():
            return await fn(*args, **kw)

    async def _drop_connections(self, lean: bool = True) -> None:
        """Close every idle pooled connection: they were opened before whatever just failed;
        with `lean`, the lean connections too (what is in flight on them fails)."""
        if lean and self._lean is not None:
            self._lean.close_all()
        with contextlib.suppress(Exception):
            pool = getattr(self._client, "connection_pool", None)
            if pool is not None:
                await pool.disconnect(inuse_connections=False)
            else:  # Cluster: one pool per node
                for node in self._client.get_nodes():
                    await node.disconnect()

    # -- lookups -------------------------------------------------------------------------------
    async def _lookup(self, imeis: list[str], retry: bool = True,
                      lost: dict[str, str] | None = None) -> dict[str, ImeiRecord | None]:
        """Records of `imeis`; those whose bucket is missing (a load with markers) are left
        out and put in `lost` (IMEI -> bucket key)."""
        out: dict[str, ImeiRecord | None] = {}
        if lost is None:
            lost = {}
        for attempt in range(3):
            st = self._state
            todo = [i for i in imeis if i not in out]
            for i in todo:  # the overlay may have changed under a new version
                r = st.overlay.get(i, MISSING)
                if r is not MISSING:
                    out[i] = r  # type: ignore[assignment]
            todo = [i for i in todo if i not in out]
            if not todo:
                return out
            keys: list[str] = []
            fields: list[str | bytes] = []
            if st.buckets is not None:  # else no full load: nothing listed beyond the overlay
                for i in todo:
                    k, f = st.buckets.locate(i)
                    keys.append(k)
                    fields.append(f)
            cur, created, values = await self._call(self._round_trip, st, keys, fields,
                                                    lean=True, _retry=retry or attempt > 0)
            if cur != st.version or created != st.created:
                # Off the lookup's deadline: the refresh bounds its own round trips.
                await self._refresh(st, cur, created)
                continue
            if cur is None:
                # No register was ever loaded (serve started before the first sync, or Redis
                # came back empty): an outage, answered with --store-fallback, never "listed
                # nowhere" (that would whitelist every stolen device).
                raise StoreUnavailable("no register version in the store")
            if st.buckets is None:
                values = [None] * len(todo)
            todo, values = self._split_lost(st, todo, values, lost)
            recs = [self._decode(st, v) for v in values]
            out.update(zip(todo, recs, strict=True))
            self._remember(st, todo, recs)
            return out
        raise StoreUnavailable("register version kept changing during lookup")

    async def _round_trip(
        self, st: _State, keys: list[Any], fields: list[Any], lean: bool = False
    ) -> tuple[str | None, str | None, list[Any]]:
        """N:cur, the served version's `created`, and the bucket values, in one round trip.
        `lean`: a lookup, sent on the lean connection when there is one (a Cluster's general
        path stays on redis-py's pipeline, which follows redirections)."""
        meta_key = layout.meta_key(self.ns, st.version or "none")
        if self._script is not None:
            if lean and self._lean is not None:
                res = await self._lean_evalsha([self._cur_key, meta_key, *keys], fields)
            else:
                res = await self._evalsha([self._cur_key, meta_key, *keys], fields)
        else:
            pipe = self._client.pipeline()
            pipe.get(self._cur_key)
            pipe.hget(meta_key, "created")
            for k, f in zip(keys, fields, strict=True):
                pipe.hget(k, f)
                if st.markers:
                    pipe.exists(k)
            res = await pipe.execute()
            if st.markers:  # as the script answers: 0 for a missing bucket key
                res[2:] = [v if v is not None or e else 0 for v, e in zip(res[2::2], res[3::2],
                                                                          strict=True)]
        cur, created = res[0], res[1]
        return (cur.decode() if cur else None, created.decode() if created else None, res[2:])

    async def _evalsha(self, keys: list[Any], args: list[Any]) -> Any:
        """The lookup script's EVALSHA, packed here and sent on a pooled connection. redis-py's
        command packing costs ~2 µs per argument here (128 µs for a 32-key lookup, more than
        the rest of the round trip); its connection, parser and TLS/Sentinel handling stay."""
        script = self._script
        packed = _pack([b"EVALSHA", script.sha.encode(), b"%d" % len(keys),
                        *[k if type(k) is bytes else k.encode() for k in keys],
                        *[a if type(a) is bytes else a.encode() for a in args]])
        pool = self._client.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(packed)
            try:
                res = await conn.read_response()
            except NoScriptError:  # a restarted or flushed Redis: redis-py loads it again
                res = None
        except BaseException:
            # A failed or abandoned round trip (its deadline passed) may leave a late reply
            # on this connection: it is never reused.
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)
        if res is None:
            return await script(keys=keys, args=args)
        return res

    async def _lean_evalsha(self, keys: list[Any], args: list[Any]) -> Any:
        """The lookup script's EVALSHA on the lean connection (opened here if needed)."""
        assert self._lean is not None
        script = self._script
        packed = _pack([b"EVALSHA", script.sha.encode(), b"%d" % len(keys),
                        *[k if type(k) is bytes else k.encode() for k in keys],
                        *[a if type(a) is bytes else a.encode() for a in args]])
        conn = await self._lean.connect()
        try:
            return await conn.request(packed, 1)
        except hiredis.ReplyError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise ResponseError(str(e)) from None
        # A restarted or flushed Redis: redis-py's Script loads it again.
        return await script(keys=keys, args=args)

    @staticmethod
    def _decode(st: _State, v: bytes | None) -> ImeiRecord | None:
        if not v:
            return None
        if v[0] < 0x3A:  # decimal id into the shared record table
            try:
                return st.table[int(v)]
            except KeyError:
                raise StoreUnavailable(f"record id {v!r} not in table of {st.version}") from None
        return decode_record(v)

    # -- versions ------------------------------------------------------------------------------
    async def _refresh(self, seen: _State, cur: str | None, created: str | None) -> None:
        """Load everything for version `cur` and switch to it in one assignment. `created` is
        what the caller read of `seen`'s meta (the version it was served): when it differs,
        Redis lost or replaced that version (restarted empty, re-fed): everything is reloaded."""
        async with self._refresh_lock:
            old = self._state
            if old is not seen or self._state_matches(old, cur, created):
                return  # another lookup switched already; the caller asks again
            if cur is None:
                if old.version is None:
                    return  # never had a register: "not listed" is the truth
                # Had one, now Redis has none: do not turn every device white.
                raise StoreUnavailable(f"register version {old.version} vanished from redis")
            new = await self._load_state(cur)
            # Our version's meta gone or replaced: the base load may be another one under the
            # same id, so only a full clear is safe.
            replaced = created != old.created
            if replaced or new.buckets != old.buckets or old.version is None:
                self._cache.clear()
                self._listed.clear()
            else:  # same full load plus a different overlay: drop only what changed
                for k in old.overlay_raw.keys() | new.overlay_raw.keys():
                    if old.overlay_raw.get(k) != new.overlay_raw.get(k):
                        self._cache.discard(_ck(k))
                        self._listed.discard(_ck(k))
            self._state = new
            self._want_snapshot(new)
            self.stats.version_changes += 1
            log.info(
                "register version switched",
                version=cur,
                previous=old.version,
                kind=new.meta.get("kind"),
                imeis=int(new.meta.get("count", 0) or 0),
                overlay=len(new.overlay_raw),
            )

    @staticmethod
    def _state_matches(st: _State, cur: str | None, created: str | None) -> bool:
        """`created` as read for st's meta key, `cur` as read from N:cur."""
        return st.version == cur and st.created == created

    async def _load_state(self, ver: str) -> _State:
        c = self._client
        raw_meta = await self._call(c.hgetall, layout.meta_key(self.ns, ver))
        meta = {k.decode(): v.decode() for k, v in raw_meta.items()}
        if not meta:
            raise StoreUnavailable(f"register version {ver} has no meta (being deleted?)")
        base = meta.get("base") or None
        buckets = layout.Buckets(self.ns, base, int(meta["k"])) if base else None
        raw_table = await self._call(c.hgetall, layout.table_key(self.ns, ver))
        table = {int(k): decode_record(v) for k, v in raw_table.items()}
        st = _State(ver, meta.get("created"), buckets, table, {}, {}, meta)  # type: ignore[arg-type]
        if base == ver:
            st.base_created = st.created
            st.markers = meta.get("markers") == "1"
        elif base:
            raw, markers = await self._call(c.hmget, layout.meta_key(self.ns, base), "created",
                                            "markers")
            st.base_created = raw.decode() if raw else None
            st.markers = markers == b"1"
        old = self._state
        if (old.snap is not None and old.buckets == buckets
                and old.base_created == st.base_created):
            st.snap = old.snap  # same full load: keep its snapshot
        cursor = 0
        okey = layout.overlay_key(self.ns, ver)
        while True:  # HSCAN in slices, decoded as they come: neither Redis nor our loop blocks
            cursor, part = await self._call(c.hscan, okey, cursor, count=5000)
            for k, v in part.items():
                key = k.decode()
                st.overlay_raw[key] = v
                st.overlay[key] = self._decode(st, v)
            if cursor == 0:
                break
        return st

    # -- availability --------------------------------------------------------------------------
    async def _mark_down(self, error: BaseException) -> None:
        if isinstance(error, StoreOverloaded):
            return  # our loop, not Redis
        if self._up:
            await self._drop_connections()
        elif (self._up is False and isinstance(error, StoreUnavailable)
              and not self._vanished_logged):
            # Down already (connection lost), and Redis now answers without our register: it
            # came back empty. Say so: the remedy is `eir-server sync`, not the network.
            self._vanished_logged = True
            log.error("register missing in redis: answering --store-fallback until a sync "
                      "loads one", target=self.target.mode, error=str(error))
        self._set_up(False, error)

    def _set_up(self, up: bool, error: BaseException | None = None) -> None:
        if up == self._up:
            return
        self._up = up
        self.stats.redis_up = int(up)
        lkg = self._state.snap is not None
        if up:
            self._vanished_logged = False
            log.info("redis available", target=self.target.mode, version=self.version)
        elif lkg:
            log.warning("redis unavailable", target=self.target.mode, error=repr(error),
                        answering="last-known-good snapshot", version=self.version)
        else:
            log.warning("redis unavailable", target=self.target.mode, error=repr(error))
        # Ready while verdicts come from the register: Redis, or its last-known-good copy.
        self.ready = up or lkg

    # -- snapshot ------------------------------------------------------------------------------
    def _want_snapshot(self, st: _State) -> None:
        if self.snapshot_dir is None or st.buckets is None or st.snap is not None:
            return
        key = (st.buckets.base, st.base_created)
        if self._snap_for == key and self._snap_task is not None and not self._snap_task.done():
            return
        if self._snap_task is not None:
            self._snap_task.cancel()
        self._snap_for = key
        self._snap_task = asyncio.ensure_future(self._ensure_snapshot(st))

    async def _ensure_snapshot(self, st: _State) -> None:
        """Map the snapshot of st's full load, building it (one worker per node) if needed."""
        assert self.snapshot_dir is not None and st.buckets is not None
        directory = self.snapshot_dir
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / snapshot.file_name(self.ns, st.buckets.base, st.base_created or "")
        started = time.monotonic()
        while not self._closed:
            if path.exists():
                break
            if snapshot.acquire_lock(path):
                try:
                    proc = await asyncio.create_subprocess_exec(
                        sys.executable, *snapshot.BUILDER,
                        "--url", self.target.url, "--ns", self.ns, "--base", st.buckets.base,
                        "--k", str(st.buckets.k), "--out", str(path),
                        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
                    _, err = await proc.communicate()
                finally:
                    snapshot.release_lock(path)
                if proc.returncode == snapshot.INCOMPLETE_EXIT:
                    # Redis itself lacks part of the register: an operator must act (`eir-server
                    # sync --force-full`, or repair the Cluster); lookups go to Redis meanwhile.
                    log.error("register incomplete in Redis: snapshot refused",
                              base=st.buckets.base, error=err.decode().strip()[-300:])
                    return
                if proc.returncode != 0:
                    log.warning("register snapshot not built", error=err.decode()[-300:])
                    return  # lookups keep going to Redis; the next full load tries again
                snapshot.remove_others(directory, self.ns, path)
                break
            await asyncio.sleep(0.2)  # another worker builds it
        else:
            return
        try:
            snap = snapshot.Snapshot(path)
        except (OSError, ValueError) as e:
            log.warning("register snapshot unreadable", path=str(path), error=str(e))
            return
        cur = self._state
        if cur.buckets != st.buckets or cur.base_created != st.base_created:
            snap.close()  # a newer full load came meanwhile
            return
        self._state = replace(cur, snap=snap)
        log.info("register snapshot mapped", base=st.buckets.base, imeis=snap.n,
                 seconds=round(time.monotonic() - started, 2))

    async def _poll_once(self) -> None:
        st = self._state
        cur, created, _ = await self._call(self._round_trip, st, [], [])
        if not self._state_matches(st, cur, created):
            await self._refresh(st, cur, created)
        self._set_up(True)

    async def _poll_forever(self) -> None:
        delay = self.backoff_min
        while not self._closed:
            try:
                await self._poll_once()
                delay = self.backoff_min
                await asyncio.sleep(self.poll_interval)
            except asyncio.CancelledError:
                raise
            except StoreOverloaded:
                await asyncio.sleep(self.poll_interval)
            except Exception as e:  # noqa: BLE001 - the poller must outlive any failure
                # StoreUnavailable included: a register that vanished or cannot be loaded
                # cannot answer either; logged once per state change like an outage.
                self.stats.redis_errors += 1
                await self._mark_down(e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._lag = LoopLag(self._loop)
        self._client = async_client(self.target, self.timeout)
        if self.target.mode != "cluster":
            self._script = self._client.register_script(_LOOKUP_LUA)
        if self.lookup_client == "lean":
            self._lean = LeanLinks(self._client, self.target.mode, self.timeout, self._lag)
        try:
            await self._poll_once()
        except Exception as e:  # noqa: BLE001 - start serving anyway, from the fallback
            self.stats.redis_errors += 1
            self._set_up(False, e)
        if self._lean is not None and self._up:
            # The first lookups already take the lean path (it would otherwise open these).
            names = [""] if self.target.mode != "cluster" else [
                n.name for n in self._client.nodes_manager.get_nodes_by_server_type("primary")]
            await asyncio.gather(*(self._lean_connect(n) for n in names))
        self._want_snapshot(self._state)
        self._poller = asyncio.ensure_future(self._poll_forever())

    async def close(self) -> None:
        self._closed = True
        self.ready = False
        for task in (self._poller, self._snap_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._lean is not None:
            await self._lean.aclose()  # what was in flight on it fails now, before the tasks go
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for futs in self._pending.values():
            for f in futs:
                if not f.done():
                    f.set_exception(StoreUnavailable("store closed"))
        self._pending.clear()
        if self._lag is not None:
            self._lag.stop()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
            self._client = None

    async def tac_file(self) -> tuple[str, str] | None:
        """The GSMA TAC file `eir-server sync` switched in: (sha256, text), or None when there
        is none or Redis cannot say now (the caller keeps what it has)."""
        if self._client is None:
            return None
        try:
            pointer = await self._call(self._client.hgetall, layout.tac_key(self.ns))
            sha = pointer.get(b"sha256") if pointer else None
            if not sha:
                return None
            text = await self._call(self._client.get, layout.tac_data_key(self.ns, sha.decode()))
        except Exception:  # RedisError, timeouts: the next poll tries again
            return None
        if text is None:
            return None  # switched again between the two reads: the next poll sees the new one
        return sha.decode(), text.decode("utf-8", "replace")

    def describe(self) -> dict[str, Any]:
        """For health endpoints: version, lists and run ids served, cache size."""
        lists = self._state.meta.get("lists")
        return {
            "store": self.name,
            "mode": self.target.mode,
            "version": self.version,
            "ready": self.ready,
            "lists": json.loads(lists) if lists else {},
            "cache_entries": len(self._cache) + len(self._listed),
            "checked_at": time.time(),
        }

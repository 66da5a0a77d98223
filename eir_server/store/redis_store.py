"""Redis-backed store: shared register in Redis, an in-process cache in each worker.

Hot path: `get_nowait` is one dict probe in the local cache (negative answers cached too), then
the version's overlay dict. Misses go through `fetch`, which parks a future and, once per event
loop tick, sends every pending key in one round trip: a Lua script (single node / Sentinel) or a
pipeline (Cluster, where one script cannot touch keys in several slots). The round trip also
reads `N:cur`, so a batch answered under a version that is no longer current is retried after
switching; a background poller notices version changes on idle nodes (`poll_interval`).

Redis down: futures fail fast with StoreUnavailable (the caller applies its fallback verdict),
the cache keeps answering, and the poller reconnects with exponential backoff. One log line per
state change, never per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import structlog
from redis.exceptions import RedisError

from eir_server.policy.types import ImeiRecord

from . import layout
from .base import MISSING, StoreStats, StoreUnavailable, _Missing
from .codec import decode_record
from .urls import RedisTarget, async_client

log = structlog.get_logger("eir.store")

# KEYS[1] = N:cur, KEYS[2..] = bucket keys; ARGV = fields. Missing values come back as nil.
_LOOKUP_LUA = """
local out = {redis.call('GET', KEYS[1])}
for i = 2, #KEYS do out[i] = redis.call('HGET', KEYS[i], ARGV[i - 1]) end
return out
"""

_ERRORS = (RedisError, OSError, TimeoutError, asyncio.TimeoutError)


@dataclass(slots=True)
class _State:
    """Everything needed to answer for one register version; replaced as a whole."""

    version: str | None
    buckets: layout.Buckets | None = None
    table: dict[int, ImeiRecord] = field(default_factory=dict)
    overlay_raw: dict[str, bytes] = field(default_factory=dict)
    overlay: dict[str, ImeiRecord | None] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)


class RedisStore:
    name = "redis"

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
        backoff_max: float = 2.0,
        **_ignored: Any,
    ) -> None:
        self.target = target
        self.ns = namespace
        self.cache_size = cache_size
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.batch_max = batch_max
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.stats = StoreStats()
        self.ready = False
        self._cache: dict[str, ImeiRecord | None] = {}
        self._state = _State(None)
        self._pending: dict[str, list[asyncio.Future[ImeiRecord | None]]] = {}
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight = asyncio.Semaphore(max_inflight)
        self._refresh_lock = asyncio.Lock()
        self._client: Any = None
        self._script: Any = None
        self._poller: asyncio.Task[None] | None = None
        self._up: bool | None = None  # None until the first contact either way
        self._closed = False
        self._cur_key = layout.cur_key(namespace)
        self._loop: asyncio.AbstractEventLoop | None = None

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
    def get_nowait(self, imei14: str) -> ImeiRecord | None | type[_Missing]:
        r = self._cache.get(imei14, MISSING)
        if r is MISSING:
            r = self._state.overlay.get(imei14, MISSING)
            if r is MISSING:
                self.stats.cache_misses += 1
                return MISSING
        self.stats.cache_hits += 1
        return r

    def fetch(self, imei14: str) -> asyncio.Future[ImeiRecord | None]:
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[ImeiRecord | None] = loop.create_future()
        self.stats.fetches += 1
        r = self._cache.get(imei14, MISSING)
        if r is MISSING:
            r = self._state.overlay.get(imei14, MISSING)
        if r is not MISSING:
            fut.set_result(r)  # type: ignore[arg-type]
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
        while chunk := dict(islice(it, self.batch_max)):
            task = asyncio.ensure_future(self._lookup_batch(chunk))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _lookup_batch(
        self, chunk: dict[str, list[asyncio.Future[ImeiRecord | None]]]
    ) -> None:
        self.stats.fetch_batches += 1
        self.stats.fetch_keys += len(chunk)
        try:
            async with asyncio.timeout(self.timeout), self._inflight:
                results = await self._lookup(list(chunk))
        except BaseException as e:  # noqa: BLE001 - every waiter must be released, always
            if isinstance(e, _ERRORS):
                self.stats.redis_errors += 1
                self._set_up(False, e)
            elif not isinstance(e, asyncio.CancelledError | StoreUnavailable):
                self.stats.redis_errors += 1
                log.error("store lookup failed", error=repr(e))
            exc = e if isinstance(e, StoreUnavailable) else StoreUnavailable(repr(e))
            for futs in chunk.values():
                for f in futs:
                    if not f.done():
                        f.set_exception(exc)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        for imei, futs in chunk.items():
            rec = results[imei]
            for f in futs:
                if not f.done():
                    f.set_result(rec)

    async def _lookup(self, imeis: list[str]) -> dict[str, ImeiRecord | None]:
        out: dict[str, ImeiRecord | None] = {}
        for _attempt in range(3):
            st = self._state
            todo = [i for i in imeis if i not in out]
            for i in todo:  # the overlay may have changed under a new version
                r = st.overlay.get(i, MISSING)
                if r is not MISSING:
                    out[i] = r  # type: ignore[assignment]
            todo = [i for i in todo if i not in out]
            if not todo:
                return out
            if st.buckets is None:  # no full load: nothing listed beyond the overlay
                cur = await self._client.get(self._cur_key)
                values: list[bytes | None] = [None] * len(todo)
            else:
                keys, fields = [], []
                for i in todo:
                    k, f = st.buckets.locate(i)
                    keys.append(k)
                    fields.append(f)
                cur, values = await self._round_trip(keys, fields)
            cur_s = cur.decode() if cur is not None else None
            if cur_s != st.version:
                await self._refresh(cur_s)
                continue
            cache = self._cache if self._state is st and st.version is not None else None
            for i, v in zip(todo, values, strict=True):
                rec = self._decode(st, v)
                out[i] = rec
                if cache is not None:
                    cache[i] = rec
            if cache is not None and len(cache) > self.cache_size:
                self._evict()
            return out
        raise StoreUnavailable("register version kept changing during lookup")

    async def _round_trip(self, keys: list[str], fields: list[str]) -> tuple[Any, list[Any]]:
        if self._script is not None:
            res = await self._script(keys=[self._cur_key, *keys], args=fields)
            return res[0], res[1:]
        pipe = self._client.pipeline()
        pipe.get(self._cur_key)
        for k, f in zip(keys, fields, strict=True):
            pipe.hget(k, f)
        res = await pipe.execute()
        return res[0], res[1:]

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

    def _evict(self) -> None:
        # FIFO by insertion order: cheap, and the hot IMEIs come straight back on the next miss.
        n = max(1, self.cache_size // 8)
        for k in list(islice(self._cache, n)):
            del self._cache[k]
        self.stats.cache_evictions += n

    # -- versions ------------------------------------------------------------------------------
    async def _refresh(self, cur: str | None) -> None:
        """Load everything for version `cur` and switch to it in one assignment."""
        async with self._refresh_lock:
            if cur == self._state.version:
                return
            new = await self._load_state(cur) if cur is not None else _State(None)
            old = self._state
            if new.buckets != old.buckets or old.version is None:
                self._cache.clear()
            else:  # same full load plus a different overlay: drop only what changed
                for k in old.overlay_raw.keys() | new.overlay_raw.keys():
                    if old.overlay_raw.get(k) != new.overlay_raw.get(k):
                        self._cache.pop(k, None)
            self._state = new
            self.stats.version_changes += 1
            log.info(
                "register version switched",
                version=cur,
                previous=old.version,
                kind=new.meta.get("kind"),
                imeis=int(new.meta.get("count", 0) or 0),
                overlay=len(new.overlay_raw),
            )

    async def _load_state(self, ver: str) -> _State:
        c = self._client
        meta = {
            k.decode(): v.decode()
            for k, v in (await c.hgetall(layout.meta_key(self.ns, ver))).items()
        }
        if not meta:
            raise StoreUnavailable(f"register version {ver} has no meta (being deleted?)")
        base = meta.get("base") or None
        buckets = layout.Buckets(self.ns, base, int(meta["k"])) if base else None
        raw_table = await c.hgetall(layout.table_key(self.ns, ver))
        table = {int(k): decode_record(v) for k, v in raw_table.items()}
        overlay_raw: dict[str, bytes] = {}
        cursor = 0
        okey = layout.overlay_key(self.ns, ver)
        while True:  # HSCAN: a large overlay must not block Redis in one reply
            cursor, part = await c.hscan(okey, cursor, count=10000)
            for k, v in part.items():
                overlay_raw[k.decode()] = v
            if cursor == 0:
                break
        st = _State(ver, buckets, table, overlay_raw, {}, meta)  # type: ignore[arg-type]
        st.overlay = {k: self._decode(st, v) for k, v in overlay_raw.items()}
        return st

    # -- availability --------------------------------------------------------------------------
    def _set_up(self, up: bool, error: BaseException | None = None) -> None:
        if up == self._up:
            return
        self._up = up
        self.stats.redis_up = int(up)
        if up:
            log.info("redis available", target=self.target.mode, version=self.version)
        else:
            log.warning("redis unavailable", target=self.target.mode, error=repr(error))
        self.ready = up

    async def _poll_once(self) -> None:
        async with asyncio.timeout(max(self.timeout, 1.0)):
            cur = await self._client.get(self._cur_key)
            cur_s = cur.decode() if cur is not None else None
            if cur_s != self._state.version:
                await self._refresh(cur_s)
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
            except StoreUnavailable as e:  # e.g. meta of a new version not readable yet
                log.warning("register version not loadable", error=str(e))
                await asyncio.sleep(self.poll_interval)
            except Exception as e:  # noqa: BLE001 - the poller must outlive any failure
                self.stats.redis_errors += 1
                self._set_up(False, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._client = async_client(self.target, self.timeout)
        if self.target.mode != "cluster":
            self._script = self._client.register_script(_LOOKUP_LUA)
        try:
            await self._poll_once()
        except Exception as e:  # noqa: BLE001 - start serving anyway, from the fallback
            self.stats.redis_errors += 1
            self._set_up(False, e)
        self._poller = asyncio.ensure_future(self._poll_forever())

    async def close(self) -> None:
        self._closed = True
        self.ready = False
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for futs in self._pending.values():
            for f in futs:
                if not f.done():
                    f.set_exception(StoreUnavailable("store closed"))
        self._pending.clear()
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
            pointer = await self._client.hgetall(layout.tac_key(self.ns))
            sha = pointer.get(b"sha256") if pointer else None
            if not sha:
                return None
            text = await self._client.get(layout.tac_data_key(self.ns, sha.decode()))
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
            "cache_entries": len(self._cache),
            "checked_at": time.time(),
        }

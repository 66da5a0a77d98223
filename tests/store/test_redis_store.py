"""RedisStore behaviour that the memory store does not have: batching, versions, outages."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import redis
import structlog

from eir_server.policy.types import BlacklistEntry, ImeiRecord
from eir_server.store import MISSING, StoreUnavailable, open_store
from eir_server.store.urls import parse_store_url

A, B, C = "35000000000001", "35000000000002", "35000000000003"


def publish_bl(dirbs, ts: str, imeis, base=-1, run=1, deltas=None):
    rows = [[i, "20240101", "stolen"] for i in imeis]
    return dirbs.publish(
        "blacklist", ts, rows, deltas=deltas or {"blocked": rows}, base=base, run=run
    )


async def started(url: str, **kw):
    s = open_store(url, **kw)
    await s.start()
    return s


async def test_misses_in_one_tick_share_one_round_trip(redis_url, dirbs, sync_dir):
    imeis = [f"3500000000{i:04d}" for i in range(0, 400, 2)]
    publish_bl(dirbs, "20240101_000000", imeis)
    sync_dir(redis_url, dirbs.root)
    s = await started(redis_url)
    try:
        asked = [f"3500000000{i:04d}" for i in range(200)]
        got = await asyncio.gather(*(s.fetch(i) for i in asked))
        assert s.stats.fetch_batches == 1 and s.stats.fetch_keys == 200
        assert [g is not None for g in got] == [i % 2 == 0 for i in range(200)]
        assert all(s.get_nowait(i) is not MISSING for i in asked)  # negatives cached too
        assert s.stats.cache_hits == 200
    finally:
        await s.close()


async def test_cache_keys_and_the_checkers_order(redis_url, dirbs, sync_dir):
    """The caches key IMEIs as numbers; fetch right after get_nowait missed (the checker's
    order) does not look in them again. Both only change costs: the same answers, and a
    second fetch is answered from the cache. A key that is not 14 digits (the policy never
    asks for one) is looked up as it is."""
    publish_bl(dirbs, "20240101_000000", [A])
    sync_dir(redis_url, dirbs.root)
    s = await started(redis_url)
    try:
        assert s.get_nowait("3500000000000x") is MISSING and s.get_nowait(A[:13]) is MISSING
        for imei in (A, B, "0" + A[1:]):
            assert s.get_nowait(imei) is MISSING
            assert ((await s.fetch(imei)) is not None) == (imei == A)
            assert (s.get_nowait(imei) is not None) == (imei == A)  # cached now
        fetches = s.stats.fetch_keys
        assert (await s.fetch(B)) is None and (await s.fetch(A)) is not None
        assert s.stats.fetch_keys == fetches  # from the cache, no round trip
    finally:
        await s.close()


async def test_lookups_survive_a_flushed_script_cache(redis_url, dirbs, sync_dir):
    """The lookup's EVALSHA is packed by the store itself; a Redis that lost its scripts
    (restarted, SCRIPT FLUSH) answers NOSCRIPT, and the lookup loads the script and goes on,
    with no error and no outage."""
    publish_bl(dirbs, "20240101_000000", [A])
    sync_dir(redis_url, dirbs.root)
    s = await started(redis_url)
    try:
        assert (await s.fetch(A)) is not None and (await s.fetch(B)) is None
        redis.Redis.from_url(redis_url).script_flush()
        got = await asyncio.gather(s.fetch(C), s.fetch(A[:-1] + "9"))
        assert got == [None, None]
        s._cache.clear()
        s._listed.clear()
        assert (await s.fetch(A)) is not None
        assert s.stats.redis_errors == 0 and s.stats.unavailable_fetches == 0
    finally:
        await s.close()


async def test_new_version_enforced_within_one_second(redis_url, dirbs, sync_dir):
    publish_bl(dirbs, "20240101_000000", [A])
    sync_dir(redis_url, dirbs.root)
    s = await started(redis_url)
    try:
        assert await s.fetch(B) is None and s.get_nowait(B) is None  # cached negative
        assert await s.fetch(A) is not None
        publish_bl(
            dirbs,
            "20240102_000000",
            [A, B],
            base=1,
            run=2,
            deltas={"blocked": [[B, "20240101", "stolen"]]},
        )
        r = sync_dir(redis_url, dirbs.root)
        assert r.mode == "delta"
        switched = time.monotonic()
        while s.get_nowait(B) in (None, MISSING):
            assert time.monotonic() - switched < 1.0, "change not enforced within 1 s"
            await asyncio.sleep(0.01)
        assert s.version == r.version
        assert s.get_nowait(A) is not MISSING  # a delta drops only what changed from the cache
    finally:
        await s.close()


async def test_full_load_switch_flushes_cache(redis_url, dirbs, sync_dir):
    publish_bl(dirbs, "20240101_000000", [A])
    sync_dir(redis_url, dirbs.root)
    s = await started(redis_url, poll_interval=0.05)
    try:
        assert await s.fetch(A) is not None
        publish_bl(dirbs, "20240102_000000", [C])
        sync_dir(redis_url, dirbs.root, force_full=True)
        deadline = time.monotonic() + 1
        while s.get_nowait(A) is not MISSING:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert await s.fetch(A) is None and await s.fetch(C) is not None
    finally:
        await s.close()


async def test_redis_down_serves_cache_fails_misses_fast_then_recovers(
    redis_factory, dirbs, sync_dir
):
    srv = redis_factory.start()
    publish_bl(dirbs, "20240101_000000", [A])
    sync_dir(srv.url, dirbs.root)
    s = await started(srv.url, timeout=0.3, backoff_max=0.2, poll_interval=0.05)
    try:
        assert await s.fetch(A) is not None
        with structlog.testing.capture_logs() as logs:
            srv.stop()
            assert s.get_nowait(A) == ImeiRecord(blacklist=BlacklistEntry("20240101", ("stolen",)))
            t = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(s.fetch(B), 2)
            assert time.monotonic() - t < 1.0
            # Once down, misses fail without touching the network, and only one state change is logged.
            for _ in range(100):
                with pytest.raises(StoreUnavailable):
                    await s.fetch(C)
        assert [e["event"] for e in logs].count("redis unavailable") == 1  # per state change
        assert s.stats.redis_up == 0 and not s.ready
        srv.start()
        sync_dir(srv.url, dirbs.root)  # restarted empty: re-feed it
        deadline = time.monotonic() + 3
        while not s.ready:
            assert time.monotonic() < deadline, "did not reconnect"
            await asyncio.sleep(0.02)
        assert await s.fetch(B) is None and s.stats.redis_up == 1
    finally:
        await s.close()


async def test_unreachable_at_start_then_appears(redis_factory, dirbs, sync_dir):
    from tests.netutil import port_nothing_listens_on

    port = port_nothing_listens_on()  # the store keeps connecting until redis-server binds it
    url = f"redis://127.0.0.1:{port}/0"
    s = await started(url, timeout=0.2, backoff_max=0.1)
    try:
        assert not s.ready and s.version is None
        with pytest.raises(StoreUnavailable):
            await s.fetch(A)
        srv = redis_factory.start(port)
        publish_bl(dirbs, "20240101_000000", [A])
        sync_dir(srv.url, dirbs.root)
        deadline = time.monotonic() + 3
        while s.version is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert s.ready and await s.fetch(A) is not None
    finally:
        await s.close()


async def test_hung_redis_never_leaves_a_future_pending(redis_factory, dirbs, sync_dir):
    srv = redis_factory.start()
    publish_bl(dirbs, "20240101_000000", [A])
    sync_dir(srv.url, dirbs.root)
    s = await started(srv.url, timeout=0.3)
    srv.proc.send_signal(signal.SIGSTOP)  # alive but silent: the worst kind of outage
    try:
        t = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(s.fetch(B), 3)
        assert time.monotonic() - t < 1.5
    finally:
        srv.proc.send_signal(signal.SIGCONT)
        await s.close()


async def test_store_without_any_register_is_an_outage(redis_url):
    """Reachable but never fed (serve started before the first sync, or Redis restarted
    empty): lookups fail as unavailable, so they get --store-fallback and are counted and
    logged as a fallback episode, never "listed nowhere" (which whitelists stolen devices)."""
    s = await started(redis_url)
    try:
        assert s.ready and s.version is None
        with pytest.raises(StoreUnavailable):
            await s.fetch(A)
    finally:
        await s.close()


async def test_cluster_delta_and_overlay(redis_cluster_url, dirbs, sync_dir):
    publish_bl(dirbs, "20240101_000000", [A, B])
    sync_dir(redis_cluster_url, dirbs.root)
    publish_bl(
        dirbs,
        "20240102_000000",
        [A, C],
        base=1,
        run=2,
        deltas={"blocked": [[C, "20240101", "stolen"]], "unblocked": [[B, "20240101", "stolen"]]},
    )
    assert sync_dir(redis_cluster_url, dirbs.root).mode == "delta"
    s = await started(redis_cluster_url)
    try:
        got = await asyncio.gather(*(s.fetch(i) for i in (A, B, C)))
        assert [g is not None for g in got] == [True, False, True]
    finally:
        await s.close()


def test_memory_per_imei_under_target(redis_url, dirbs, sync_dir):
    """The layout's whole point: a 200k blacklist costs <= 16 bytes of Redis memory per IMEI."""
    import random

    rnd = random.Random(7)
    rows = {
        f"{rnd.choice([35, 86, 1]):02d}{rnd.randrange(10**6):06d}{rnd.randrange(10**6):06d}"
        for _ in range(200_000)
    }
    body = "imei,block_date,reasons\n" + "".join(
        f"{i},2024010{rnd.randrange(1, 9)},stolen\n" for i in rows
    )
    dirbs.publish("blacklist", "20240101_000000", raw_full=body.encode())
    c = redis.Redis.from_url(redis_url)
    before = c.info("memory")["used_memory"]
    r = sync_dir(redis_url, dirbs.root)
    per = (c.info("memory")["used_memory"] - before) / r.imeis
    assert r.imeis == len(rows) and per <= 16, per
    assert c.object("encoding", c.randomkey()) in (b"listpack", b"embstr", b"int", b"raw")


def test_url_forms():
    t = parse_store_url("redis+sentinel://:pw@h1:26379,h2/mymaster/2?namespace=x&timeout=0.1")
    assert (t.mode, t.nodes, t.service, t.db, t.password) == (
        "sentinel",
        (("h1", 26379), ("h2", 26379)),
        "mymaster",
        2,
        "pw",
    )
    assert t.options == {"namespace": "x", "timeout": 0.1}
    t = parse_store_url("redis+cluster://a:7000,[::1]:7001")
    assert (t.mode, t.nodes) == ("cluster", (("a", 7000), ("::1", 7001)))
    t = parse_store_url("rediss://u:p@h:6380/1?cache_size=5&socket_keepalive=true")
    assert t.mode == "single" and t.options == {"cache_size": 5} and "socket_keepalive" in t.url


@pytest.mark.parametrize("client", ["lean", "redis-py", "cluster", "cluster-redis-py"])
async def test_a_bucket_lost_inside_redis_is_an_error_never_not_listed(
        client, request, dirbs, sync_dir):
    """A bucket hash gone from Redis (a Cluster primary restarted without its data, a failed
    reshard) used to read as "not listed" for every IMEI of it: a stolen device whitelisted.
    A full load now has every bucket key (sync writes a marker into the empty ones), so a
    missing key is told apart: those lookups fail (the checker answers its fallback), loudly
    once, never cached; the rest of the register answers as before."""
    from eir_server.checker import EquipmentChecker
    from eir_server.policy import Policy, PolicyConfig
    from eir_server.policy.types import CheckRequest, EquipmentStatus
    from eir_server.store import BucketLost
    from eir_server.store.layout import Buckets
    from eir_server.store.urls import sync_client

    url = request.getfixturevalue("redis_cluster_url" if client.startswith("cluster")
                                  else "redis_url")
    listed = [f"350000{i:08d}" for i in range(0, 3000, 3)]
    publish_bl(dirbs, "20240101_000000", listed)
    ver = sync_dir(url, dirbs.root).version
    c = sync_client(parse_store_url(url))
    meta = c.hgetall(f"eir:{ver}:m")
    assert meta[b"markers"] == b"1"
    b = Buckets("eir", ver, int(meta[b"k"]))
    victim = listed[0]
    key = b.locate(victim)[0]
    same_unlisted = f"{int(victim) + 10**b.k:014d}"  # same last k digits: same bucket
    other_listed = next(i for i in listed if b.locate(i)[0] != key)
    other_unlisted = f"{int(victim) + 1:014d}"
    assert b.locate(same_unlisted)[0] == key and same_unlisted not in listed
    assert c.delete(key) == 1
    c.close()
    s = await started(url, **({"lookup_client": "redis-py"} if client.endswith("redis-py")
                              else {}))
    try:
        with structlog.testing.capture_logs() as logs:
            for imei in (victim, same_unlisted, victim):  # the second time too: not cached
                with pytest.raises(BucketLost):
                    await s.fetch(imei)
                assert s.get_nowait(imei) is MISSING
            assert await s.fetch(other_listed) is not None
            assert await s.fetch(other_unlisted) is None
            # the checker: its fallback for that IMEI, counted, no outage episode
            checker = EquipmentChecker(Policy(PolicyConfig()), s, EquipmentStatus.GREYLISTED)
            pending = checker.check(CheckRequest(victim + "0"))
            assert isinstance(pending, asyncio.Future)
            verdict = await pending
            assert verdict.status is EquipmentStatus.GREYLISTED and verdict.rule == "store_fallback"
            assert checker.fallbacks == 1 and checker.episodes == 0
            assert not checker.fallback_active
        if client == "lean":
            assert s.general_batches == 0  # the lean connection's script answered them all
        elif client == "cluster":  # (a node's lean connection may still be opening at first)
            assert s.stats.fetch_batches > s.general_batches
        elif client.endswith("redis-py"):
            assert s.general_batches >= 5
        lost = [e for e in logs if e["event"].startswith("register incomplete")]
        assert len(lost) == 1 and lost[0]["key"] == key and lost[0]["log_level"] == "error"
        assert s.stats.redis_errors == 4 and s.ready
    finally:
        await s.close()


async def test_a_load_without_markers_reads_as_before(redis_url, dirbs, sync_dir):
    """A full load written before markers existed (no `markers` in its meta): a missing bucket
    key cannot be told from an empty one, so it still reads as not listed (no error for every
    IMEI of a register whose buckets were never all written)."""
    from eir_server.store.layout import Buckets

    publish_bl(dirbs, "20240101_000000", [A, B])
    ver = sync_dir(redis_url, dirbs.root).version
    c = redis.Redis.from_url(redis_url)
    assert c.hdel(f"eir:{ver}:m", "markers") == 1
    k = int(c.hget(f"eir:{ver}:m", "k"))
    assert c.delete(Buckets("eir", ver, k).locate(A)[0]) == 1
    c.close()
    s = await started(redis_url)
    try:
        assert await s.fetch(A) is None and await s.fetch(C) is None
        assert s.stats.redis_errors == 0
    finally:
        await s.close()


@pytest.mark.parametrize("cluster", [False, True])
async def test_sync_restores_a_lost_bucket_with_a_full_load(cluster, request, dirbs, sync_dir):
    """The next sync run notices buckets of the served full load missing from Redis and loads
    the register in full, though no list changed: the lost bucket's IMEIs are answered from
    the register again, not from the fallback until the next published file."""
    from eir_server.store.layout import Buckets
    from eir_server.store.urls import sync_client

    url = request.getfixturevalue("redis_cluster_url" if cluster else "redis_url")
    listed = [f"350000{i:08d}" for i in range(0, 3000, 3)]
    publish_bl(dirbs, "20240101_000000", listed)
    r1 = sync_dir(url, dirbs.root)
    assert sync_dir(url, dirbs.root).mode == "noop"  # nothing published, nothing lost
    c = sync_client(parse_store_url(url))
    b = Buckets("eir", r1.version, int(c.hget(f"eir:{r1.version}:m", "k")))
    assert c.delete(b.locate(listed[0])[0]) == 1
    c.close()
    with structlog.testing.capture_logs() as logs:
        r3 = sync_dir(url, dirbs.root)
    assert r3.mode == "full" and r3.version != r1.version
    lost = [e for e in logs if e["event"].startswith("register incomplete")]
    assert len(lost) == 1 and lost[0]["missing"] == 1 and lost[0]["log_level"] == "error"
    s = await started(url)
    try:
        assert await s.fetch(listed[0]) is not None and s.stats.redis_errors == 0
    finally:
        await s.close()
    assert sync_dir(url, dirbs.root).mode == "noop"

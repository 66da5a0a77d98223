"""Sentinel failover with real processes: a master, its replica and 3 Sentinels. The master is
SIGKILLed, Sentinel promotes the replica, and both sides of the register follow through the
same redis+sentinel:// URL: a serving RedisStore answers uncached lookups from the new master,
and `sync` (the same RegisterDB, as in `sync --interval`, and a fresh `eir-server sync`
process) writes the next version to it."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time

import pytest

from eir_server.store import StoreUnavailable, open_store
from eir_server.store.urls import parse_store_url
from eir_server.sync.engine import SyncOptions, run_once
from eir_server.sync.redis_db import RegisterDB
from eir_server.sync.source import DirSource

A, B, C, D, E = (f"3500000000000{i}" for i in range(1, 6))


def publish(dirbs, ts: str, imeis: list[str]) -> None:
    dirbs.publish("blacklist", ts, [[i, "20240101", "stolen"] for i in imeis])


async def fetch_when_up(store, imei: str, deadline: float):  # noqa: ANN001, ANN201
    """Fetch, retrying while the store reports Redis unavailable (until `deadline`)."""
    while True:
        try:
            return await store.fetch(imei)
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_store_and_sync_follow_a_sentinel_failover(redis_sentinel_failover, dirbs):
    group = redis_sentinel_failover
    url = group.url
    old_master, replica = group.master.port, group.replica.port
    assert group.master_port() == old_master

    publish(dirbs, "20240101_000000", [A, B, C])
    db = RegisterDB(parse_store_url(url))
    store = open_store(url, timeout=0.3, poll_interval=0.05, backoff_min=0.02, backoff_max=0.2)
    try:
        first = run_once(DirSource(dirbs.root), db, SyncOptions(grace=0))
        assert first.mode == "full" and first.imeis == 3
        group.wait_replicated()
        with contextlib.closing(group.replica.client()) as c:
            assert c.get("eir:cur") == first.version.encode()  # the register is on the replica

        await store.start()
        assert store.ready and store.version == first.version
        assert (await store.fetch(A)).blacklist is not None  # cached from now on
        batches = store.stats.fetch_batches

        # asyncio.to_thread: the store's poller keeps running (and failing) meanwhile.
        promoted = await asyncio.to_thread(group.kill_master_and_wait_failover)
        assert promoted.port == replica != old_master

        # Lookups: B and D were never asked, so they can only be answered by the new master.
        deadline = time.monotonic() + 10
        rec = await fetch_when_up(store, B, deadline)
        assert rec is not None and rec.blacklist is not None
        assert await store.fetch(D) is None
        assert store.ready and store.version == first.version
        assert store.stats.fetch_batches > batches
        assert store.stats.redis_errors > 0  # it did see the old master go away

        # The same RegisterDB (a long-running `sync --interval`) writes to the new master.
        publish(dirbs, "20240102_000000", [A, D])
        opts = SyncOptions(grace=0, allow_shrink=True)  # 3 -> 2 IMEIs is past the shrink guard
        second = await asyncio.to_thread(run_once, DirSource(dirbs.root), db, opts)
        assert second.mode == "full" and second.version != first.version
        with contextlib.closing(promoted.client()) as c:
            assert c.get("eir:cur") == second.version.encode()
        deadline = time.monotonic() + 5
        while store.version != second.version:
            assert time.monotonic() < deadline, "store did not follow the new version"
            await asyncio.sleep(0.02)
        got = await asyncio.gather(*(fetch_when_up(store, i, deadline) for i in (A, B, D)))
        assert [g is not None for g in got] == [True, False, True]

        # A fresh `eir-server sync` process finds the new master through the Sentinels too.
        publish(dirbs, "20240103_000000", [E])
        r = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "eir_server.cli", "sync", "--source", str(dirbs.root),
             "--store", url, "--grace", "0", "--progress", "never", "--allow-shrink"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        with contextlib.closing(promoted.client()) as c:
            third = c.get("eir:cur").decode()
        assert third not in (first.version, second.version)
        while store.version != third:
            assert time.monotonic() < deadline + 5, "store did not follow the CLI's version"
            await asyncio.sleep(0.02)
        assert await fetch_when_up(store, E, deadline + 5) is not None
    finally:
        await store.close()
        db.close()


def test_sentinel_url_with_no_reachable_master_is_store_error(redis_sentinel_failover, dirbs):
    """Every Sentinel says the master is down (no failover possible: the replica is gone too):
    the sync exits 3 and the store starts not ready, without raising."""
    group = redis_sentinel_failover
    publish(dirbs, "20240101_000000", [A])
    group.replica.stop()
    group.master.stop()
    r = subprocess.run(
        [sys.executable, "-m", "eir_server.cli", "sync", "--source", str(dirbs.root),
         "--store", group.url, "--grace", "0", "--progress", "never"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 3, r.stdout + r.stderr

    async def start() -> None:
        s = open_store(group.url, timeout=0.3)
        await s.start()
        try:
            assert not s.ready
            with pytest.raises(StoreUnavailable):
                await s.fetch(A)
        finally:
            await s.close()

    asyncio.run(start())

"""Register snapshot: the file format (property test) and RedisStore serving from it with real
redis-server processes: misses answered without Redis, deltas still enforced through the
overlay, a full load switching at once, one build shared by two stores (workers), the
last-known-good copy while Redis is down, and Redis Cluster."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eir_server.policy.types import ImeiRecord
from eir_server.store import open_store
from eir_server.store.snapshot import Snapshot, write

LISTED = [f"350000{i:08d}" for i in range(0, 5000, 7)]


IMEI14 = st.integers(0, 10**14 - 1).map(lambda i: f"{i:014d}")


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(IMEI14,
                       st.one_of(st.integers(0, 2**31 - 1), st.binary(min_size=1, max_size=40)
                                 .map(lambda b: b"\x3b" + b)),
                       max_size=300),
       st.lists(IMEI14, max_size=50), st.integers(1, 6))
def test_snapshot_file_round_trip(tmp_path_factory, items, probes, k):
    path = tmp_path_factory.mktemp("snap") / "x.snap"
    write(path, items, k)
    snap = Snapshot(path)
    try:
        assert snap.n == len(items)
        for imei, v in items.items():
            assert snap.get(imei) == v
            assert snap.get_number(int(imei)) == v  # the store's caches key IMEIs as numbers
        for p in probes:
            assert snap.get(p) == items.get(p)
            assert snap.get_number(int(p)) == items.get(p)
    finally:
        snap.close()


def test_the_filter_answers_most_unlisted_imeis_without_a_search(tmp_path):
    """Every key passes its filter (a false negative would be a listed device answered "not
    listed"); of IMEIs not in the file, only ~1 - e^(-1/16) = 6% do (each then costs the
    binary search)."""
    listed = {f"{35_000_000_000_000 + i * 7919:014d}": i for i in range(20_000)}
    path = tmp_path / "x.snap"
    write(path, listed, 4)  # type: ignore[arg-type]
    snap = Snapshot(path)
    try:
        rotate = snap.rotated
        assert all(snap.may_hold(rotate(int(i))) for i in listed)
        others = [n for n in range(35_100_000_000_000, 35_100_000_000_000 + 200_000 * 13, 13)]
        passed = sum(snap.may_hold(rotate(n)) for n in others)
        assert 0.03 < passed / len(others) < 0.10, passed / len(others)
        assert all(snap.get_number(n) is None for n in others)
    finally:
        snap.close()


def test_a_snapshot_of_an_older_format_is_refused_and_named_apart(tmp_path):
    """A file an older release built (format 1, no filter) is never mapped as this one; its
    name differs, so a store builds the new format beside it and deletes it."""
    import struct

    from eir_server.store.snapshot import file_name

    old = tmp_path / "eir-1-x.snap"  # format 1's name for the same load
    old.write_bytes(struct.pack("<8sQQQ", b"EIRSNAP1", 1, 0, 4) + (5).to_bytes(8, "little")
                    + (1).to_bytes(4, "little"))
    with pytest.raises(ValueError):
        Snapshot(old)
    assert file_name("eir", "1", "x") != old.name
    assert file_name("eir", "1", "x").endswith(".snap")  # still found and cleaned by its glob


def test_truncated_snapshot_is_refused(tmp_path):
    import pytest

    path = tmp_path / "x.snap"
    write(path, {"35000000000001": 1, "35000000000002": b"\x3bxyz"}, 4)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError):
        Snapshot(path)


def publish(dirbs, ts: str = "20240101_000000", imeis=LISTED, run: int = 1, base: int = -1,
            deltas=None) -> None:
    rows = [[i, "20240101", "stolen"] for i in imeis]
    dirbs.publish("blacklist", ts, rows, deltas=deltas or {"blocked": rows}, run=run, base=base)


async def until(cond, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_misses_answered_from_the_snapshot_shared_by_two_workers(
        redis_factory, dirbs, sync_dir, tmp_path):
    srv = redis_factory.start()
    publish(dirbs)
    sync_dir(srv.url, dirbs.root)
    snapdir = tmp_path / "snap"
    snapdir.mkdir()
    older = snapdir / "eir-1-stale.snap"  # an older release's file: deleted by the build
    older.write_bytes(b"EIRSNAP1")
    a = open_store(srv.url, snapshot_dir=str(snapdir), poll_interval=0.05)
    b = open_store(srv.url, snapshot_dir=str(snapdir), poll_interval=0.05)
    await asyncio.gather(a.start(), b.start())
    try:
        await until(lambda: a._state.snap is not None and b._state.snap is not None,
                    "snapshot not mapped")
        assert a._state.snap.path == b._state.snap.path  # one file for the node
        assert len(list(snapdir.glob("*.snap"))) == 1 and not older.exists()
        batches = a.stats.fetch_batches
        for n in range(5000):
            imei = f"350000{n:08d}"
            got = a.get_nowait(imei)
            assert (got is not None) == (imei in LISTED), imei
        assert a.stats.fetch_batches == batches  # no Redis round trip for any of them
        assert a.stats.snapshot_hits + a.stats.snapshot_misses == 5000
        assert a.stats.snapshot_hits == len(LISTED)

        # A delta: enforced through the overlay within a second, snapshot kept.
        new = "35000000000001"
        publish(dirbs, "20240102_000000", [*LISTED, new], run=2, base=1,
                deltas={"blocked": [[new, "20240101", "stolen"]]})
        r = await asyncio.to_thread(sync_dir, srv.url, dirbs.root)
        assert r.mode == "delta"
        t = time.monotonic()
        await until(lambda: isinstance(a.get_nowait(new), ImeiRecord), "delta not enforced", 1.0)
        assert time.monotonic() - t < 1.0 and a._state.snap is not None

        # A full load: enforced at once from Redis, then a new snapshot replaces the old one.
        gone, added = LISTED[3], "35000000000002"
        dirbs.publish("blacklist", "20240103_000000", [[added, "20240101", "stolen"]])
        # One row where many were served: past the shrink guard, meant here.
        r = await asyncio.to_thread(
            sync_dir, srv.url, dirbs.root, force_full=True, allow_shrink=True
        )
        await until(lambda: a.version == r.version, "full load not picked up", 1.0)
        assert await a.fetch(gone) is None and await a.fetch(added) is not None
        await until(lambda: a._state.snap is not None, "new snapshot not mapped")
        assert a.get_nowait(gone) is None and a.get_nowait(added) is not None
        await until(lambda: len(list(snapdir.glob("*.snap"))) == 1, "old snapshot kept")
    finally:
        await a.close()
        await b.close()


async def test_redis_down_answers_from_the_last_known_good_snapshot(
        redis_factory, dirbs, sync_dir, tmp_path):
    srv = redis_factory.start()
    publish(dirbs)
    sync_dir(srv.url, dirbs.root)
    s = open_store(srv.url, snapshot_dir=str(tmp_path / "snap"), timeout=0.2,
                   poll_interval=0.05)
    await s.start()
    try:
        await until(lambda: s._state.snap is not None, "snapshot not mapped")
        srv.stop()
        await until(lambda: s.stats.redis_up == 0, "outage not noticed", 3.0)
        assert s.ready  # verdicts still come from the register (its last-known-good copy)
        assert await s.fetch(LISTED[10]) is not None
        assert await s.fetch("35000000000003") is None
    finally:
        await s.close()


async def test_snapshot_from_a_cluster(redis_cluster_url, dirbs, sync_dir, tmp_path):
    publish(dirbs)
    sync_dir(redis_cluster_url, dirbs.root)
    s = open_store(redis_cluster_url, snapshot_dir=str(tmp_path / "snap"))
    await s.start()
    try:
        await until(lambda: s._state.snap is not None, "snapshot not mapped")
        got = [s.get_nowait(f"350000{n:08d}") is not None for n in range(2000)]
        assert got == [f"350000{n:08d}" in LISTED for n in range(2000)]
    finally:
        await s.close()


@pytest.mark.parametrize("restore", [True, False])  # listpacks RESTOREd, or HSETs
async def test_empty_buckets_hold_a_marker_the_snapshot_skips(
        redis_factory, dirbs, sync_dir, tmp_path, restore):
    """Three IMEIs in 10 buckets: sync writes the marker field into the 7+ empty ones (every
    bucket key of the load exists), counts only the IMEIs, and the snapshot skips markers."""
    import redis

    from eir_server.store.layout import MARKER_FIELD, Buckets
    from eir_server.store.snapshot import build

    srv = redis_factory.start()
    imeis = ["35000000000011", "35000000000021", "35000000000031"]
    publish(dirbs, imeis=imeis)
    r = sync_dir(srv.url, dirbs.root, restore=restore)
    assert r.imeis == 3
    c = redis.Redis.from_url(srv.url)
    meta = c.hgetall(f"eir:{r.version}:m")
    k = int(meta[b"k"])
    assert meta[b"markers"] == b"1" and meta[b"count"] == b"3"
    b = Buckets("eir", r.version, k)
    full = {b.locate(i)[0] for i in imeis}
    for n in range(10**k):
        key = f"eir:{r.version}:b:{n:0{k}d}"
        fields = c.hgetall(key)
        assert fields, key  # every bucket key exists
        assert (MARKER_FIELD in fields) == (key not in full), (key, fields)
    assert build(srv.url, "eir", r.version, k, tmp_path / "x.snap") == 3
    snap = Snapshot(tmp_path / "x.snap")
    try:
        assert [snap.get(i) is not None for i in imeis] == [True] * 3
        assert snap.get("35000000000001") is None
    finally:
        snap.close()
    c.close()


async def test_a_bucket_lost_inside_redis_refuses_the_snapshot(
        redis_factory, dirbs, sync_dir, tmp_path):
    """A bucket hash gone from Redis (a Cluster primary restarted empty) reads like a bucket
    with no IMEI; the builder compares what it read with the count sync wrote and refuses to
    build a snapshot that would answer "not listed" for that bucket's IMEIs."""
    import pytest
    import redis
    import structlog

    from eir_server.store.layout import Buckets
    from eir_server.store.snapshot import IncompleteRegister, build

    srv = redis_factory.start()
    publish(dirbs)
    ver = sync_dir(srv.url, dirbs.root).version
    c = redis.Redis.from_url(srv.url)
    k = int(c.hget(f"eir:{ver}:m", "k"))
    whole = tmp_path / "whole.snap"
    assert build(srv.url, "eir", ver, k, whole) == len(LISTED)  # intact: built in full
    bucket = Buckets("eir", ver, k).locate(LISTED[0])[0]
    lost = c.hlen(bucket)
    assert 0 < lost < len(LISTED) and c.delete(bucket) == 1
    out = tmp_path / "short.snap"
    # A load with markers (every bucket key exists): the missing key itself is named ...
    with pytest.raises(IncompleteRegister, match=f"bucket {bucket} is missing"):
        build(srv.url, "eir", ver, k, out)
    # ... one without (written before markers existed): the IMEI count tells.
    assert c.hdel(f"eir:{ver}:m", "markers") == 1
    with pytest.raises(IncompleteRegister, match=f"{len(LISTED) - lost:,} IMEIs"):
        build(srv.url, "eir", ver, k, out)
    assert not out.exists()

    snapdir = tmp_path / "snap"
    s = open_store(srv.url, snapshot_dir=str(snapdir), poll_interval=0.05)
    with structlog.testing.capture_logs() as logs:
        await s.start()
        try:
            await until(lambda: any(e["event"].startswith("register incomplete")
                                    for e in logs), "refusal not logged")
            await asyncio.sleep(0.3)
            assert s._state.snap is None and not list(snapdir.glob("*.snap"))
            assert s.ready  # Redis still answers the rest of the register
        finally:
            await s.close()
    refused = [e for e in logs if e["event"].startswith("register incomplete")]
    assert len(refused) == 1 and refused[0]["log_level"] == "error"
    assert f"sync wrote {len(LISTED):,}" in refused[0]["error"]
    c.close()


def test_snapshot_dir_option_spellings(tmp_path: Path):
    s = open_store(f"redis://127.0.0.1:1/0?snapshot_dir={tmp_path}")
    assert s.snapshot_dir == tmp_path  # type: ignore[attr-defined]

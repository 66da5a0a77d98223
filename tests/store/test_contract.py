"""One contract, every backend: memory, Redis (single node), Redis Cluster, Redis Sentinel."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from eir_server.policy.types import BlacklistEntry, ExceptionEntry, ImeiRecord, NotificationEntry
from eir_server.store import MISSING, MemoryStore, RecordStore, StoreUnavailable, open_store

RECORDS = {
    "35000000000001": ImeiRecord(blacklist=BlacklistEntry("20240101", ("stolen",))),
    "35000000000002": ImeiRecord(blacklist=BlacklistEntry("20240102", ("lost", "stolen"))),
    "35000000000003": ImeiRecord(
        notifications=(NotificationEntry("310150000000001", "15551234567", "20240103", ("dup",)),)
    ),
    "35000000000004": ImeiRecord(
        blacklist=BlacklistEntry("20240104", ()),
        exceptions=(ExceptionEntry("310150000000002", "15550000000"),),
    ),
    "86000000000005": ImeiRecord(
        notifications=(
            NotificationEntry("310150000000003", "", "20240105", ("a", "b"), True),
            NotificationEntry("310150000000004", "1555", "20240106", ("c",), False),
        ),
        exceptions=(ExceptionEntry("310150000000009", ""),),
    ),
}
# Many blacklist-only IMEIs sharing few values (the shape of a real blacklist).
for i in range(300):
    RECORDS[f"{49015420323751 + i * 7919:014d}"[:14]] = ImeiRecord(
        blacklist=BlacklistEntry(f"202301{1 + i % 28:02d}", ("stolen",) if i % 3 else ("lost",))
    )
UNLISTED = ["35000000000000", "99999999999999", "00000000000000", "35000000000006"]


def publish(dirbs, records: dict[str, ImeiRecord], ts: str = "20240101_000000") -> Path:
    bl, notif, exc = [], [], []
    for imei, r in records.items():
        if r.blacklist:
            bl.append([imei, r.blacklist.block_date, "|".join(r.blacklist.reasons)])
        for n in r.notifications:
            notif.append(
                [
                    imei,
                    n.imsi,
                    n.msisdn,
                    n.block_date,
                    "|".join(n.reasons),
                    "True" if n.amnesty_granted else "False",
                ]
            )
        for e in r.exceptions:
            exc.append([imei, e.imsi, e.msisdn])
    dirbs.publish("blacklist", ts, bl)
    dirbs.publish("notifications_op1", ts, notif)
    dirbs.publish("exceptions_op1", ts, exc)
    return dirbs.root


@pytest.fixture(params=["memory", "memory-dir", "memory-snapshot", "redis", "cluster",
                        "sentinel"])
async def store(request, dirbs, sync_dir, tmp_path):
    if request.param == "memory":
        s: RecordStore = MemoryStore()
        s.put_many(RECORDS)
    elif request.param == "memory-dir":
        s = open_store(None, register_dir=str(publish(dirbs, RECORDS)))
    elif request.param == "memory-snapshot":  # the node-shared snapshot file, mapped
        s = open_store(None, register_dir=str(publish(dirbs, RECORDS)),
                       snapshot_dir=tmp_path / "snap")
    else:
        url = {
            "redis": lambda: request.getfixturevalue("redis_url"),
            "cluster": lambda: request.getfixturevalue("redis_cluster_url"),
            "sentinel": lambda: request.getfixturevalue("redis_sentinel"),
        }[request.param]()
        if request.param == "sentinel":  # shared master: isolate by namespace
            url += "?namespace=t" + str(id(request))
        result = sync_dir(url, publish(dirbs, RECORDS))
        assert result.mode == "full"
        s = open_store(url)
    await s.start()
    yield s
    await s.close()


async def test_fetch_answers_every_listed_and_unlisted_imei(store):
    assert store.ready
    got = await asyncio.gather(*(store.fetch(i) for i in RECORDS))
    assert dict(zip(RECORDS, got, strict=True)) == RECORDS
    for imei in UNLISTED:
        assert await store.fetch(imei) is None


async def test_get_nowait_answers_after_fetch_including_negatives(store):
    for imei in [*RECORDS, *UNLISTED]:
        r = store.get_nowait(imei)
        if r is MISSING:
            r = await store.fetch(imei)
        assert r == RECORDS.get(imei)
        assert store.get_nowait(imei) == RECORDS.get(imei)  # now cached (or always there)


async def test_duplicate_fetches_in_one_tick_resolve_together(store):
    futs = [store.fetch("35000000000002") for _ in range(5)] + [store.fetch(UNLISTED[0])]
    got = await asyncio.gather(*futs)
    assert got[:5] == [RECORDS["35000000000002"]] * 5 and got[5] is None


async def test_version_and_counters_exposed(store):
    assert store.version is not None
    await store.fetch("35000000000001")
    stats = store.stats.as_dict()
    assert all(isinstance(v, int) for v in stats.values())
    assert stats["fetches"] >= 1


def test_open_store_rejects_unknown_scheme():
    with pytest.raises(ValueError):
        open_store("mongodb://x")
    with pytest.raises(ValueError):
        open_store("redis://localhost:1/0", register_dir="/tmp")


async def test_closed_redis_store_fails_fast(redis_url, dirbs, sync_dir):
    sync_dir(redis_url, publish(dirbs, RECORDS))
    s = open_store(redis_url)
    await s.start()
    await s.close()
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(s.fetch("35000000000001"), 1)

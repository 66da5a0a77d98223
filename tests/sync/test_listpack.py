"""Full loads written as RESTOREd listpacks (sync/listpack.py, sync/columnar.py).

The payloads are byte for byte what Redis itself builds with HSET (checked with DUMP), and a
full load through RESTORE leaves the same buckets, counts and reports as through HSET.
"""

from __future__ import annotations

import random

import pytest
import redis

from eir_server.sync.listpack import crc64, crc64_many, entry, payload

EDGES = [b"0", b"1", b"127", b"128", b"-1", b"4095", b"4096", b"-4097", b"32767", b"32768",
         b"8388607", b"8388608", b"2147483647", b"2147483648", b"9223372036854775807",
         b"9223372036854775808", b"-9223372036854775808", b"01", b"-0", b"", b"x" * 63,
         b"y" * 64, b"B20240101\x1fstolen|lost"]  # fmt: skip


def test_crc64_is_redis_crc64():
    assert crc64(b"123456789") == 0xE9C6D914C4B8D9CA  # CRC-64/Jones check value
    rnd = random.Random(1)
    data = [rnd.randbytes(rnd.randrange(0, 300)) for _ in range(700)]
    assert crc64_many(data, group=64) == [crc64(d) for d in data]


def test_payload_is_what_redis_dumps_for_the_same_hsets(redis_url):
    c = redis.Redis.from_url(redis_url)
    c.config_set("rdbcompression", "no")  # DUMP without LZF, to compare bytes
    rnd = random.Random(7)
    try:
        for _ in range(200):
            pairs: dict[bytes, bytes] = {}
            for _ in range(rnd.randint(1, 40)):
                f = rnd.choice([*EDGES, b"1%09d" % rnd.randrange(10**9), rnd.randbytes(5)])
                pairs[f] = rnd.choice(EDGES)
            c.delete("a", "b")
            for f, v in pairs.items():
                c.hset("a", f, v)
            c.restore("b", 0, payload(list(pairs.items())))
            assert c.hgetall("b") == c.hgetall("a")
            if c.object("encoding", "a") == b"listpack":
                assert payload(list(pairs.items())) == c.dump("a")
    finally:
        c.config_set("rdbcompression", "yes")
        c.close()


def test_entry_lengths_end_with_their_backlen():
    for s in [*EDGES, b"z" * 200, b"z" * 5000]:
        e = entry(s)
        assert e[-1] == len(e) - 1 or e[-1] & 0x80  # one-byte backlen, or a longer one


def dump_buckets(url: str) -> tuple[dict, dict]:
    c = redis.Redis.from_url(url)
    ver = c.get("eir:cur").decode()
    meta = c.hgetall(f"eir:{ver}:m")
    buckets = {
        k.decode().split(":b:")[1]: c.hgetall(k) for k in c.scan_iter(f"eir:{ver}:b:*", count=1000)
    }
    table = c.hgetall(f"eir:{ver}:r")
    c.close()
    return buckets, {"count": meta[b"count"], "records": meta[b"records"], "table": table}


@pytest.mark.parametrize("bucket_size", [None, 1])
def test_full_load_through_restore_equals_hset(redis_url, dirbs, sync_dir, bucket_size):
    """Same file (duplicates, bad rows, IMEIs also on a notification list) both ways: same
    buckets, count, record table, bad lines and duplicate reports."""
    rnd = random.Random(3)
    rows = []
    for i in range(20_000):
        imei = f"35{rnd.randrange(10**12):012d}"
        rows.append([imei, f"2024{1 + i % 12:02d}{1 + rnd.randrange(28):02d}", rnd.choice(
            ["stolen", "lost", "stolen|lost", ""])])
    rows += [[rows[5][0], "20230101", "earlier"], [rows[6][0], "20250101", "later"]]
    rows += [["35X00000000000", "20240101", "x"], ["35000000000001", "20241301", "x"]]
    rows.insert(100, [rows[7][0] + "0", "20240102", "fifteen digits"])
    notif = [[rows[9][0], "001010000000001", "", "20240101", "r", "False"]]
    dirbs.publish("blacklist", "20240101_000000", rows)
    dirbs.publish("notifications_op1", "20240101_000000", notif)
    got = []
    for restore in (True, False):
        c = redis.Redis.from_url(redis_url)
        c.flushall()
        c.close()
        r = sync_dir(redis_url, dirbs.root, restore=restore, bucket_size=bucket_size)
        assert r.mode == "full" and r.error is None
        got.append((dump_buckets(redis_url), r.as_dict()["lists"], r.imeis, r.rows))
    (b1, m1), lists1, imeis1, rows1 = got[0]
    (b2, m2), lists2, imeis2, rows2 = got[1]
    assert b1 == b2 and m1 == m2
    assert (imeis1, rows1) == (imeis2, rows2)
    assert lists1 == lists2
    files = lists1["blacklist"]["files"][0]
    assert files["bad"] == 2 and files["duplicates"] == 3

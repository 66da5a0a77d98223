"""Full loads written as RESTOREd listpacks (sync/listpack.py, sync/columnar.py).

The payloads are byte for byte what Redis itself builds with HSET (checked with DUMP), and a
full load through RESTORE leaves the same buckets, counts and reports as through HSET.
"""

from __future__ import annotations

import random
from binascii import unhexlify

import numpy as np
import pytest
import redis

from eir_server.sync.columnar import Buckets, restore_commands
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


@pytest.mark.parametrize("k", [5, 3, 2])
@pytest.mark.parametrize(
    "stored",
    [
        [b"%d" % i for i in range(1, 300)],  # record ids: value entries of 2-4 bytes
        [b"%d" % i for i in (1, 200, 5000, 40000, 8_000_000, 9_000_000_000)],  # up to 10 bytes
        [b"B20240101\x1fstolen", b"B20231231\x1f", b"7"],  # whole records (<= 16 bytes)
        [b"B20240101\x1f" + b"r" * 60, b"12"],  # and longer
    ],
)
def test_restore_commands_are_the_reference_payloads(k, stored):
    """Every RESTORE body is listpack.payload() of the bucket's (field, value) pairs in key
    order, whichever way the entries are laid out (words, byte matrix, gather)."""
    rnd = random.Random(k * 100 + len(stored))
    cut = 14 - k
    imeis = sorted(rnd.sample(range(10**14), 3000) + [0, 10**14 - 1])
    keys = np.array(sorted((i % 10**k) * 10**cut + i // 10**k for i in imeis), dtype=np.int64)
    vids = np.array([rnd.randrange(len(stored)) for _ in keys], dtype=np.int64)
    values = [entry(x) for x in stored]

    def field(prefix: int) -> bytes:
        if cut <= 9:
            return b"%d" % (10**cut + prefix)
        return unhexlify(("1" if cut % 2 else "") + f"{prefix:0{cut}d}")

    want: dict[int, list[tuple[bytes, bytes]]] = {}
    for key, vid in zip(keys.tolist(), vids.tolist(), strict=True):
        want.setdefault(key // 10**cut, []).append((field(key % 10**cut), stored[vid]))
    got = {}
    for cmds in restore_commands(Buckets(keys, vids), values, k, str, batch=64):
        for key, head, body in cmds:
            got[int(key)] = (head, body)
    assert sorted(got) == sorted(want)
    for bucket, pairs in want.items():
        p = payload(pairs)
        kb = str(bucket).encode()
        head = b"*4\r\n$7\r\nRESTORE\r\n$%d\r\n%s\r\n$1\r\n0\r\n$%d\r\n" % (len(kb), kb, len(p))
        assert got[bucket] == (head, p + b"\r\n")

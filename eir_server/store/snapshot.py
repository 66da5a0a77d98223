"""Register snapshot: a full load's buckets as one immutable, memory-mapped file per node.

Why: a lookup that misses the worker's cache otherwise costs a Redis round trip and its client
machinery (tens of µs of worker CPU); a binary search in a mapped array costs ~1-2 µs, and every
worker of a node maps the same file, so the register's memory is shared (page cache), not
loaded once per worker. Redis stays the source of truth and the change channel: deltas still
arrive as the version's overlay (loaded by every worker at each switch), a full load still
switches immediately (lookups go to Redis until the new snapshot is ready), and while Redis
cannot answer the snapshot plus the last overlay are a last-known-good copy of the register.

File layout (little endian): header MAGIC, n, extras_len, k, m; n uint64 keys sorted ascending;
n uint32 values (a record-table id, or 0x80000000 | offset of an encoded listing in the extras
blob); the filter, ceil(m / 8) bytes: bit (key % m) is set for every key, so nearly every IMEI
that is not listed (most lookups) is answered by one bit, with no binary search (m, a prime, is
about FILTER_BITS per key: ~6% of them pass it and are searched); extras blob of (uint32
length, bytes) entries. m is prime because keys are decimal numbers: with a round m (a power of
two, a multiple of ten), IMEIs that differ only in a few digits shared one bit.

A key is the IMEI's 14 digits rotated so that the bucket suffix (last k digits) comes first:
reading the buckets in suffix order and sorting each small bucket then yields the whole file in
order, so a 10M-IMEI build never sorts (or holds) more than one bucket in Python objects. k = 0
(no rotation: the key is the IMEI) is what the embedded register's snapshot uses
(register_snapshot.py), built from files, not buckets.

The file is built by `eir_server.store.snapshot`'s `main` (a separate process: the decoding
loop over millions of entries would stall the serving loop), named after the full load's version
and its `created` stamp, written to a temporary name and renamed, so a reader sees it whole or
not at all. An exclusive lock file makes one worker of a node build while the others wait.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import mmap
import os
import re
import struct
import sys
import time
from array import array
from binascii import hexlify
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

MAGIC = b"EIRSNAP2"  # 1: without the filter
HEADER = struct.Struct("<8sQQQQ")
EXTRA: Final = 0x80000000
FILTER_BITS: Final = 16  # filter bits per key (one hash): 1 - e^(-1/16) = 6% false positives
INDEX_STRIDE: Final = 128  # keys per step of the in-process index (Snapshot.find)
# Final: compiled, a module global is read from the module's dict at each use (~1 in 9 of a
# find's samples under perf); a Final one is a constant.
_bisect_left: Final = bisect.bisect_left
_bisect_right: Final = bisect.bisect_right
LOCK_STALE = 300.0  # seconds after which a builder's lock is considered abandoned


def file_name(ns: str, base: str, created: str) -> str:
    """The file of a full load; the format's version in the name (the magic's last byte), so
    that a file an older release left is rebuilt, not mapped (remove_others deletes it)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{ns}-{base}-{created}")
    return f"{safe}.v{MAGIC[-1:].decode()}.snap"


class Snapshot:
    """One mapped snapshot file. `get` returns the raw bucket value (int table id or bytes of
    an encoded listing) or None when the IMEI is not in this full load."""

    __slots__ = ("path", "n", "k", "_scale", "_shift", "_mm", "_keys", "_vals",
                 "_filter", "_bits", "_extras", "_index")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if len(self._mm) < HEADER.size:
            self._mm.close()
            raise ValueError(f"{self.path}: not a complete register snapshot")
        magic, n, extras_len, k, m = HEADER.unpack_from(self._mm, 0)
        flen = (m + 7) // 8
        if (magic != MAGIC or len(self._mm) != HEADER.size + n * 12 + flen + extras_len
                or not 0 <= k <= 13 or m < 1):
            self._mm.close()
            raise ValueError(f"{self.path}: not a complete register snapshot")
        self.n: int = n
        self.k: int = k
        self._scale: int = 10**k
        self._shift: int = 10 ** (14 - k)
        mv = memoryview(self._mm)
        off = HEADER.size
        self._keys = mv[off:off + n * 8].cast("Q")
        self._vals = mv[off + n * 8:off + n * 12].cast("I")
        off += n * 12
        self._filter = mv[off:off + flen]
        self._bits: int = m
        self._extras = mv[off + flen:]
        # Every INDEX_STRIDE-th key, in this process: a binary search over the mapped array
        # reads an item per step (a Python int made each time: ~7k instructions for 1M keys);
        # over a list it compares ints it already has, leaving log2(INDEX_STRIDE) = 7 steps in
        # one page of the map. ~0.3 bytes per IMEI (3 MB per worker for 10M).
        self._index: list[int] = self._keys[::INDEX_STRIDE].tolist()

    def may_hold(self, key: int) -> bool:
        """The filter: False means `key` is not in the file."""
        h = key % self._bits
        return bool(self._filter[h >> 3] >> (h & 7) & 1)

    def rotated(self, imei: int) -> int:
        """The key of an IMEI (its 14 digits as a number): the bucket suffix first."""
        return imei % self._scale * self._shift + imei // self._scale

    def find(self, key: int) -> int:
        """The position of `key` in the sorted keys, or -1."""
        if not self.may_hold(key):  # most lookups end here
            return -1
        i = _bisect_right(self._index, key) - 1
        if i < 0:
            return -1
        lo = i * INDEX_STRIDE
        hi = min(lo + INDEX_STRIDE, self.n)
        keys = self._keys
        pos = _bisect_left(keys, key, lo, hi)
        return pos if pos < hi and keys[pos] == key else -1

    def get(self, imei14: str) -> int | bytes | None:
        return self.get_number(int(imei14))

    def get_number(self, imei: int) -> int | bytes | None:
        """`get` of the IMEI's 14 digits read as a number (as the store's caches key it)."""
        pos = self.find(self.rotated(imei))
        if pos < 0:
            return None
        v = self._vals[pos]
        if v & EXTRA:
            return self.extra(v & ~EXTRA)
        return v

    def extra(self, off: int) -> bytes:
        """The extras blob entry at `off` (a value's offset without the EXTRA flag)."""
        length = int.from_bytes(self._extras[off:off + 4], "little")
        return bytes(self._extras[off + 4:off + 4 + length])

    def close(self) -> None:
        # Views first: an mmap with exported buffers cannot close (it then closes with us).
        for v in (self._keys, self._vals, self._filter, self._extras):
            v.release()
        with contextlib.suppress(BufferError):
            self._mm.close()


class Writer:
    """Collects keys in ascending order (`add`), then writes the file atomically (`finish`)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.keys = array("Q")
        self.vals = array("I")
        self.extras = bytearray()

    def add(self, key: int, value: int | bytes) -> None:
        self.keys.append(key)
        if isinstance(value, int):
            self.vals.append(value)
        else:
            self.vals.append(EXTRA | self.add_extra(value))

    def add_extra(self, value: bytes) -> int:
        """Append one extras entry; its offset (a value is EXTRA | offset)."""
        off = len(self.extras)
        if off + 4 + len(value) >= EXTRA:
            raise OverflowError("snapshot extras blob over 2 GiB")
        self.extras += len(value).to_bytes(4, "little") + value
        return off

    def finish(self, path: Path) -> None:
        keys, vals = self.keys, self.vals
        m, filt = bloom(keys)
        if sys.byteorder != "little":  # pragma: no cover - the file format is little endian
            keys.byteswap()
            vals.byteswap()
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(HEADER.pack(MAGIC, len(keys), len(self.extras), self.k, m))
                f.write(keys.tobytes())
                f.write(vals.tobytes())
                f.write(filt)
                f.write(self.extras)
                # On disk before the name: after a power cut the name never points at a hole.
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()  # e.g. disk full: no half file left behind
            raise


def bloom(keys: array[int]) -> tuple[int, bytes]:
    """(m, the filter of `keys`): see the file layout."""
    # numpy, imported here: only a builder needs it (0.9 s for 10M keys, where a loop over
    # them took 3.2 s compiled); the serving processes never do.
    import numpy as np

    m = _prime_from(max(11, len(keys) * FILTER_BITS))
    filt = np.zeros((m + 7) // 8, dtype=np.uint8)
    h = np.frombuffer(keys, dtype=np.uint64) % np.uint64(m)
    np.bitwise_or.at(filt, h >> np.uint64(3),
                     np.left_shift(np.uint8(1), (h & np.uint64(7)).astype(np.uint8)))
    return m, filt.tobytes()


def _prime_from(n: int) -> int:
    """The smallest prime >= n (trial division: n is at most a few billion)."""
    n |= 1
    while True:
        d = 3
        while d * d <= n and n % d:
            d += 2
        if d * d > n:
            return n
        n += 2


def write(path: Path, items: dict[str, int | bytes], k: int) -> None:
    """Write `items` (14-digit IMEI -> table id or encoded listing): for tests and tools."""
    cut = 14 - k
    w = Writer(k)
    for key, v in sorted((int(i[cut:] + i[:cut]), v) for i, v in items.items()):
        w.add(key, v)
    w.finish(path)


def _prefix_decoder(k: int) -> Callable[[bytes], int]:
    """Bucket field -> the IMEI's first 14-k digits as an int (inverse of layout.field_of)."""
    plen = 14 - k
    if plen <= 9:
        base = 10**plen
        return lambda f: int(f) - base  # "1" + digits
    odd = plen % 2 == 1
    return lambda f: int(hexlify(f)[1:] if odd else hexlify(f))


class IncompleteRegister(Exception):
    """The full load in Redis is not what sync wrote: a bucket gone, or another IMEI count."""


# The builder's exit status when the full load in Redis is not whole (1: any other failure).
INCOMPLETE_EXIT: Final = 3


def read_buckets(client: Any, ns: str, base: str, k: int, chunk: int = 500,
                 markers: bool = False) -> Writer:
    """Every entry of a full load, bucket by bucket in pipelined chunks, in key order.
    `markers`: the load has every bucket key (layout.MARKER_FIELD), so a missing one is lost."""
    from . import layout

    decode = _prefix_decoder(k)
    shift = 10 ** (14 - k)
    scale = 10**k
    w = Writer(k)
    for lo in range(0, scale, chunk):
        pipe = client.pipeline(transaction=False)
        sfxs = range(lo, min(scale, lo + chunk))
        for s in sfxs:
            pipe.hgetall(layout.bucket_key(ns, base, s, k))
        for s, bucket in zip(sfxs, pipe.execute(), strict=True):
            if not bucket and markers:
                raise IncompleteRegister(
                    f"full load {base}: bucket {layout.bucket_key(ns, base, s, k)} is missing "
                    "from Redis (a primary restarted empty, a failed reshard?)")
            top = s * shift
            for p, v in sorted((decode(f), v) for f, v in bucket.items()
                               if f != layout.MARKER_FIELD):
                w.add(top + p, int(v) if v[0] < 0x3A else v)
    return w


def build(url: str, ns: str, base: str, k: int, out: Path) -> int:
    from . import layout
    from .urls import parse_store_url, sync_client

    client = sync_client(parse_store_url(url))
    try:
        # A bucket lost inside Redis (a Cluster primary restarted empty, a failed reshard)
        # reads as an empty hash. With markers every bucket key exists, so read_buckets names
        # it; a load written before markers has only the IMEI count sync recorded in its meta
        # (written once, kept while any version builds on it) to tell. A snapshot built short
        # would answer "not listed" for every IMEI of that bucket until the next full load.
        expected, markers = client.hmget(layout.meta_key(ns, base), "count", "markers")
        w = read_buckets(client, ns, base, k, markers=markers == b"1")
    finally:
        client.close()
    if expected is None:
        raise IncompleteRegister(f"full load {base}: its meta is gone from Redis")
    if int(expected) != len(w.keys):
        raise IncompleteRegister(
            f"full load {base}: {len(w.keys):,} IMEIs in its buckets where sync wrote "
            f"{int(expected):,} (a bucket lost or altered in Redis: a primary restarted empty, "
            "a failed reshard?)")
    w.finish(out)
    return len(w.keys)


def acquire_lock(path: Path) -> bool:
    """True when this process may build `path` (it holds path.lock), False when another does."""
    lock = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        try:
            if time.time() - lock.stat().st_mtime < LOCK_STALE:
                return False
            lock.unlink()  # a builder that died long ago
        except FileNotFoundError:
            pass
        return acquire_lock(path)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def release_lock(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.with_name(path.name + ".lock").unlink()


def remove_others(directory: Path, ns: str, keep: Path) -> None:
    """Delete the namespace's older snapshots (workers that still map one keep its pages)."""
    prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", ns) + "-"
    for p in directory.glob(f"{prefix}*.snap"):
        if p != keep:
            with contextlib.suppress(OSError):
                p.unlink()


# The builder's command line after the interpreter: `python -m` cannot run a module compiled by
# mypyc (it has no code object), so import it and call main.
BUILDER: Final = ("-c", "import sys; from eir_server.store.snapshot import main; sys.exit(main())")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="build a register snapshot file from Redis")
    ap.add_argument("--url", required=True)
    ap.add_argument("--ns", required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    out = Path(a.out)
    try:
        n = build(a.url, a.ns, a.base, a.k, out)
    except IncompleteRegister as e:
        print(f"snapshot refused: {e}", file=sys.stderr)
        return INCOMPLETE_EXIT
    except Exception as e:  # noqa: BLE001 - reported to the worker through the exit code
        print(f"snapshot build failed: {e!r}", file=sys.stderr)
        return 1
    print(n)
    return 0


if __name__ == "__main__":
    sys.exit(main())

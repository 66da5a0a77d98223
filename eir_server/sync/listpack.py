"""Bucket hashes built here and handed to Redis whole, as RESTORE payloads.

Why: filling a listpack hash with HSET costs Redis a linear `lpFind` per field (to catch an
existing one), so a 10M-row load kept redis-server busy ~12 s of CPU by itself; RESTORE of a
ready listpack costs it ~0.6 s (a CRC check and a copy). The payload is what DUMP gives for the
hash: RDB type 16 (hash as listpack, Redis >= 7.0), the listpack, RDB version 10 (older than any
server that knows type 16, which they all accept) and the CRC-64 (Jones) Redis checks.

Entries are encoded as Redis encodes them (the smallest integer encoding for a canonical
decimal, else a string), so a restored bucket is byte for byte the listpack that HSETs of the
same fields in the same order would have built (tests/sync/test_listpack.py checks with DUMP).
The CRCs of many payloads are computed at once with numpy, one payload per column.
"""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt

RDB_TYPE_HASH_LISTPACK = 16
RDB_VERSION = 10
_POLY = 0x95AC9329AC4BC9B5  # CRC-64/Jones, reflected (Redis's crc64)
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _tables() -> tuple[list[int], npt.NDArray[np.uint64]]:
    t8 = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        t8.append(c)
    a8 = np.array(t8, dtype=np.uint64)
    # Two bytes per step (little-endian word w): T16[w] = T8[T8[lo] ^ hi] ^ (T8[lo] >> 8).
    w = np.arange(1 << 16, dtype=np.uint64)
    first = a8[w & np.uint64(0xFF)]
    t16 = a8[(first ^ (w >> np.uint64(8))) & np.uint64(0xFF)] ^ (first >> np.uint64(8))
    return t8, t16


_T8, _T16 = _tables()


def crc64(data: bytes, crc: int = 0) -> int:
    """Redis's crc64 of one (short) byte string, in Python."""
    for b in data:
        crc = _T8[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def crc64_many(payloads: list[bytes], group: int = 4096) -> list[int]:
    """crc64 of each payload.

    The CRC has no initial value, so leading zero bytes leave it unchanged: payloads of similar
    length are right-aligned in a zero-padded matrix, and one column of 2-byte words is folded
    in per step for all of them at once.
    """
    out = [0] * len(payloads)
    by_len = sorted(range(len(payloads)), key=lambda i: len(payloads[i]))
    mask = np.uint64(0xFFFF)
    sixteen = np.uint64(16)
    for g in range(0, len(by_len), group):
        idx = by_len[g : g + group]
        width = len(payloads[idx[-1]])
        width += width & 1
        m = len(idx)
        flat = b"".join(bytes(width - len(payloads[i])) + payloads[i] for i in idx)
        mat = np.frombuffer(flat, dtype="<u2").reshape(m, width // 2)
        cols = np.ascontiguousarray(mat.T)  # one row per step: a word of every payload
        crc = np.zeros(m, dtype=np.uint64)
        tmp = np.empty(m, dtype=np.uint64)
        for row in cols:
            np.bitwise_xor(crc, row, out=tmp)
            np.bitwise_and(tmp, mask, out=tmp)
            np.right_shift(crc, sixteen, out=crc)
            crc ^= _T16[tmp]
        for i, c in zip(idx, crc.tolist(), strict=True):
            out[i] = c
    return out


def _canonical_int(s: bytes) -> int | None:
    """The integer Redis stores `s` as in a listpack (lpStringToInt64), or None."""
    if not 0 < len(s) <= 20:
        return None
    body = s[1:] if s[:1] == b"-" else s
    if not body or not (body.isdigit() and body.isascii()):
        return None
    if body[:1] == b"0" and s != b"0":
        return None
    v = int(s)
    return v if _INT64_MIN <= v <= _INT64_MAX else None


def _backlen(n: int) -> bytes:
    """The entry length written after an entry, read backwards (lpEncodeBacklen): the high
    7-bit group first, every later group with bit 7 set."""
    groups = [n & 127]
    n >>= 7
    while n:
        groups.append(n & 127)
        n >>= 7
    groups.reverse()
    return bytes([groups[0], *(g | 128 for g in groups[1:])])


def entry(s: bytes) -> bytes:
    """One listpack entry holding `s`, encoded as Redis would (lpAppend)."""
    v = _canonical_int(s)
    if v is not None:
        if 0 <= v <= 127:
            enc = bytes((v,))
        elif -4096 <= v <= 4095:
            u = v & 0x1FFF
            enc = bytes((0xC0 | (u >> 8), u & 0xFF))
        elif -(1 << 15) <= v < 1 << 15:
            enc = b"\xf1" + struct.pack("<h", v)
        elif -(1 << 23) <= v < 1 << 23:
            enc = b"\xf2" + (v & 0xFFFFFF).to_bytes(3, "little")
        elif -(1 << 31) <= v < 1 << 31:
            enc = b"\xf3" + struct.pack("<i", v)
        else:
            enc = b"\xf4" + struct.pack("<q", v)
    elif len(s) < 64:
        enc = bytes((0x80 | len(s),)) + s
    elif len(s) < 4096:
        enc = bytes((0xE0 | (len(s) >> 8), len(s) & 0xFF)) + s
    else:
        enc = b"\xf0" + struct.pack("<I", len(s)) + s
    return enc + _backlen(len(enc))


def int32_entries(values: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    """(n, 6) entries of integers that all need the 32-bit encoding (|v| >= 2**23)."""
    out = np.empty((len(values), 6), dtype=np.uint8)
    out[:, 0] = 0xF3
    out[:, 1:5] = values.astype("<i4").view(np.uint8).reshape(-1, 4)
    out[:, 5] = 5
    return out


def _rdb_len(n: int) -> bytes:
    if n < 1 << 6:
        return bytes((n,))
    if n < 1 << 14:
        return bytes((0x40 | (n >> 8), n & 0xFF))
    if n < 1 << 32:
        return b"\x80" + struct.pack(">I", n)
    return b"\x81" + struct.pack(">Q", n)


def payload_head(body_len: int, entries: int) -> bytes:
    """What goes before the entries of a listpack hash's DUMP payload."""
    total = 6 + body_len + 1  # header (total bytes, element count) + entries + end byte
    count = entries if entries < 0xFFFF else 0xFFFF  # 0xFFFF: "count them"
    return (
        bytes((RDB_TYPE_HASH_LISTPACK,)) + _rdb_len(total) + struct.pack("<IH", total, count)
    )


PAYLOAD_TAIL = b"\xff" + struct.pack("<H", RDB_VERSION)


def payload(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """A whole DUMP payload (CRC included) of a hash with these fields, in this order."""
    body = b"".join(entry(f) + entry(v) for f, v in pairs)
    data = payload_head(len(body), 2 * len(pairs)) + body + PAYLOAD_TAIL
    return data + struct.pack("<Q", crc64(data))

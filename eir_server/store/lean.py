"""The lean lookup client's connections and packing (see resp.py for the connection itself).

- `BucketPacker`: the lookup's RESP bytes for a batch of IMEIs, built with a few joins per
  batch instead of a format per argument (what `layout.Buckets.locate` + `resp.pack` would
  produce, byte for byte; tests/store/test_resp.py checks that).
- `LeanLinks`: persistent lean connections by node name, each opened on demand with what
  redis-py's connection for the same node would use (address, TLS context, credentials, db):
  the one server (redis://, rediss://, unix://), the master Sentinel names now
  (redis+sentinel://, asked again at every reconnect), or each Cluster primary from redis-py's
  slot map (redis+cluster://).
"""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial
from typing import Any

from redis.crc import key_slot

from .layout import Buckets
from .resp import Endpoint, Lag, RespConnection, RespConnectionError, open_connection


class BucketPacker:
    """RESP pieces for the bucket keys and fields of a full load (see layout.py)."""

    __slots__ = ("buckets", "cut", "_kh", "_ksep", "_fh", "_fsep", "_bcd", "_hget",
                 "_slots", "_heads", "_exists")

    def __init__(self, buckets: Buckets) -> None:
        self.buckets = buckets
        k = buckets.k
        cut = self.cut = 14 - k
        prefix = f"{buckets.ns}:{buckets.base}:b:"
        self._kh = f"${len(prefix.encode()) + k}\r\n{prefix}"
        self._ksep = "\r\n" + self._kh
        self._bcd = cut > 9
        if self._bcd:  # field: the digits BCD-packed, "1"-padded to an even count
            pad = "1" if cut % 2 else ""
            head = (b"$%d\r\n" % ((cut + 1) // 2)).hex()
            self._fh = head + pad
            self._fsep = "0d0a" + head + pad
        else:  # field: "1" + the digits
            self._fh = f"${cut + 1}\r\n1"
            self._fsep = "\r\n" + self._fh
        self._hget = "*3\r\n$4\r\nHGET\r\n"
        self._slots: dict[str, int] = {}  # bucket suffix -> cluster slot
        self._heads: dict[str, bytes] = {}  # bucket suffix -> HGET key + field length
        self._exists: dict[str, bytes] = {}  # bucket suffix -> EXISTS key

    def keys(self, imeis: list[str]) -> bytes:
        """The bulk strings of the bucket keys of `imeis`, concatenated."""
        cut = self.cut
        return (self._kh + self._ksep.join([i[cut:] for i in imeis]) + "\r\n").encode()

    def fields(self, imeis: list[str]) -> bytes:
        """The bulk strings of the bucket fields of `imeis`, concatenated. ValueError for an
        IMEI that is not 14 digits (the caller takes the general path)."""
        cut = self.cut
        if self._bcd:
            return bytes.fromhex(self._fh + self._fsep.join([i[:cut] for i in imeis]) + "0d0a")
        return (self._fh + self._fsep.join([i[:cut] for i in imeis]) + "\r\n").encode()

    def hgets(self, imeis: list[str], exists: bool = False) -> bytes:
        """One HGET per IMEI (a Cluster node's share of a lookup), concatenated; `exists`: each
        followed by EXISTS of its bucket key (a load with markers: a missing key is lost)."""
        cut, heads = self.cut, self._heads
        out = []
        if self._bcd:
            pad = "1" if cut % 2 else ""
            for i in imeis:
                sfx = i[cut:]
                h = heads.get(sfx) or self._head(sfx)
                out.append(h + bytes.fromhex(pad + i[:cut]) + b"\r\n")
                if exists:
                    out.append(self._exists.get(sfx) or self._exists_of(sfx))
        else:
            for i in imeis:
                sfx = i[cut:]
                h = heads.get(sfx) or self._head(sfx)
                out.append(h + ("1" + i[:cut] + "\r\n").encode())
                if exists:
                    out.append(self._exists.get(sfx) or self._exists_of(sfx))
        return b"".join(out)

    def _exists_of(self, sfx: str) -> bytes:
        e = self._exists[sfx] = ("*2\r\n$6\r\nEXISTS\r\n" + self._kh + sfx + "\r\n").encode()
        return e

    def _head(self, sfx: str) -> bytes:
        """`HGET <bucket key>` and the field's length line: the same for a whole bucket, so
        kept by bucket suffix (at most 10^k)."""
        cut = self.cut
        flen = (cut + 1) // 2 if self._bcd else cut + 1
        h = self._heads[sfx] = (self._hget + self._kh + sfx + "\r\n").encode() + (
            b"$%d\r\n" % flen)
        return h

    def slot(self, imei: str) -> int:
        """Cluster slot of the IMEI's bucket key (cached by bucket: at most 10^k)."""
        sfx = imei[self.cut:]
        s = self._slots.get(sfx)
        if s is None:
            b = self.buckets
            s = self._slots[sfx] = key_slot(f"{b.ns}:{b.base}:b:{sfx}".encode())
        return s


def bulk(s: str) -> bytes:
    b = s.encode()
    return b"$%d\r\n%b\r\n" % (len(b), b)


def _endpoint_of(conn: Any) -> Endpoint:
    """What a redis-py asyncio connection object (not connected) would connect to."""
    ctx = getattr(conn, "ssl_context", None)
    return Endpoint(
        host=str(getattr(conn, "host", "") or ""),
        port=int(getattr(conn, "port", 6379) or 6379),
        path=str(getattr(conn, "path", "") or ""),
        ssl=ctx.get() if ctx is not None else None,
        username=conn.username,
        password=conn.password,
        db=int(conn.db or 0),
        keepalive=bool(getattr(conn, "socket_keepalive", False)),
        keepalive_options=dict(getattr(conn, "socket_keepalive_options", None) or {}),
    )


class LeanLinks:
    """Lean connections of one store, by node name ("" for the one server or master)."""

    def __init__(self, client: Any, mode: str, timeout: float, lag: Lag | None) -> None:
        self.client = client  # the store's redis-py client: where endpoints come from
        self.mode = mode
        self.timeout = timeout
        self.lag = lag
        self.conns: dict[str, RespConnection] = {}
        self._connecting: dict[str, asyncio.Future[RespConnection]] = {}
        self._base: Endpoint | None = None  # single / sentinel: credentials, TLS, db
        self._closed = False

    def get(self, name: str = "") -> RespConnection | None:
        """The connection to `name` if it is usable now (never connects)."""
        c = self.conns.get(name)
        return c if c is not None and c.error is None else None

    async def _endpoint(self, name: str) -> Endpoint:
        if self.mode == "cluster":
            node = self.client.nodes_manager.nodes_cache.get(name)
            if node is None:
                raise RespConnectionError(f"{name}: not a node of the cluster's slot map")
            return _endpoint_of(node.connection_class(**node.connection_kwargs))
        pool = self.client.connection_pool
        if self._base is None:
            kw = dict(pool.connection_kwargs)
            if self.mode == "sentinel":
                kw["host"], kw["port"] = "", 0
            self._base = _endpoint_of(pool.connection_class(**kw))
        ep = self._base
        if self.mode == "sentinel":  # whoever is master now
            host, port = await pool.get_master_address()
            ep = Endpoint(host=host, port=int(port), path="", ssl=ep.ssl, username=ep.username,
                          password=ep.password, db=ep.db, keepalive=ep.keepalive,
                          keepalive_options=ep.keepalive_options)
        return ep

    async def connect(self, name: str = "") -> RespConnection:
        """A usable connection to `name`, opened if needed; concurrent callers share one
        attempt. The caller bounds the time."""
        c = self.get(name)
        if c is not None:
            return c
        fut = self._connecting.get(name)
        if fut is None:
            fut = asyncio.ensure_future(self._open(name))
            self._connecting[name] = fut
            fut.add_done_callback(partial(self._opened, name))
        return await asyncio.shield(fut)

    async def _open(self, name: str) -> RespConnection:
        ep = await self._endpoint(name)
        return await open_connection(ep, self.timeout, self.lag)

    def _opened(self, name: str, fut: asyncio.Future[RespConnection]) -> None:
        if self._connecting.get(name) is fut:
            del self._connecting[name]
        if fut.cancelled() or fut.exception() is not None:
            return
        if self._closed:
            fut.result().close()
            return
        old = self.conns.get(name)
        if old is not None and old is not fut.result():
            old.close()
        self.conns[name] = fut.result()

    def close_all(self) -> None:
        """Drop every connection (in-flight requests fail with RespConnectionError)."""
        conns, self.conns = self.conns, {}
        for c in conns.values():
            c.close()
        for f in self._connecting.values():
            f.cancel()
        self._connecting.clear()

    async def aclose(self) -> None:
        self._closed = True
        pending = list(self._connecting.values())
        self.close_all()
        for f in pending:
            with contextlib.suppress(BaseException):
                await f

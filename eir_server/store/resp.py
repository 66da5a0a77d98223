"""A lean RESP2 connection for the store's hot lookup: commands go out as pre-packed bytes,
replies are parsed by hiredis's C reader and handed, in order, to plain callbacks.

Why not redis-py for this one command: per round trip, its asyncio connection pool, stream
reader, futures and response machinery cost several times what the lookup itself does
(~366k instructions per round trip under callgrind, benchmarks/bench_miss_path.py). Here a
round trip is one `transport.write` and, when the reply arrives, one C parse and one callback,
on the worker's own event loop. Several requests may be in flight on one connection
(pipelining); replies are matched to requests by order.

Layers:
- `ReplyQueue`: sans-I/O, bytes in, completed replies (or groups of replies for a pipeline)
  out in the order they were expected. Garbage from the server never raises past it: the
  queue records the error and the connection is dropped.
- `RespConnection`: the asyncio Protocol around it, plus the round-trip deadline (responsive
  loop time, see redis_store.py) checked by one timer per connection, not one per request.
- `open_connection`: TCP, TLS or a Unix socket, then AUTH and SELECT.

redis-py stays for everything else (polling, admin, scripts, Sentinel and Cluster discovery).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .base import StoreOverloaded

HARD_TIMEOUT_FACTOR = 10  # wall-time bound on a round trip, in units of `timeout`


class RespConnectionError(RedisConnectionError):
    """The lean connection is gone (closed, lost, or dropped after garbage from the server).
    A redis-py ConnectionError, so the store treats it like one of redis-py's own."""


class RespTimeout(RedisTimeoutError):
    """No reply within `timeout` of responsive loop time: Redis did not answer."""


_NOT_ENOUGH: Any = object()  # hiredis's "no complete reply yet" (a RESP3 #f parses as False)


def pack(parts: Iterable[bytes]) -> bytes:
    """One RESP command (an array of bulk strings)."""
    p = list(parts)
    return b"".join([b"*%d\r\n" % len(p), *[b"$%d\r\n%b\r\n" % (len(x), x) for x in p]])


class ReplyQueue:
    """Sans-I/O reply matching. `expect(n, token)` once per request sent (n replies: 1 for a
    command, more for a pipeline); `feed(data)` returns the (token, reply) pairs completed by
    `data`, in order (reply: the reply itself for n == 1, else the list of n replies). Error
    replies are values (hiredis.ReplyError instances), not raised.

    Bytes that are not RESP, or a reply nobody asked for, set `error` and return what was
    complete before them; the queue is then unusable (its connection must be dropped)."""

    __slots__ = ("_reader", "pending", "_group", "error")

    def __init__(self) -> None:
        self._reader = hiredis.Reader(notEnoughData=_NOT_ENOUGH)
        self.pending: deque[tuple[int, Any]] = deque()
        self._group: list[Any] = []
        self.error: str | None = None

    def expect(self, n: int, token: Any) -> None:
        self.pending.append((n, token))

    def feed(self, data: bytes) -> list[tuple[Any, Any]]:
        out: list[tuple[Any, Any]] = []
        if self.error is not None:
            return out
        reader = self._reader
        pending = self.pending
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not _NOT_ENOUGH:
                if not pending:
                    self.error = "reply nobody asked for"
                    break
                n, token = pending[0]
                if n == 1:
                    pending.popleft()
                    out.append((token, reply))
                else:
                    group = self._group
                    group.append(reply)
                    if len(group) == n:
                        pending.popleft()
                        self._group = []
                        out.append((token, group))
        except (hiredis.ProtocolError, MemoryError, ValueError, OverflowError) as e:
            self.error = f"protocol error: {e}"
        return out


class Lag(Protocol):
    """How late the loop ran in total (redis_store.LoopLag)."""

    def busy(self) -> float: ...


Callback = Callable[[Any], None]


class _Waiter:
    """One request in flight: its callback (None once abandoned: its reply is dropped) and,
    when bounded, when it was sent (loop time and loop lag at that moment)."""

    __slots__ = ("cb", "t0", "b0")

    def __init__(self, cb: Callback | None, t0: float, b0: float) -> None:
        self.cb = cb
        self.t0 = t0
        self.b0 = b0


class RespConnection(asyncio.Protocol):
    """One Redis connection for pipelined requests; see the module docstring.

    `send(data, n, cb)` writes `data` (n commands) and calls `cb(reply)` once: with the reply
    (a list of n replies for n > 1), or with an exception instance: RespConnectionError (the
    connection is gone), RespTimeout (no reply in `timeout` of responsive loop time: the
    connection is dropped, everything on it fails), StoreOverloaded (our loop could not read
    the reply within HARD_TIMEOUT_FACTOR x `timeout` of wall time: only that request fails;
    its reply is dropped when it comes). `bounded=False` leaves the deadline to the caller."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, lag: Lag | None,
                 name: str = "") -> None:
        self.loop = loop
        self.timeout = timeout
        self.lag = lag
        self.name = name
        self.queue = ReplyQueue()
        self.transport: asyncio.Transport | None = None
        self.error: BaseException | None = None  # set once the connection is unusable
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        queue = self.queue
        done = queue.feed(data)
        # A reply read after the wall-time bound fails all the same (StoreOverloaded, as
        # when the deadline timer gets there first): the loop was too busy, the caller
        # answers "too busy"; whether the timer or the read runs first after a stall must not
        # decide that.
        late = self.loop.time() - self.timeout * HARD_TIMEOUT_FACTOR
        for token, reply in done:
            cb = token.cb
            if cb is not None:
                if 0 <= token.t0 <= late:
                    token.cb = None
                    cb(StoreOverloaded("event loop too busy to read redis"))
                else:
                    cb(reply)
        if queue.error is not None:
            self.close(RespConnectionError(f"{self.name}: {queue.error}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(RespConnectionError(f"{self.name}: connection lost"
                                       + (f" ({exc!r})" if exc else "")))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost fails what is in flight

    # -- requests ------------------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        return self.error is None and self.transport is not None

    def send(self, data: bytes, n: int, cb: Callback, bounded: bool = True) -> None:
        """Write one request of `n` commands; the caller checked `usable`."""
        if self.error is not None or self.transport is None:
            raise self.error or RespConnectionError(f"{self.name}: not connected")
        if bounded:
            lag = self.lag
            w = _Waiter(cb, self.loop.time(), lag.busy() if lag is not None else 0.0)
            if self._timer is None:
                self._timer = self.loop.call_at(w.t0 + self.timeout, self._check)
        else:
            w = _Waiter(cb, -1.0, 0.0)
        self.queue.expect(n, w)
        self.transport.write(data)

    def request(self, data: bytes, n: int = 1, bounded: bool = False) -> asyncio.Future[Any]:
        """`send` for coroutines: a future with the reply; failures (and error replies, for
        n == 1) are raised by awaiting it."""
        fut: asyncio.Future[Any] = self.loop.create_future()

        def done(reply: Any) -> None:
            if fut.done():
                return
            if isinstance(reply, BaseException):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

        self.send(data, n, done, bounded)
        return fut

    def close(self, error: BaseException | None = None) -> None:
        """Drop the connection; everything in flight fails with `error`."""
        if self.error is None:
            self.error = error or RespConnectionError(f"{self.name}: closed")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()
        self._fail_pending(self.error)

    def _fail_pending(self, error: BaseException) -> None:
        pending = self.queue.pending
        while pending:
            w = pending.popleft()[1]
            cb, w.cb = w.cb, None
            if cb is not None:
                cb(error)

    def _check(self) -> None:
        """Deadline of the oldest bounded request still waiting (replies come in order: a
        later request cannot have waited longer). See RedisStore._bounded for the rules."""
        self._timer = None
        if self.error is not None:
            return
        now = self.loop.time()
        busy = self.lag.busy() if self.lag is not None else 0.0
        timeout = self.timeout
        for _, w in self.queue.pending:
            if w.cb is None or w.t0 < 0:
                continue
            waited = now - w.t0 - (busy - w.b0)
            if waited >= timeout:
                self.close(RespTimeout(f"{self.name}: no reply within {timeout} s"))
                return
            hard = w.t0 + timeout * HARD_TIMEOUT_FACTOR
            if now >= hard:  # our loop, not Redis: this request fails, the connection stays
                cb, w.cb = w.cb, None
                cb(StoreOverloaded("event loop too busy to read redis"))
                continue
            self._timer = self.loop.call_at(min(now + timeout - waited, hard), self._check)
            return


@dataclass(slots=True)
class Endpoint:
    """Where and how to connect: what redis-py's connection for the same target would use."""

    host: str = ""
    port: int = 6379
    path: str = ""  # Unix socket
    ssl: ssl.SSLContext | None = None
    server_hostname: str | None = None
    username: str | None = None
    password: str | None = None
    db: int = 0
    keepalive: bool = False
    keepalive_options: dict[int, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path or f"{self.host}:{self.port}"


async def open_connection(ep: Endpoint, timeout: float, lag: Lag | None) -> RespConnection:
    """Connect, authenticate and select the db. The caller bounds the time this takes."""
    loop = asyncio.get_running_loop()

    def factory() -> RespConnection:
        return RespConnection(loop, timeout, lag, ep.name)

    if ep.path:
        _, conn = await loop.create_unix_connection(factory, ep.path)
    else:
        _, conn = await loop.create_connection(
            factory, ep.host, ep.port, ssl=ep.ssl,
            server_hostname=(ep.server_hostname or ep.host) if ep.ssl is not None else None)
        sock = conn.transport.get_extra_info("socket") if conn.transport else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ep.keepalive:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                for k, v in ep.keepalive_options.items():
                    sock.setsockopt(socket.IPPROTO_TCP, k, v)
    try:
        cmds: list[bytes] = []
        if ep.password is not None or ep.username:
            auth = [b"AUTH"] + ([ep.username.encode()] if ep.username else [])
            cmds.append(pack([*auth, (ep.password or "").encode()]))
        if ep.db:
            cmds.append(pack([b"SELECT", b"%d" % ep.db]))
        if cmds:
            replies = await conn.request(b"".join(cmds), len(cmds))
            if len(cmds) == 1:
                replies = [replies]
            for r in replies:
                if isinstance(r, BaseException) or r != b"OK":
                    raise RespConnectionError(f"{ep.name}: connection set-up refused: {r!r}")
    except BaseException:
        conn.close()
        raise
    return conn

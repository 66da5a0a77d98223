"""A TLS listener that accepts in a loop and runs each handshake as its own task, so that a
failed or timed-out handshake is ours to count and log (rate-limited, with the peer address):
asyncio's own TLS server drops those silently. Looks like an asyncio.Server to its owner. Used
by the Diameter node and by N5g-eir."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable


def server_context(cert: str, key: str, ca: str = "",
                   alpn: list[str] | None = None) -> ssl.SSLContext:
    """Server-side TLS 1.2+ (RFC 6733 13.1 for Diameter; TS 33.501 13.1 allows 1.2 and 1.3 for
    SBI) with our certificate; with `ca`, clients must present a certificate it signed."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if ca:
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


class TlsListener:
    def __init__(self, ctx: ssl.SSLContext, host: str, port: int, reuse_port: bool,
                 sock: socket.socket | None, protocol: Callable[[], asyncio.Protocol],
                 handshake_timeout: float,
                 failed: Callable[[str, BaseException, str], None],
                 accept_failed: Callable[[OSError], None], backlog: int = 1024) -> None:
        """`failed(address, error, reason)` for each handshake that fails or times out;
        `accept_failed(error)` for accept errors (EMFILE and the like)."""
        if sock is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
                sock.listen(backlog)
            except OSError:
                sock.close()
                raise
        sock.setblocking(False)
        self.ctx = ctx
        self.protocol = protocol
        self.handshake_timeout = handshake_timeout
        self.failed = failed
        self.accept_failed = accept_failed
        self.sockets = [sock]
        self._handshakes: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = asyncio.ensure_future(self._accept(sock))

    def is_serving(self) -> bool:
        return self._task is not None and not self._task.done()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for t in list(self._handshakes):
            t.cancel()
        for s in self.sockets:
            s.close()

    async def wait_closed(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _accept(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(lsock)
            except OSError as e:  # EMFILE and the like: back off instead of spinning
                self.accept_failed(e)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.ensure_future(self._handshake(conn, addr[0]))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket, address: str) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.handshake_timeout
        try:
            await loop.connect_accepted_socket(self.protocol, conn, ssl=self.ctx,
                                               ssl_handshake_timeout=timeout)
        except (TimeoutError, OSError, ssl.SSLError) as e:
            text = str(e)
            timed_out = isinstance(e, TimeoutError) or "taking longer" in text
            reason = f"no handshake within {timeout:g} s" if timed_out else \
                text or type(e).__name__
            self.failed(address, e, reason)
            conn.close()

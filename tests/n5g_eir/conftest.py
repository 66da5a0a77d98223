"""A real worker's two interfaces in this process: S13 Diameter on TCP and N5g-eir on HTTP/2,
sharing one checker, store and metrics; clients are real (httpx/h2, curl)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from eir_server.checker import EquipmentChecker
from eir_server.io.diameter_server import DiameterNode, NodeLimits
from eir_server.io.http_server import HttpListener, N5gEirService
from eir_server.n5g_eir.app import N5gEirApp
from eir_server.obs.metrics import Metrics
from eir_server.policy import PolicyConfig, load_policy
from eir_server.store import MemoryStore
from tests.diameter_io.conftest import DICTIONARY, default_records, peer_config
from tests.netutil import free_port

PATH = "/n5g-eir-eic/v1/equipment-status"


@dataclass
class Eir:
    node: DiameterNode
    service: N5gEirService
    listeners: list[HttpListener]
    diameter_port: int
    http_port: int
    tls_port: int | None
    metrics: Metrics
    store: Any

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def h2c(self, **kw: Any) -> httpx.AsyncClient:
        """HTTP/2 with prior knowledge, as an AMF speaks inside the core."""
        return httpx.AsyncClient(base_url=self.base, http1=False, http2=True, timeout=10, **kw)


async def wait_listening(port: int, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            assert loop.time() < end, f"nothing listening on {port}"
            await asyncio.sleep(0.02)


async def start_eir(store: Any = None, policy: PolicyConfig | None = None,
                    max_in_flight: int = 10_000, tls: dict[str, str] | None = None,
                    authorizer: Any = None, audit: Callable[..., None] | None = None,
                    fallback: Any = None, overload_target: float = 0.0,
                    http_limits: Any = None) -> Eir:
    if store is None:
        store = MemoryStore()
        for k, v in default_records().items():
            store.put(k, v)
    await store.start()
    pol = load_policy(policy if policy is not None else PolicyConfig(unknown_equipment=None))
    checker = (EquipmentChecker(pol, store, today=lambda: "20250601") if fallback is None
               else EquipmentChecker(pol, store, fallback, today=lambda: "20250601"))
    metrics = Metrics()
    node = DiameterNode(peer_config(), DICTIONARY, checker, metrics, audit=audit,
                        max_in_flight=max_in_flight,
                        limits=NodeLimits(overload_target=overload_target))
    srv = await node.start("127.0.0.1", 0)
    service = N5gEirService(N5gEirApp(authorizer), node.service, metrics,
                            overload=node.overload if overload_target > 0 else None)
    port = free_port()
    limits = {"limits": http_limits} if http_limits is not None else {}
    listeners = [HttpListener(service, "127.0.0.1", port, **limits)]
    tls_port = None
    if tls is not None:
        tls_port = free_port()
        listeners.append(HttpListener(service, "127.0.0.1", tls_port, **tls, **limits))
    for listener in listeners:
        await listener.start()
    await wait_listening(port)
    if tls_port:
        await wait_listening(tls_port)
    return Eir(node, service, listeners, srv.sockets[0].getsockname()[1], port, tls_port,
               metrics, store)


@pytest.fixture
async def eirs() -> AsyncIterator[Callable[..., Any]]:
    started: list[Eir] = []

    async def factory(**kw: Any) -> Eir:
        e = await start_eir(**kw)
        started.append(e)
        return e

    yield factory
    for e in started:
        for listener in e.listeners:
            await listener.stop(2.0)
        for p in list(e.node.protocols):
            p.abort("test over")
        await e.node.shutdown(0.2)
        with contextlib.suppress(Exception):
            await e.store.close()


class H2Client:
    """A blocking HTTP/2 (prior knowledge) client on the `h2` library over one TCP socket: many
    streams in flight on one connection, as an AMF uses it. Run it off the server's loop
    (asyncio.to_thread) when the server lives in this process."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        import socket

        import h2.config
        import h2.connection

        self.sock = socket.create_connection((host, port), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.goaway = False
        self.heads: dict[int, dict[str, str]] = {}
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()

    def send(self, paths: list[str], headers: list[tuple[str, str]] = ()) -> list[int]:
        """Open one stream per path; returns their ids."""
        ids = []
        for p in paths:
            sid = self.conn.get_next_available_stream_id()
            self.conn.send_headers(sid, [(":method", "GET"), (":scheme", "http"),
                                         (":authority", "eir"), (":path", p), *headers],
                                   end_stream=True)
            ids.append(sid)
        self.sock.sendall(self.conn.data_to_send())
        return ids

    def collect(self, ids: list[int]) -> list[tuple[int, bytes, dict[str, str]]]:
        """(status, body, headers) of these streams, reading until all of them ended."""
        import h2.events

        while not all(i in self.ended for i in ids):
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            for ev in self.conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    self.heads[ev.stream_id] = {k.decode(): v.decode() for k, v in ev.headers}
                elif isinstance(ev, h2.events.DataReceived):
                    self.bodies[ev.stream_id] = self.bodies.get(ev.stream_id, b"") + ev.data
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    self.ended.add(ev.stream_id)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    self.goaway = True
            self.sock.sendall(self.conn.data_to_send())
        return [(int(self.heads[i][":status"]), self.bodies.get(i, b""), self.heads[i])
                for i in ids]

    def get_many(self, paths: list[str]) -> list[tuple[int, bytes]]:
        return [(st, b) for st, b, _ in self.collect(self.send(paths))]

    def close(self) -> None:
        self.sock.close()

"""asyncio shell of N5g-eir: granian's embedded RSGI server inside the worker's own event loop.

granian (Rust: hyper + rustls) does HTTP/2 prior knowledge (h2c), HTTP/1.1 and TLS with
optional client-certificate verification; this module only moves (method, path, query,
headers) into the sans-I/O `N5gEirApp`, asks the shared `EquipmentChecker` and writes the
answer, counting it in the worker's `Metrics`. Chosen with numbers (README "Performance"):
one worker answered tens of thousands of h2c requests/s where hypercorn managed ~2.7k.

Connections are never cut by count or short idle: hyper's HTTP/2 server has no request limit,
and granian's keep-alive pings are off unless configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ServeConfig, parse_hostport
from ..n5g_eir.app import INTERNAL_ERROR, Check, N5gEirApp, Response, overloaded
from ..n5g_eir.nrf import NF_TYPE, load_nf_instance_id
from ..n5g_eir.oauth import BearerAuthorizer
from ..obs.logging import get_logger
from ..obs.metrics import Metrics
from ..overload import OverloadSignal, Source
from ..policy.types import Verdict
from ..service import STORE_ERROR, CheckService
from .nrf_client import NrfAgent

log = get_logger("eir_server.n5g_eir")

INTERFACE = "n5g_eir"  # the label value the metrics, audit trail and export already use
RETRY_AFTER = 1  # seconds: requests waiting for the store drain within that in practice
MAX_SOURCES = 256  # consumer addresses tracked for fair shedding before idle ones are dropped
_SHED_OVERLOAD = (INTERFACE, "overload")  # eir_requests_shed_total{interface, reason}


class ConsumerShare:
    """The 429 half of the overload gate (the worker-wide 503 half is `CheckService.admit`):
    one consumer connection may hold at most half of the worker's store-waiting budget, so one
    AMF flooding misses cannot take every slot from the others."""

    __slots__ = ("service", "by_client")

    def __init__(self, service: CheckService) -> None:
        self.service = service
        self.by_client: dict[str, int] = {}

    def admit(self, client: str) -> int:
        """0 (go on), 503 (the worker's budget is used up) or 429 (this consumer's share is)."""
        service = self.service
        if not service.admit(client):
            return 503
        if self.by_client.get(client, 0) >= max(1, service.max_in_flight // 2):
            return 429
        return 0

    def enter(self, client: str) -> None:
        self.service.started()
        self.by_client[client] = self.by_client.get(client, 0) + 1

    def leave(self, client: str) -> None:
        self.service.finished()
        n = self.by_client[client] - 1
        if n:
            self.by_client[client] = n
        else:
            del self.by_client[client]


class N5gEirService:
    """The RSGI application: one per worker, on the same `CheckService` (checker, in-flight
    budget, verdict counters, audit) as the worker's S13 connections."""

    def __init__(self, app: N5gEirApp, service: CheckService, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 overload: OverloadSignal | None = None) -> None:
        self.app = app
        # The worker's overload signal (S13 sheds from the same one); None: never shed.
        self.overload = overload
        self._sources: dict[str, Source] = {}  # overload sources by consumer IP address
        self._by_client: dict[str, Source] = {}  # the same by connection ("ip:port")
        self._busy: dict[int, Response] = {}  # 503 answers by Retry-After
        self.service = service
        self.share = ConsumerShare(service)
        self.metrics = metrics
        self.clock = clock
        self.wall = wall
        self._requests = metrics.requests
        self._latency = metrics.latency_n5g
        self._last_error_log = float("-inf")

    async def __call__(self, scope: Any, proto: Any) -> None:
        t0 = self.clock()
        r: Response | Check
        try:
            if self.overload is not None and not self._admit(scope.client):
                r = self._overloaded()
                self.metrics.shed[_SHED_OVERLOAD] += 1
            else:
                r = self.app.handle(scope.method, scope.path, scope.query_string,
                                    scope.headers.get,
                                    self.wall() if self.app.authorizer is not None else 0.0)
                if type(r) is Check:
                    r = await self._check(r, scope.client)
        except Exception:
            # The consumer learns only that it failed; the log says why, at most once a second.
            now = self.clock()
            if now - self._last_error_log >= 1.0:
                self._last_error_log = now
                log.exception("n5g_eir_internal_error", path=scope.path)
            r = INTERNAL_ERROR
        assert type(r) is Response
        proto.response_bytes(r.status, r.headers, r.body)
        self._requests[(INTERFACE, scope.method if r.status != 405 else "other", r.result)] += 1
        self._latency.observe(self.clock() - t0)

    def _admit(self, client: str) -> bool:
        """The overload signal's per-consumer fair share (by IP address: an AMF may open
        several connections)."""
        src = self._by_client.get(client)
        if src is None:
            src = self._source(client)
        return self.overload.admit(src)  # type: ignore[union-attr]

    def _source(self, client: str) -> Source:
        """The overload source of a connection ("ip:port"): its IP address's."""
        if len(self._by_client) >= 4 * MAX_SOURCES:
            self._by_client.clear()
        ip = client.rpartition(":")[0]
        src = self._sources.get(ip)
        if src is None:
            if len(self._sources) >= MAX_SOURCES:
                self._prune()
            src = self._sources[ip] = self.overload.source(("http", ip))  # type: ignore[union-attr]
        self._by_client[client] = src
        return src

    def _prune(self) -> None:
        """Forget consumers that sent nothing lately (their shares go to the others)."""
        for ip, src in list(self._sources.items()):
            if src.demand < 1 and src.arrivals == 0:
                del self._sources[ip]
                self.overload.forget(("http", ip))  # type: ignore[union-attr]
        self._by_client.clear()

    def _overloaded(self) -> Response:
        """503 NF_CONGESTION with the signal's Retry-After (TS 29.500 6.4)."""
        retry = max(1, self.overload.retry_after)  # type: ignore[union-attr]
        r = self._busy.get(retry)
        if r is None:
            r = self._busy[retry] = overloaded(503, retry, "this NF is overloaded")
        return r

    async def _check(self, c: Check, client: str) -> Response:
        verdict = self.service.check(c.request)
        if type(verdict) is not Verdict:
            # Only a lookup that must wait for the store takes a slot of the budget: answers
            # from the embedded store or the local cache are never refused.
            refused = self.share.admit(client)
            pending: asyncio.Future[Verdict] = verdict  # type: ignore[assignment]
            if refused:
                pending.cancel()
                return overloaded(refused, RETRY_AFTER)
            self.share.enter(client)
            try:
                verdict = await pending
            finally:
                self.share.leave(client)
        v: Verdict = verdict
        if v.status is None and v.rule == STORE_ERROR:  # counted as S13 counts it
            self.service.counters.verdicts[(v.reasons[0], v.rule)] += 1
        else:
            self.service.record(c.audit, v, client, INTERFACE)
        return self.app.answer(v)


class HttpListener:
    """One granian embedded server (h2c + HTTP/1.1, or TLS) run as a task of this loop."""

    def __init__(self, service: N5gEirService, host: str, port: int, *,
                 cert: str = "", key: str = "", ca: str = "", backlog: int = 1024) -> None:
        from granian.constants import HTTPModes, Interfaces, TaskImpl
        from granian.http import HTTP1Settings, HTTP2Settings
        from granian.server.embed import Server

        # granian logs "embedded server is experimental" and per-start chatter at INFO/WARNING
        # through the stdlib logger; our own logs say what is listening.
        logging.getLogger("_granian").setLevel(logging.ERROR)
        tls: dict[str, Any] = {}
        if cert:
            tls = {"ssl_cert": Path(cert), "ssl_key": Path(key)}
            if ca:
                tls.update(ssl_ca=Path(ca), ssl_client_verify=True)
        self.tls = bool(cert)
        self.address = f"{host}:{port}"
        self.server = Server(
            service, address=host or "0.0.0.0", port=port, interface=Interfaces.RSGI,
            http=HTTPModes.auto, websockets=False, backlog=backlog, log_enabled=False,
            http1_settings=HTTP1Settings(keep_alive=True),
            # No keep-alive pings (they would close a connection whose peer is merely slow to
            # answer them); SBI connections carry many concurrent streams.
            http2_settings=HTTP2Settings(keep_alive_interval=None, max_concurrent_streams=1000),
            # Not TaskImpl.rust: ~4 us less loop-thread CPU per request, but requests that
            # await the store leave reference cycles behind and gen-2 collections grew to
            # 130 ms within 30 s (README "Performance").
            task_impl=TaskImpl.asyncio,
            **tls)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.ensure_future(self.server.serve())
        # serve() binds in its first step and spawns the listener task; a bind error ends it.
        for _ in range(3):
            await asyncio.sleep(0)
        if self.task.done():
            exc = self.task.exception()
            self.task = None
            first = str(exc).splitlines()[0] if exc else "stopped"
            raise OSError(f"N5g-eir listen {self.address}: {first}")

    async def stop(self, timeout: float = 5.0) -> None:
        if self.task is None:
            return
        self.server.stop()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
            await asyncio.wait_for(self.task, timeout)
        self.task = None


def _probe_bind(host: str, port: int) -> None:
    """granian binds with SO_REUSEPORT, so a second server on a busy port would silently share
    it; a single worker checks first with a plain bind, which fails if anyone listens there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host or "0.0.0.0", port))
        except OSError as e:
            raise OSError(f"N5g-eir listen {host}:{port}: {e.strerror}") from None


def resolve_nf_instance_id(cfg: ServeConfig) -> ServeConfig:
    """Fix the NF instance id (NRF registration, token audience) once per node."""
    if cfg.nf_instance_id or not (cfg.nrf_url or cfg.oauth2_public_key or cfg.oauth2_jwks):
        return cfg
    nf_id, stored = load_nf_instance_id(cfg.nf_instance_file)
    if not stored:
        log.error("nf_instance_id_not_kept", file=cfg.nf_instance_file, nf_instance_id=nf_id,
                  consequence="a restart registers as a new NF instance; set --nf-instance-id "
                              "or a writable --nf-instance-file")
    return dataclasses.replace(cfg, nf_instance_id=nf_id)


class N5gEir:
    """What a worker runs for N5g-eir: listeners and, in worker 0, the NRF agent."""

    def __init__(self, listeners: list[HttpListener], nrf: NrfAgent | None = None) -> None:
        self.listeners = listeners
        self.nrf = nrf

    async def stop(self, timeout: float) -> None:
        if self.nrf is not None:  # deregister first: the NRF stops handing us out
            await self.nrf.stop()
        for listener in self.listeners:
            await listener.stop(timeout)


async def start_n5g_eir(cfg: ServeConfig, metrics: Metrics, node: Any, index: int) -> N5gEir:
    """The worker's N5g-eir listeners (none unless --http-listen / --http-tls-listen), sharing
    the Diameter node's CheckService (checker, audit, overload budget) and metrics; in worker 0
    only (the
    workers are one NF instance behind one port) the NRF registration."""
    if not (cfg.http_listen or cfg.http_tls_listen):
        return N5gEir([])
    cfg = resolve_nf_instance_id(cfg)
    authorizer = None
    if cfg.oauth2_public_key or cfg.oauth2_jwks:
        authorizer = BearerAuthorizer.from_files(cfg.oauth2_public_key, cfg.oauth2_jwks,
                                                 (cfg.nf_instance_id, NF_TYPE))
    service = N5gEirService(N5gEirApp(authorizer), node.service, metrics,
                            overload=node.overload if node.limits.overload_target > 0 else None)
    listeners = []
    for addr, tls in ((cfg.http_listen, False), (cfg.http_tls_listen, True)):
        if not addr:
            continue
        host, port = parse_hostport(addr, "http_tls_listen" if tls else "http_listen")
        if cfg.workers == 1:
            _probe_bind(host, port)
        listener = HttpListener(
            service, host, port,
            cert=cfg.http_tls_cert_file if tls else "", key=cfg.http_tls_key_file if tls else "",
            ca=cfg.http_tls_ca_file if tls else "")
        await listener.start()
        listeners.append(listener)
        log.info("n5g_eir_listening", worker=index, address=addr,
                 transport="tls" if tls else "h2c+http/1.1",
                 client_certificates="required" if tls and cfg.http_tls_ca_file else "no",
                 oauth2=authorizer is not None)
    nrf = None
    if cfg.nrf_url and index == 0:
        nrf = NrfAgent(cfg, cfg.nf_instance_id)
        nrf.start()
    return N5gEir(listeners, nrf)

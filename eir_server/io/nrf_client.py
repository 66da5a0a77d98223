"""asyncio shell of the NRF registration: one task, one HTTP/2 client (httpx; h2c with prior
knowledge for http:// NRFs, ALPN for https://), driving the pure `NrfRegistration`. Runs in one
worker only (index 0): the workers share the port and are one NF instance to the NRF."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from typing import Any

import httpx

from ..config import ServeConfig, parse_hostport
from ..n5g_eir.nrf import Endpoint, NrfRegistration, NrfRequest, State, nf_profile
from ..obs.logging import get_logger

log = get_logger("eir_server.nrf")

REQUEST_TIMEOUT = 3.0


def endpoints(cfg: ServeConfig) -> list[Endpoint]:
    """What consumers are told to connect to: the N5g-eir listeners, at --nf-address when the
    listener is on a wildcard address."""
    out = []
    for addr, scheme in ((cfg.http_listen, "http"), (cfg.http_tls_listen, "https")):
        if addr:
            host, port = parse_hostport(addr, "http_listen")
            if cfg.nf_address or host in ("", "0.0.0.0", "::"):
                host = cfg.nf_address or "127.0.0.1"
            out.append(Endpoint(host, port, scheme))
    return out


class NrfAgent:
    def __init__(self, cfg: ServeConfig, nf_instance_id: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base = cfg.nrf_url.rstrip("/") + "/nnrf-nfm/v1/"
        self.clock = clock
        self.core = NrfRegistration(
            nf_profile(nf_instance_id, endpoints(cfg), int(cfg.nrf_heartbeat), cfg.nf_fqdn),
            clock())
        kw: dict[str, Any] = {"timeout": REQUEST_TIMEOUT}
        if self.base.startswith("https:"):
            ctx = ssl.create_default_context(cafile=cfg.http_tls_ca_file or None)
            if cfg.http_tls_cert_file:  # our SBI certificate, for an NRF that wants mTLS
                ctx.load_cert_chain(cfg.http_tls_cert_file, cfg.http_tls_key_file)
            kw["verify"] = ctx
            self.client = httpx.AsyncClient(http2=True, **kw)
        else:  # h2c with prior knowledge, as inside the core
            self.client = httpx.AsyncClient(http1=False, http2=True, **kw)
        self.task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._logged_down = False
        self._stopping = False

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        core = self.core
        while not self._stopping:
            now = self.clock()
            req = core.poll(now)
            if req is not None:
                await self._send(req)
                continue
            deadline = core.next_deadline()
            delay = 3600.0 if deadline is None else max(0.0, deadline - now)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()

    async def _send(self, req: NrfRequest) -> None:
        core = self.core
        try:
            r = await self._request(req)
        except (httpx.HTTPError, OSError, ssl.SSLError) as e:
            core.on_failure(type(e).__name__, self.clock())
            if not self._logged_down:  # loud once per outage, not per retry
                self._logged_down = True
                log.error("nrf_unreachable", url=self.base, error=str(e) or type(e).__name__,
                          state=core.state.value)
            return
        was = core.state
        core.on_response(r.status_code, r.content, self.clock())
        if self._logged_down:
            self._logged_down = False
            log.info("nrf_reachable", url=self.base)
        if core.state is State.REGISTERED and was is State.UNREGISTERED:
            log.info("nrf_registered", nf_instance_id=core.nf_instance_id,
                     heartbeat=core.heartbeat, status=r.status_code)
        elif req.method == "PATCH" and r.status_code == 404:
            log.warning("nrf_registration_lost", nf_instance_id=core.nf_instance_id)
        elif core.failures == 1:
            log.error("nrf_refused", method=req.method, status=r.status_code,
                      body=r.text[:200])

    async def _request(self, req: NrfRequest) -> httpx.Response:
        headers = {"content-type": req.content_type} if req.content_type else {}
        return await self.client.request(req.method, self.base + req.path, content=req.body,
                                         headers=headers)

    async def stop(self) -> None:
        """Deregister (one try, bounded by the request timeout), then close the client."""
        if self.task is not None:
            # Let a request on the wire finish: cancelling it mid-stream can leave the HTTP/2
            # connection unusable for the DELETE.
            self._stopping = True
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self.task), REQUEST_TIMEOUT + 1)
            except Exception:  # TimeoutError included
                self.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self.task
        req = self.core.stop()
        if req is not None:
            try:
                r = await self._request(req)
                log.info("nrf_deregistered", status=r.status_code)
            except (httpx.HTTPError, OSError, ssl.SSLError) as e:
                log.warning("nrf_deregister_failed", error=str(e) or type(e).__name__)
        await self.client.aclose()

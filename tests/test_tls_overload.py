"""Diameter over TLS (mutual, with openssl-made certificates) through `eir-server serve`, and
overload answered with 3004 instead of silence."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from eir_server.store import MISSING, MemoryStore
from tests.diameter_io.conftest import (
    IMEI_BLACK,
    OUR_HOST,
    OUR_REALM,
    Peer,
    ServeProcess,
    cer,
    ecr,
    serve_process,  # noqa: F401 - the fixture
    start_server,
)
from tests.netutil import free_port, make_pki, wait_for_port

EIR = [sys.executable, "-m", "eir_server.cli"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"), "test-ca", OUR_HOST, "mme1.epc.test")




async def tls_peer(port: int, pki: Path, with_cert: bool) -> Peer:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.check_hostname = False
    if with_cert:
        ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    return await Peer.connect(port, ssl=ctx)


async def test_mutual_tls_listener(pki: Path) -> None:
    tcp, tls = free_port(), free_port()
    proc = subprocess.Popen(
        [*EIR, "serve", "--diameter-listen", f"127.0.0.1:{tcp}", "--metrics-listen", "",
         "--diameter-tls-listen", f"127.0.0.1:{tls}", "--tls-cert", str(pki / "server.pem"),
         "--tls-key", str(pki / "server.key"), "--tls-ca", str(pki / "ca.pem"),
         "--origin-host", OUR_HOST, "--origin-realm", OUR_REALM],
        env={**os.environ, "EIR_LOG_LEVEL": "warning"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        await asyncio.to_thread(wait_for_port, tls, proc)
        p = await tls_peer(tls, pki, with_cert=True)
        await p.open()
        ans = await p.request(ecr(IMEI_BLACK))
        assert ans.result_code == 2001 and ans.equipment_status is not None
        p.close()
        # Without a client certificate the handshake (or the first read) fails: no Diameter.
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            q = await tls_peer(tls, pki, with_cert=False)
            await q.open()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


class PendingStore(MemoryStore):
    """Every lookup waits on a future the test never resolves: Redis that stopped answering."""

    def get_nowait(self, imei14: str) -> Any:
        return MISSING

    def fetch(self, imei14: str) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()


async def test_overload_is_answered_3004_with_e_bit() -> None:
    srv = await start_server(store=PendingStore())
    srv.node.max_in_flight = 2
    try:
        p = await srv.peer()
        await p.send(b"".join(ecr(IMEI_BLACK, n=i) for i in range(1, 4)))
        busy = await p.recv()
        assert busy.hbh == 3 and busy.result_code == 3004
        assert busy.flags & 0x20  # E bit: a protocol error
        assert srv.node.metrics.protocol_errors[3004] == 1
        assert srv.node.in_flight == 2
        p.close()
    finally:
        for proto in list(srv.node.protocols):
            proto.abort("test over")
        await srv.node.shutdown(0.2)


def serve_log_events(path: Path, event: str) -> list[dict[str, Any]]:
    import json
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            e = json.loads(line)
            if e.get("event") == event:
                out.append(e)
    return out


async def test_tls_only_listener_binds_certificate_identity_and_logs_failed_handshakes(
        pki: Path, tmp_path: Path) -> None:
    tls = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [*EIR, "serve", "--diameter-listen", "", "--metrics-listen", "",
             "--diameter-tls-listen", f"127.0.0.1:{tls}", "--tls-cert", str(pki / "server.pem"),
             "--tls-key", str(pki / "server.key"), "--tls-ca", str(pki / "ca.pem"),
             "--tls-peer-identity", "origin-host", "--tls-handshake-timeout", "1",
             "--origin-host", OUR_HOST, "--origin-realm", OUR_REALM, "--log-format", "json"],
            stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        await asyncio.to_thread(wait_for_port, tls, proc)
        for _ in range(100):  # the line follows the listener by a moment
            if started := serve_log_events(log_path, "diameter_listening"):
                break
            await asyncio.sleep(0.1)
        assert started[0]["addresses"] == [f"127.0.0.1:{tls}"]  # no cleartext listener
        # The certificate says mme1.epc.test: that Origin-Host opens, another is refused.
        p = await tls_peer(tls, pki, with_cert=True)
        await p.open("mme1.epc.test")
        assert (await p.request(ecr(IMEI_BLACK))).result_code == 2001
        p.close()
        q = await tls_peer(tls, pki, with_cert=True)
        cea = await q.request(cer("mme9.epc.test"))
        assert cea.result_code == 3010
        await q.expect_closed()
        # Handshakes that fail: no client certificate (twice), and a peer that opens TCP and
        # never starts TLS (dropped at the 1 s handshake timeout).
        for _ in range(2):
            with contextlib.suppress(ssl.SSLError, ConnectionError, asyncio.IncompleteReadError,
                                     TimeoutError):
                r = await tls_peer(tls, pki, with_cert=False)
                await r.request(cer("mme1.epc.test"), timeout=5)
        mute = await Peer.connect(tls)
        assert await mute.expect_closed(10) == b""
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    assert serve_log_events(log_path, "cer_rejected")[0]["origin_host"] == "mme9.epc.test"
    failed = serve_log_events(log_path, "tls_handshake_failed")
    assert all(e["peer"] == "127.0.0.1" for e in failed)
    # One line per kind of failure from an address: the second certificate-less attempt is
    # only counted, and the summary at shutdown says so. (wait_for_port's probe connection,
    # closed without a handshake, is a failure of its own kind.)
    assert any(e["reason"].startswith("no handshake") for e in failed)
    assert any("CERTIFICATE" in e["reason"].upper() for e in failed)
    summary = serve_log_events(log_path, "lines_suppressed")
    assert ("tls_handshake_failed", 1) in [(e["line"], e["count"]) for e in summary]


async def test_origin_host_check_refuse_and_connection_limit_per_source(
        serve_process: Callable[..., ServeProcess]) -> None:  # noqa: F811
    proc = serve_process("--origin-host-check", "refuse", "--max-connections-per-source", "2")
    a = await Peer.connect(proc.port)
    await a.open("mme7.test.example")  # the ECRs below say mme1.test.example
    ans = await a.request(ecr(IMEI_BLACK))
    assert ans.result_code == 5003 and ans.equipment_status is None
    b = await Peer.connect(proc.port)
    await b.open()
    assert (await b.request(ecr(IMEI_BLACK))).result_code == 2001  # same Origin-Host: served
    c = await Peer.connect(proc.port)  # a third connection from 127.0.0.1
    assert await c.expect_closed() == b""
    a.close()
    b.close()
    await asyncio.sleep(0.2)
    d = await Peer.connect(proc.port)  # the limit counts open connections only
    await d.open()
    d.close()
    refused = serve_log_events(proc.log, "connection_refused")
    assert len(refused) == 1 and refused[0]["peer"] == "127.0.0.1"
    mismatch = serve_log_events(proc.log, "origin_host_mismatch")
    assert len(mismatch) == 1 and mismatch[0]["ecr_origin_host"] == "mme1.test.example"

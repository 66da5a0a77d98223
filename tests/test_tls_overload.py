"""Diameter over TLS (mutual, with openssl-made certificates) through `eir-server serve`, and
overload answered with 3004 instead of silence."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from eir_server.store import MISSING, MemoryStore
from tests.diameter_io.conftest import (
    IMEI_BLACK,
    OUR_HOST,
    OUR_REALM,
    Peer,
    ecr,
    start_server,
)
from tests.netutil import free_port, wait_for_port

EIR = [sys.executable, "-m", "eir_server.cli"]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=test-ca", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    for name, cn in (("server", OUR_HOST), ("client", "mme1.epc.test")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                "-addext", f"subjectAltName=DNS:{cn},IP:127.0.0.1",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-copy_extensions", "copy",
                "-out", f"{name}.pem", cwd=d)
    return d




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

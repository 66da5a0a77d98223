"""`eir-server serve --http-listen/--http-tls-listen` as an operator runs it: h2c and HTTP/2
over mutual TLS from curl and httpx, metrics, SIGTERM, several workers."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.netutil import free_port, make_pki, wait_for_port

EIR = [sys.executable, "-m", "eir_server.cli"]
PATH = "/n5g-eir-eic/v1/equipment-status"
STOLEN = "352099001761481"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("sbi-pki"), "sbi-test-ca", "eir.5gc.test",
                    "amf1.5gc.test")


@pytest.fixture
def register(tmp_path: Path) -> Path:
    reg = tmp_path / "reg"
    reg.mkdir()
    (reg / "20260101_000000_blacklist.csv").write_text(
        "imei,block_date,reasons\n35209900176148,20200101,stolen\n")
    return reg


def start(*args: str, log: Any = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """serve; its log (stdout) goes to `log`."""
    env = {**os.environ, "EIR_LOG_LEVEL": "warning"}
    return subprocess.Popen([*EIR, "serve", *args], env=env, stdout=log, stderr=subprocess.PIPE)


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-s", "-S", "--max-time", "10", *args], capture_output=True,
                          text=True, timeout=30)


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    if code and proc.stderr is not None:
        print(proc.stderr.read().decode(errors="replace"))
    return code


def test_h2c_and_mutual_tls(pki: Path, register: Path, tmp_path: Path) -> None:
    dport, hport, tport, mport = free_port(), free_port(), free_port(), free_port()
    logfile = (tmp_path / "log").open("wb")
    proc = start("--register", str(register), "--diameter-listen", f"127.0.0.1:{dport}",
                 "--metrics-listen", f"127.0.0.1:{mport}",
                 "--http-listen", f"127.0.0.1:{hport}",
                 "--http-tls-listen", f"127.0.0.1:{tport}",
                 "--http-tls-cert", str(pki / "server.pem"),
                 "--http-tls-key", str(pki / "server.key"),
                 "--http-tls-ca", str(pki / "ca.pem"), log=logfile)
    try:
        for p in (dport, hport, tport, mport):
            wait_for_port(p, proc)
        r = curl("--http2-prior-knowledge", "-w", " %{http_version}",
                 f"http://127.0.0.1:{hport}{PATH}?pei=imei-{STOLEN}")
        assert r.stdout == '{"status":"BLACKLISTED"} 2', r.stderr
        tls_url = f"https://127.0.0.1:{tport}{PATH}?pei=imei-{STOLEN}"
        r = curl("--http2", "-w", " %{http_version}", "--cacert", str(pki / "ca.pem"),
                 "--cert", str(pki / "client.pem"), "--key", str(pki / "client.key"), tls_url)
        assert r.stdout == '{"status":"BLACKLISTED"} 2', r.stderr
        # HTTP/1.1 by ALPN on the same port
        r = curl("--http1.1", "-w", " %{http_version}", "--cacert", str(pki / "ca.pem"),
                 "--cert", str(pki / "client.pem"), "--key", str(pki / "client.key"), tls_url)
        assert r.stdout == '{"status":"BLACKLISTED"} 1.1', r.stderr
        # No client certificate: the handshake fails (the CA makes it mutual TLS); so does a
        # cleartext request. Both are counted, and logged once for this address and error.
        r = curl("--http2", "--cacert", str(pki / "ca.pem"), tls_url)
        assert r.returncode != 0 and "BLACKLISTED" not in r.stdout
        for _ in range(2):
            r = curl("--http2-prior-knowledge", f"http://127.0.0.1:{tport}{PATH}?pei=imei-1")
            assert r.returncode != 0
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        with httpx.Client(http2=True, verify=ctx) as c:
            resp = c.get(tls_url)
            assert resp.http_version == "HTTP/2" and resp.json() == {"status": "BLACKLISTED"}
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read()
        assert (b'eir_requests_total{command="GET",interface="n5g_eir",result="200"} 4.0'
                in text)
        assert b'eir_request_duration_seconds_count{interface="n5g_eir"} 4.0' in text
        # the three above, and wait_for_port's connection, closed before any handshake
        assert b'eir_http_protocol_errors_total{error="tls_handshake_failed"} 4.0' in text
    except BaseException:
        stop(proc)
        print(proc.stderr.read().decode(errors="replace") if proc.stderr else "")
        raise
    assert stop(proc) == 0
    logfile.close()
    lines = [json.loads(ln) for ln in (tmp_path / "log").read_text().splitlines()
             if "n5g_eir_tls_handshake_failed" in ln]
    # logged with the address, once per address and kind of failure, not once per connection
    # (the port probe's reset, and SSLError: the missing certificate and the cleartext request)
    assert len(lines) == 2 and all(ln["peer"] == "127.0.0.1" for ln in lines), lines
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in lines[1]["reason"]


def test_every_worker_serves_n5g_eir(register: Path) -> None:
    dport, hport, mport = free_port(), free_port(), free_port()
    proc = start("--register", str(register), "--workers", "2",
                 "--diameter-listen", f"127.0.0.1:{dport}",
                 "--metrics-listen", f"127.0.0.1:{mport}", "--http-listen", f"127.0.0.1:{hport}")
    try:
        wait_for_port(hport, proc)
        wait_for_port(mport, proc)
        for _ in range(20):  # new connections spread over the workers by SO_REUSEPORT
            r = curl("--http2-prior-knowledge", f"http://127.0.0.1:{hport}{PATH}?pei=imei-{STOLEN}")
            assert r.stdout == '{"status":"BLACKLISTED"}', r.stderr
    finally:
        assert stop(proc) == 0


def test_busy_port_is_a_start_error(register: Path) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([*EIR, "serve", "--diameter-listen", f"127.0.0.1:{free_port()}",
                            "--metrics-listen", "", "--http-listen", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"N5g-eir listen 127.0.0.1:{port}" in r.stderr

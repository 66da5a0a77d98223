"""NRF registration: the pure state machine with time as an argument, then `eir-server serve
--nrf-url` against the HTTP/2 NRF test double (register, heart-beat at the NRF's interval,
re-register on 404, deregister on SIGTERM, same nfInstanceId after a restart, one registration
for several workers, and answering while the NRF is unreachable)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from eir_server.n5g_eir.nrf import (
    Endpoint,
    NrfRegistration,
    State,
    load_nf_instance_id,
    nf_profile,
)
from tests.n5g_eir.conftest import wait_listening
from tests.n5g_eir.nrf_double import NrfDouble
from tests.netutil import free_port

NF_ID = "4947a69a-f61b-4bc1-b9da-47c9c5d14b64"
EIR = [sys.executable, "-m", "eir_server.cli"]


def core(now: float = 0.0) -> NrfRegistration:
    return NrfRegistration(nf_profile(NF_ID, [Endpoint("10.0.0.5", 8080, "http"),
                                              Endpoint("10.0.0.5", 8443, "https")], 60,
                                      "eir.5gc.example"), now)


def test_profile_advertises_the_service() -> None:
    p = core().profile
    assert (p["nfInstanceId"], p["nfType"], p["nfStatus"]) == (NF_ID, "5G_EIR", "REGISTERED")
    assert p["ipv4Addresses"] == ["10.0.0.5"] and p["fqdn"] == "eir.5gc.example"
    svcs = {s["scheme"]: s for s in p["nfServices"]}
    assert set(svcs) == {"http", "https"}
    for scheme, port in (("http", 8080), ("https", 8443)):
        s = svcs[scheme]
        assert s["serviceName"] == "n5g-eir-eic" and s["nfServiceStatus"] == "REGISTERED"
        assert s["versions"][0]["apiVersionInUri"] == "v1"
        assert s["ipEndPoints"] == [{"ipv4Address": "10.0.0.5", "transport": "TCP",
                                     "port": port}]


def test_register_heartbeat_reregister_deregister() -> None:
    c = core(100.0)
    req = c.poll(100.0)
    assert req is not None and (req.method, req.path) == ("PUT", f"nf-instances/{NF_ID}")
    assert json.loads(req.body) == c.profile
    assert c.poll(100.0) is None  # one outstanding request at a time
    c.on_response(201, json.dumps({**c.profile, "heartBeatTimer": 5}).encode(), 100.5)
    assert c.state is State.REGISTERED and c.next_deadline() == 105.5
    assert c.poll(105.0) is None
    req = c.poll(105.5)
    assert req is not None and req.method == "PATCH"
    assert req.content_type == "application/json-patch+json"
    assert json.loads(req.body) == [{"op": "replace", "path": "/nfStatus",
                                     "value": "REGISTERED"}]
    c.on_response(204, b"", 105.6)
    assert c.next_deadline() == 110.6
    c.poll(110.6)
    c.on_response(404, b"", 110.7)  # the NRF lost us: register again at once
    assert c.state is State.UNREGISTERED and c.poll(110.7).method == "PUT"
    c.on_response(200, b"{}", 110.8)  # no heartBeatTimer in the answer: keep ours
    assert c.next_deadline() == 115.8
    stop = c.stop()
    assert stop is not None and (stop.method, stop.path) == ("DELETE", f"nf-instances/{NF_ID}")
    assert c.poll(1e9) is None


def test_unreachable_nrf_backs_off_and_never_registered_means_no_delete() -> None:
    c = core(0.0)
    deadlines = []
    now = 0.0
    for _ in range(8):
        assert c.poll(now) is not None
        c.on_failure("ConnectError", now)
        deadlines.append(c.next_deadline() - now)
        now = c.next_deadline()
    assert deadlines == [1, 2, 4, 8, 16, 30, 30, 30]
    c.poll(now)
    c.on_response(500, b"", now)
    assert c.state is State.UNREGISTERED
    assert c.stop() is None


def test_nf_instance_id_is_kept_in_its_file(tmp_path: Path) -> None:
    f = tmp_path / "state" / "nf-instance-id"
    first, stored = load_nf_instance_id(str(f))
    assert stored and f.read_text().strip() == first
    assert load_nf_instance_id(str(f)) == (first, True)
    blocked = tmp_path / "file"
    blocked.write_text("")
    other, stored = load_nf_instance_id(str(blocked / "sub" / "id"))  # parent is a file
    assert not stored and other != first


# --- the real thing -----------------------------------------------------------------------


def serve(nrf: str, state: Path, http_port: int, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "EIR_LOG_LEVEL": "warning"}
    return subprocess.Popen(
        [*EIR, "serve", "--diameter-listen", f"127.0.0.1:{free_port()}", "--metrics-listen", "",
         "--http-listen", f"127.0.0.1:{http_port}", "--nrf-url", nrf,
         "--nf-instance-file", str(state), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # the JSON log


async def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return await asyncio.to_thread(proc.wait, 30)


async def test_serve_registers_with_the_nrf(tmp_path: Path) -> None:
    nrf = await NrfDouble(heartbeat=1).start()
    state = tmp_path / "nf-instance-id"
    port = free_port()
    proc = serve(nrf.url, state, port)
    try:
        put = await nrf.wait_for("PUT")
        nf_id = state.read_text().strip()
        assert put.path == f"/nnrf-nfm/v1/nf-instances/{nf_id}"
        assert put.headers["content-type"] == "application/json"
        profile = put.json
        assert (profile["nfType"], profile["nfInstanceId"]) == ("5G_EIR", nf_id)
        [svc] = profile["nfServices"]
        assert (svc["serviceName"], svc["scheme"]) == ("n5g-eir-eic", "http")
        assert svc["ipEndPoints"] == [{"ipv4Address": "127.0.0.1", "transport": "TCP",
                                       "port": port}]
        # Heart-beats at the NRF's 1 s although we offered 60 s.
        assert profile["heartBeatTimer"] == 60
        patch = await nrf.wait_for("PATCH", 2)
        assert patch.headers["content-type"] == "application/json-patch+json"
        # The NRF forgets us (restart): the next heart-beat gets 404 and we register again.
        nrf.profiles.clear()
        again = await nrf.wait_for("PUT", 2)
        assert again.json["nfInstanceId"] == nf_id
        assert await stop(proc) == 0
        delete = await nrf.wait_for("DELETE")
        assert delete.path == f"/nnrf-nfm/v1/nf-instances/{nf_id}"
        assert nf_id not in nrf.profiles
        # A restart keeps the identity.
        proc = serve(nrf.url, state, port)
        third = await nrf.wait_for("PUT", 3)
        assert third.json["nfInstanceId"] == nf_id
        assert await stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        await nrf.stop()


async def test_unreachable_nrf_never_stops_answering(tmp_path: Path) -> None:
    # Bound but not listening: connects are refused, and the port stays ours until the NRF comes
    # up (a bare free_port() had been taken in between, once, in CI).
    reserved = socket.socket()
    reserved.bind(("127.0.0.1", 0))
    nrf_port, port = reserved.getsockname()[1], free_port()
    proc = serve(f"http://127.0.0.1:{nrf_port}", tmp_path / "id", port)
    nrf = NrfDouble(heartbeat=1)
    try:
        await wait_listening(port)
        await asyncio.sleep(1.5)  # a few failed attempts
        r = await asyncio.to_thread(
            subprocess.run, ["curl", "-s", "--http2-prior-knowledge",
                             f"http://127.0.0.1:{port}/n5g-eir-eic/v1/equipment-status"
                             "?pei=imei-352099001761481"],
            capture_output=True, text=True, timeout=20)
        assert r.stdout == '{"status":"WHITELISTED"}'
        await nrf.start(sock=reserved)  # the NRF comes up: the retry registers
        try:
            await nrf.wait_for("PUT", timeout=40)
        except TimeoutError:
            proc.kill()
            print(proc.stdout.read().decode())
            raise
        assert await stop(proc) == 0
        await nrf.wait_for("DELETE")
    finally:
        if proc.poll() is None:
            proc.kill()
        await nrf.stop()
        reserved.close()
    log = proc.stdout.read()
    assert log.count(b'"event": "nrf_unreachable"') == 1, log  # loud once, not per retry


async def test_one_registration_for_several_workers(tmp_path: Path) -> None:
    nrf = await NrfDouble(heartbeat=1).start()
    proc = serve(nrf.url, tmp_path / "id", free_port(), "--workers", "2")
    try:
        await nrf.wait_for("PATCH", 3)
        assert len(nrf.requests("PUT")) == 1
        assert len({r.path for r in nrf.received}) == 1
        assert await stop(proc) == 0
        await nrf.wait_for("DELETE")
        assert len(nrf.requests("DELETE")) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
        await nrf.stop()

"""The whole path an operator runs: `eir-server sync` a DIRBS register into a real Redis,
`eir-server serve --store redis://...` answers ECRs from it over TCP, a new register version is
enforced without a restart, and a Redis outage degrades to the fallback verdict."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.diameter.builders import cer, ecr
from tests.netutil import free_port, recv_message, wait_for_port

EIR = [sys.executable, "-m", "eir_server.cli"]
STOLEN = "35209900176148"
CLEAN = "49015420323751"
UNALLOCATED = "86123400000017"






def equipment_status(answer: bytes) -> int | None:
    pos = 20
    while pos < len(answer):
        code, fl = struct.unpack_from("!II", answer, pos)
        length = fl & 0xFFFFFF
        if code == 1445:
            return struct.unpack_from("!I", answer, pos + 12)[0]
        pos += (length + 3) & ~3
    return None


def ask(sock: socket.socket, imei: str, hbh: int) -> int | None:
    sock.sendall(ecr(hbh=hbh, imei=imei))
    return equipment_status(recv_message(sock))


def readyz(port: int) -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).status
    except urllib.error.HTTPError as e:
        return e.code


def sync(source: Path, url: str) -> None:
    r = subprocess.run([*EIR, "sync", "--source", str(source), "--store", url, "--once",
                        "--progress", "never"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_sync_then_serve_from_redis(redis_factory, dirbs) -> None:  # noqa: ANN001
    redis = redis_factory.start()
    url = redis.url
    dirbs.publish("blacklist", "20260101_000000", [[STOLEN, "20200101", "stolen"]])
    # The GSMA TAC database travels through Redis too; serve loads it.
    (dirbs.root / "gsma_tac_db.txt").write_text(
        "TAC|Manufacturer|Model_Name|Bands|Allocation_Date\n"
        "35209900|Acme|Phone 1|LTE|01-Jan-2020\n49015420|Acme|Phone 2|LTE|01-Jan-2020\n")
    sync(dirbs.root, url)
    config = dirbs.root.parent / "eir.toml"
    config.write_text('[policy]\nunallocated_tac = "blacklisted"\n')

    port, mport = free_port(), free_port()
    env = {**os.environ, "EIR_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([*EIR, "serve", "--config", str(config),
                             "--store", url + "?timeout=0.2",
                             "--diameter-listen", f"127.0.0.1:{port}",
                             "--metrics-listen", f"127.0.0.1:{mport}",
                             "--store-fallback", "greylisted"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc)
        sock = socket.create_connection(("127.0.0.1", port), 10)
        sock.sendall(cer())
        recv_message(sock)
        assert ask(sock, STOLEN, 2) == 1  # BLACKLISTED, from Redis
        assert ask(sock, CLEAN, 3) == 0
        deadline = time.monotonic() + 10
        while ask(sock, UNALLOCATED, 4) != 1:  # TAC 86123400 is not in the GSMA file
            assert time.monotonic() < deadline, "TAC database from Redis not applied"
            time.sleep(0.05)
        assert readyz(mport) == 200
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read()
        assert b"eir_register_info{version=" in metrics

        # A new full list: the stolen device is unblocked, another one blocked, no restart.
        dirbs.publish("blacklist", "20260102_000000", [[CLEAN, "20200101", "stolen"]])
        sync(dirbs.root, url)
        deadline = time.monotonic() + 5
        hbh = 10
        while (ask(sock, CLEAN, hbh), ask(sock, STOLEN, hbh + 1)) != (1, 0):
            assert time.monotonic() < deadline, "new register version not enforced"
            hbh += 2
            time.sleep(0.05)

        # Redis goes away: cached IMEIs keep their verdicts, unseen ones get the fallback,
        # the peer keeps getting answers.
        redis.stop()
        assert ask(sock, CLEAN, 100) == 1
        assert ask(sock, "35209900000017", 101) == 2  # store_fallback = greylisted
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read()
        assert b'eir_requests_total{command="ECR",interface="s13",result="2001"}' in metrics
        assert b"eir_store_fallback_verdicts_total 1.0" in metrics
        sock.close()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0

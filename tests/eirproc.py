"""Driving a real `eir-server serve` process: an S13 client, HTTP probes, log lines."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.diameter.builders import cer, ecr
from tests.netutil import recv_message

EIR = [sys.executable, "-m", "eir_server.cli"]


def result_and_status(answer: bytes) -> tuple[int | None, int | None]:
    """(Result-Code or Experimental-Result-Code, Equipment-Status) of an answer."""
    pos, result, status = 20, None, None
    while pos < len(answer):
        code, fl = struct.unpack_from("!II", answer, pos)
        length = fl & 0xFFFFFF
        header = 12 if fl & 0x80000000 else 8
        if code == 268:
            result = struct.unpack_from("!I", answer, pos + header)[0]
        elif code == 297:  # Experimental-Result { Vendor-Id, Experimental-Result-Code }
            result = struct.unpack_from("!I", answer, pos + header + 20)[0]
        elif code == 1445:
            status = struct.unpack_from("!I", answer, pos + header)[0]
        pos += (length + 3) & ~3
    return result, status


def avp_text(msg: bytes, code: int) -> str | None:
    """The first top-level AVP `code` of a message, as text."""
    pos = 20
    while pos < len(msg):
        c, fl = struct.unpack_from("!II", msg, pos)
        length = fl & 0xFFFFFF
        header = 12 if fl & 0x80000000 else 8
        if c == code:
            return msg[pos + header:pos + length].decode()
        pos += (length + 3) & ~3
    return None


class S13Client:
    """One MME connection: CER at open, then ECRs answered one by one."""

    def __init__(self, port: int, realm: str = "localdomain", host: str = "127.0.0.1") -> None:
        self.realm = realm
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.sendall(cer())
        cea = recv_message(self.sock)
        self.cea_result = result_and_status(cea)[0]
        self.origin_host = avp_text(cea, 264)
        self.hbh = 100

    def status(self, imei: str, **kw: Any) -> int | None:
        self.hbh += 1
        self.sock.sendall(ecr(hbh=self.hbh, imei=imei, realm=self.realm, **kw))
        result, status = result_and_status(recv_message(self.sock))
        assert result == 2001, result
        return status

    def close(self) -> None:
        self.sock.close()


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_until(cond: Callable[[], Any], what: str, timeout: float = 60.0,
               proc: subprocess.Popen[Any] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting: {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting: {what}")
        time.sleep(0.1)


def log_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def stop(proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

"""Socket helpers shared by the tests that run `eir-server` as a subprocess."""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_nothing_listens_on() -> int:
    """A free port below the kernel's ephemeral range, for a server that comes up only later
    while a client keeps connecting to it. A port from free_port() is an ephemeral one: a
    connect to it can be given that very port as its source (a TCP self-connect), or another
    socket can take it in between."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 8000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None,
                  timeout: float = 30.0) -> None:
    """Until something accepts on 127.0.0.1:port (failing early if `proc` died)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            assert proc is None or proc.poll() is None, "server process exited"
            assert time.monotonic() < deadline, f"nothing listening on {port}"
            time.sleep(0.1)


def recv_message(sock: socket.socket) -> bytes:
    """One whole Diameter message, framed by its Message-Length."""
    data = b""
    while len(data) < 4:
        chunk = sock.recv(4 - len(data))
        assert chunk, "connection closed"
        data += chunk
    length = struct.unpack("!I", data[:4])[0] & 0xFFFFFF
    while len(data) < length:
        chunk = sock.recv(length - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path, ca_cn: str, server_cn: str, client_cn: str) -> Path:
    """A test CA (ca.pem/ca.key) and server.pem/key, client.pem/key it signed, each with its
    CN as DNS SAN and 127.0.0.1 as IP SAN; made with openssl in `d`."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            f"/CN={ca_cn}", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    for name, cn in (("server", server_cn), ("client", client_cn)):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                "-addext", f"subjectAltName=DNS:{cn},IP:127.0.0.1",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-copy_extensions", "copy",
                "-out", f"{name}.pem", cwd=d)
    return d

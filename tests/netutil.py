"""Socket helpers shared by the tests that run `eir-server` as a subprocess."""

from __future__ import annotations

import socket
import struct
import subprocess
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

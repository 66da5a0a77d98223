"""Hostile and misconfigured peers against a real `eir-server serve` process: what they cost in
log lines, and that they never take the others down."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable

from tests.diameter_io.conftest import IMEI_UNKNOWN, Peer, ServeProcess, cer, ecr, split

ONE_LOOP = True  # the server is a separate process: the client's loop flavour does not matter


def log_lines(proc: ServeProcess) -> list[dict]:
    out = []
    for line in proc.log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


async def test_error_answers_are_logged_once_per_peer_and_code_then_summarised(
        serve_process: Callable[..., ServeProcess]) -> None:
    proc = serve_process()
    wrong = await Peer.connect(proc.port)
    await wrong.open()
    n = 2000
    await wrong.send(b"".join(ecr(IMEI_UNKNOWN, n=i, dest_realm="other.realm")
                              for i in range(1, n + 1)))
    got: list = []
    while len(got) < n:
        got += split(await wrong.recv_raw())
    assert {m.result_code for m in got} == {3003}
    # A second wrong code from the same peer is a line of its own.
    await wrong.send(ecr(IMEI_UNKNOWN, n=n + 1, dest_host="not.us"))
    assert (await wrong.recv()).result_code == 3002
    wrong.close()
    lines = [e for e in log_lines(proc) if e.get("event") == "error_answer"]
    assert [e["result_code"] for e in lines] == [3003, 3002]
    assert lines[0]["peer"].startswith("127.0.0.1:")
    # The node's own shutdown writes the summary of what the period suppressed.
    proc.proc.terminate()
    assert proc.proc.wait(20) == 0
    summary = [e for e in log_lines(proc) if e.get("event") == "lines_suppressed"]
    assert [(e["line"], e["detail"], e["count"]) for e in summary] == \
        [("error_answer", 3003, n - 1)]


async def _non_reading_peer(port: int, n: int) -> tuple[asyncio.StreamReader,
                                                         asyncio.StreamWriter]:
    """A peer that completes CER, then sends ECRs without ever reading an answer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.transport.pause_reading()  # type: ignore[attr-defined]
    writer.write(cer(f"hog{n}.test.example"))
    return reader, writer


async def test_non_reading_peers_are_dropped_and_never_starve_a_healthy_one(
        serve_process: Callable[..., ServeProcess]) -> None:
    proc = serve_process("--write-stall-timeout", "2")
    healthy = await Peer.connect(proc.port)
    await healthy.open()
    hogs = [await _non_reading_peer(proc.port, i) for i in range(10)]
    batch = b"".join(ecr(IMEI_UNKNOWN, n=i) for i in range(2000))

    async def flood(w: asyncio.StreamWriter) -> bool:
        """Send until the server drops us (True); 400 batches (~120 MB) would fill any
        buffer on the way many times over."""
        try:
            for _ in range(400):
                w.write(batch)
                await w.drain()
        except ConnectionError:
            return True
        return False

    floods = [asyncio.ensure_future(flood(w)) for _, w in hogs]
    try:
        # The healthy peer keeps getting every answer, in order, while the hogs flood.
        for k in range(20):
            await healthy.send(b"".join(ecr(IMEI_UNKNOWN, n=100_000 + k * 50 + i)
                                        for i in range(50)))
            got: list = []
            while len(got) < 50:
                got += split(await healthy.recv_raw(timeout=30))
            assert [m.hbh for m in got] == [100_000 + k * 50 + i for i in range(50)]
        # A new peer's capabilities exchange is not stuck behind them either.
        newcomer = await Peer.connect(proc.port)
        await newcomer.open("late.test.example")
        newcomer.close()
        # Every hog is dropped once its unread answers stayed unread for the grace time.
        assert await asyncio.wait_for(asyncio.gather(*floods), 240) == [True] * len(hogs)
    finally:
        for f in floods:
            f.cancel()
        for _, w in hogs:
            w.transport.abort()
        healthy.close()
    aborted = [e for e in log_lines(proc) if e.get("event") == "connection_aborted"]
    assert aborted and aborted[0]["reason"] == "peer does not read its answers"

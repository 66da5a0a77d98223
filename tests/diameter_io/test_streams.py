"""The shell under awkward streams: many peers at once, a byte at a time, a peer that never
reads, unframeable streams and mutated frames. One misbehaving connection must never cost the
others their answers, and nothing may raise inside the event loop's callbacks."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

from .conftest import (
    CER,
    DWR,
    ECR,
    IMEI_BLACK,
    IMEI_GREY,
    IMEI_UNKNOWN,
    STATUS,
    V3GPP,
    Peer,
    ServeProcess,
    Server,
    cer,
    dwr,
    ecr,
    header,
    proxy_info,
    split,
)


async def assert_served(srv: Server, peer: Peer | None = None, n: int = 4242) -> None:
    """A healthy peer still gets a correct answer."""
    p = peer or await srv.peer()
    eca = await p.request(ecr(IMEI_BLACK, n=n))
    assert eca.hbh == n and eca.equipment_status == STATUS.BLACKLISTED
    if peer is None:
        p.close()


async def test_fifty_peers_each_pipelining_a_hundred_ecrs(
        server: Server, loop_errors: list[dict[str, Any]]) -> None:
    imeis = [IMEI_BLACK, IMEI_GREY, IMEI_UNKNOWN]
    expected = {IMEI_BLACK: 1, IMEI_GREY: 2, IMEI_UNKNOWN: None}

    async def one(k: int) -> int:
        p = await Peer.connect(server.port)
        assert (await p.request(cer(f"mme{k}.test.example"))).result_code == 2001
        base = k * 1000
        await p.send(b"".join(ecr(imeis[(k + i) % 3], n=base + i) for i in range(100)))
        for i in range(100):
            eca = await p.recv(timeout=20)
            assert eca.hbh == eca.e2e == base + i
            assert eca.equipment_status == expected[imeis[(k + i) % 3]]
        p.close()
        return k

    done = await asyncio.gather(*(one(k) for k in range(50)))
    assert sorted(done) == list(range(50))
    assert server.node.metrics.connections_accepted == 50
    assert server.node.metrics.requests[("s13", "ECR", "2001")] >= 50 * 66
    assert not loop_errors


async def test_peer_sending_one_byte_at_a_time(server: Server) -> None:
    p = await Peer.connect(server.port)
    stream = cer() + ecr(IMEI_GREY, n=2, proxies=[proxy_info("dra.test.example", b"s")]) \
        + dwr(hbh=3) + ecr(IMEI_UNKNOWN, n=4)
    for i in range(len(stream)):
        await p.send(stream[i:i + 1])
        await asyncio.sleep(0)
    cea, eca, dwa, eca2 = [await p.recv() for _ in range(4)]
    assert cea.code == CER and cea.result_code == 2001
    assert eca.code == ECR and eca.hbh == 2 and eca.equipment_status == STATUS.GREYLISTED
    assert dwa.code == DWR and dwa.hbh == 3 and dwa.result_code == 2001
    assert eca2.hbh == 4 and eca2.experimental_result == (V3GPP, 5422)
    p.close()


async def test_peer_that_never_reads_is_paused_and_others_are_served(
        server: Server, loop_errors: list[dict[str, Any]]) -> None:
    # A client with a small receive buffer whose StreamReader is never read: once its own
    # buffer is full it stops reading from the socket, and our answers pile up server-side.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(cer())
    await writer.drain()
    batch = b"".join(ecr(IMEI_BLACK, n=i) for i in range(1000))  # ~230 kB
    sent = 0

    async def flood() -> None:
        nonlocal sent
        while sent < 200 * len(batch):  # 46 MB: far more than any socket buffers hold
            writer.write(batch)
            await writer.drain()
            sent += len(batch)

    for _ in range(400):
        if server.node.protocols:
            break
        await asyncio.sleep(0.005)
    (proto,) = server.node.protocols
    task = asyncio.ensure_future(flood())
    try:
        # Held: its unread answers filled the kernel's send queue (or our write buffer).
        # (Reading also pauses for a moment whenever a read brought more messages than one
        # turn handles: that is the fair share, not backpressure.)
        for _ in range(2000):
            if proto.held:
                break
            await asyncio.sleep(0.005)
        assert proto.held and not proto.transport.is_reading(), \
            "server kept reading from a peer that reads nothing"
        # Held early: at most ~UNREAD_HIGH of answers (plus one turn) went to this peer.
        assert server.node.metrics.requests[("s13", "ECR", "2001")] < 4000
        assert not task.done(), "the flood must be blocked by TCP flow control"
        # What the server holds for this peer stays bounded (high water + one read's answers).
        assert proto.transport.get_write_buffer_size() < 4 * 1024 * 1024
        counter = server.node.metrics.requests
        processed = counter[("s13", "ECR", "2001")]
        assert processed * len(batch) // 1000 < 64 * 1024 * 1024
        # Everyone else is still answered, promptly and correctly.
        await assert_served(server)
        await asyncio.sleep(0.2)
        # Paused means paused: nothing more was read from the flooding peer.
        assert not proto.transport.is_reading()
        assert counter[("s13", "ECR", "2001")] == processed + 1
        assert not task.done()
    finally:
        task.cancel()
        writer.transport.abort()
    assert not loop_errors
    del reader


def _bad_streams() -> dict[str, bytes]:
    return {
        "version 2, length below 20": header(0x80, ECR, 16777252, 1, 1, 12, version=2)
        + b"\0" * 40,
        "length below 20": header(0x80, ECR, 16777252, 1, 1, 12) + b"\0" * 40,
        "length above max": header(0x80, ECR, 16777252, 1, 1, 0x100000) + b"\0" * 40,
        "version 0 garbage": b"GET / HTTP/1.1\r\nHost: eir\r\n\r\n",
    }


async def test_unframeable_stream_closes_only_that_connection(
        server: Server, loop_errors: list[dict[str, Any]]) -> None:
    good = await server.peer()
    for name, data in _bad_streams().items():
        for opened in (True, False):
            p = await server.peer(open_=opened)
            await p.send(data)
            assert await p.expect_closed() == b"", f"{name}: no answer, just close"
            await assert_served(server, good)
    assert server.node.metrics.framing_errors == 2 * len(_bad_streams())
    # The first complete frames of a good peer in the same moment are unaffected.
    await assert_served(server)
    good.close()
    assert not loop_errors


async def test_another_version_is_answered_5011_and_the_connection_goes_on(
        server: Server) -> None:
    # RFC 6733 7.1.5 DIAMETER_UNSUPPORTED_VERSION: a framable message of another version is
    # answered, not a reason to drop the peer's other requests
    p = await server.peer()
    bad = bytearray(ecr(IMEI_BLACK, n=7))
    bad[0] = 2
    answer = await p.request(bytes(bad))
    assert (answer.hbh, answer.result_code) == (7, 5011)
    await assert_served(server, p)
    p.close()


async def test_length_just_above_the_configured_maximum_is_unframeable(server: Server) -> None:
    limit = server.node.peer_config.max_message_length
    p = await server.peer()
    await p.send(header(0xC0, ECR, 16777252, 1, 1, limit + 1))
    assert await p.expect_closed() == b""
    q = await server.peer()
    big = ecr(IMEI_BLACK, n=5, extra=[struct.pack("!II", 99999, 60000) + b"x" * 59992])
    assert len(big) < limit
    eca = await q.request(big)
    assert eca.hbh == 5 and eca.equipment_status == STATUS.BLACKLISTED
    q.close()


async def test_mutated_ecr_frames_never_break_the_server(
        server: Server, loop_errors: list[dict[str, Any]]) -> None:
    rng = random.Random(0x5133)
    base = ecr(IMEI_GREY, n=1, proxies=[proxy_info("dra.test.example", b"st")])
    good = await server.peer()

    def mutate() -> bytes:
        f = bytearray(base)
        kind = rng.randrange(4)
        if kind == 0:  # flip bytes anywhere after the version/length word
            for _ in range(rng.choice((1, 2, 4, 8))):
                f[rng.randrange(4, len(f))] = rng.randrange(256)
        elif kind == 1:  # corrupt an AVP length field, keeping the message length
            pos = 20
            targets = []
            while pos + 8 <= len(f):
                targets.append(pos)
                ln = int.from_bytes(f[pos + 5:pos + 8], "big")
                if ln < 8:
                    break
                pos += (ln + 3) & ~3
            t = rng.choice(targets)
            f[t + 5:t + 8] = rng.randrange(0, 400).to_bytes(3, "big")
        elif kind == 2:  # truncate and fix the header length
            f = f[:rng.randrange(20, len(f))]
            f[1:4] = len(f).to_bytes(3, "big")
        else:  # anything goes, including the header length
            for _ in range(rng.choice((1, 3, 6))):
                f[rng.randrange(len(f))] = rng.randrange(256)
        return bytes(f)

    outcomes: Counter[int | str] = Counter()

    async def one(frame: bytes) -> None:
        p = await server.peer()
        await p.send(frame + ecr(IMEI_BLACK, n=77))
        p.writer.write_eof()
        rest = await p.expect_closed(timeout=10)
        answers = split(rest)  # every byte we get back must be a well-formed message
        for m in answers:
            assert not m.flags & 0x80
            assert m.code in (ECR, int.from_bytes(frame[5:8], "big"))
        first = answers[0] if answers else None
        if first is None:
            outcomes["closed"] += 1
        else:
            code = first.result_code
            outcomes[code if code is not None else "5422"] += 1
            # The trailing valid ECR is answered whenever the mutated frame was framed exactly.
            if len(frame) == int.from_bytes(frame[1:4], "big") and frame[0] == 1 and \
                    first.result_code != 3010:
                assert answers[-1].hbh == 77 and answers[-1].equipment_status == 1, answers

    frames = [mutate() for _ in range(300)]
    for i in range(0, len(frames), 30):
        await asyncio.gather(*(one(f) for f in frames[i:i + 30]))
        await assert_served(server, good, n=i)
    assert not loop_errors
    good.close()
    # The mutations reached the decoder in many ways, not just the framer.
    assert outcomes["closed"] > 0 and outcomes[2001] > 0
    assert len([k for k in outcomes if isinstance(k, int) and k >= 3000]) >= 5, outcomes


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_serve_process_memory_stays_bounded_under_a_non_reading_peer(
        serve_process: Callable[..., ServeProcess]) -> None:
    proc = serve_process()
    warm = await Peer.connect(proc.port)
    await warm.open()
    for i in range(200):
        await warm.request(ecr(IMEI_UNKNOWN, n=i))
    rss0 = _rss_kib(proc.proc.pid)

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", proc.port))
    _reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(cer())
    batch = b"".join(ecr(IMEI_UNKNOWN, n=i) for i in range(1000))
    budget = 60 * 1024 * 1024
    sent = 0
    try:
        while sent < budget:
            writer.write(batch)
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except TimeoutError:
                break  # the server stopped reading from us
            sent += len(batch)
        grown = _rss_kib(proc.proc.pid) - rss0
        assert sent < budget, "the server read everything a non-reading peer sent"
        assert grown < 24 * 1024, f"server RSS grew by {grown} KiB"
        # Another peer is answered meanwhile.
        eca = await warm.request(ecr(IMEI_UNKNOWN, n=9999))
        assert eca.hbh == 9999 and eca.equipment_status == STATUS.WHITELISTED  # serve default
    finally:
        writer.transport.abort()
        warm.close()


async def test_valid_request_before_garbage_in_same_read_is_answered(server: Server) -> None:
    p = await server.peer()
    await p.send(ecr(IMEI_BLACK, n=5) + header(0x80, ECR, 16777252, 1, 1, 12))
    got = split(await p.expect_closed())
    assert [m.hbh for m in got] == [5]

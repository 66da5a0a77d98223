"""DWR/DWA both ways, the RFC 3539 watchdog through the shell's timers, DPR both ways and an
orderly SIGTERM of a real `eir-server serve` process.

Watchdog tests run on an event loop whose clock the test can move forward (a subclass of the
selector loop with an offset added to `time()`); the node uses that loop's clock, so the shell's
real timer path fires without waiting Tw seconds.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from eir_server.diameter.codec import u32_avp
from eir_server.policy.types import ImeiRecord
from eir_server.store import MISSING, MemoryStore

from .conftest import (
    DISCONNECT_CAUSE,
    DPR,
    DWR,
    ECR,
    IMEI_BLACK,
    IMEI_GREY,
    IMEI_UNKNOWN,
    ORIGIN_HOST,
    ORIGIN_REALM,
    ORIGIN_STATE_ID,
    OUR_HOST,
    OUR_REALM,
    STATUS,
    V3GPP,
    E,
    Msg,
    Peer,
    R,
    ServeProcess,
    Server,
    answer_to,
    cer,
    dpr,
    dwr,
    ecr,
    peer_config,
    split,
    start_server,
)


class OffsetLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock can jump forward: timers due by then fire on the next turn."""

    offset = 0.0

    def time(self) -> float:
        return super().time() + self.offset


def run_with_clock(scenario: Callable[[OffsetLoop], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=OffsetLoop) as runner:
        loop = runner.get_loop()
        assert isinstance(loop, OffsetLoop)
        runner.run(scenario(loop))


async def until(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.005)


async def watchdog_server(loop: OffsetLoop) -> Server:
    cfg = peer_config(watchdog_interval=6.0, watchdog_jitter=0.0, cer_timeout=10.0)
    return await start_server(config=cfg, clock=loop.time)


async def stop(srv: Server, *peers: Peer) -> None:
    for p in peers:
        p.close()
    for proto in list(srv.node.protocols):
        proto.abort("test over")
    await srv.node.shutdown(0.2)


def check_dwr(m: Msg) -> None:
    assert (m.code, m.app) == (DWR, 0) and m.flags == R
    assert m.one(ORIGIN_HOST).text == OUR_HOST and m.one(ORIGIN_REALM).text == OUR_REALM
    assert m.one(ORIGIN_STATE_ID).u32 == 1234


# ---------------------------------------------------------------------------------------------
# DWR from the peer


async def test_dwr_is_answered_with_dwa(server: Server) -> None:
    p = await server.peer()
    dwa = await p.request(dwr(hbh=0x11, e2e=0x22))
    assert (dwa.code, dwa.app, dwa.flags, dwa.hbh, dwa.e2e) == (DWR, 0, 0, 0x11, 0x22)
    assert dwa.result_code == 2001
    assert dwa.one(ORIGIN_HOST).text == OUR_HOST
    assert dwa.one(ORIGIN_STATE_ID).u32 == 1234
    p.close()


async def test_dwr_missing_origin_realm_gets_5005(server: Server) -> None:
    p = await server.peer()
    bad = Msg.parse(dwr())
    from .conftest import build
    ans = await p.request(build(R, DWR, 0, [a.raw for a in bad.avps if a.code != ORIGIN_REALM]))
    assert ans.result_code == 5005 and not ans.flags & E
    assert [a.code for a in ans.failed_avp] == [ORIGIN_REALM]
    assert (await p.request(dwr())).result_code == 2001
    p.close()


# ---------------------------------------------------------------------------------------------
# Our watchdog


def test_idle_peer_gets_dwr_and_is_closed_2tw_after_unanswered_dwr() -> None:
    async def scenario(loop: OffsetLoop) -> None:
        srv = await watchdog_server(loop)
        p = await srv.peer()
        (proto,) = srv.node.protocols
        loop.offset += 6.01
        check_dwr(await p.recv())
        assert proto.conn.watchdog.value == "OKAY"
        loop.offset += 6.01  # first Tw without DWA: SUSPECT, still connected
        await until(lambda: proto.conn.watchdog.value == "SUSPECT")
        assert proto in srv.node.protocols and not p.reader.at_eof()
        loop.offset += 6.01  # second Tw: DOWN, connection closed
        assert await p.expect_closed() == b""
        assert srv.node.metrics.watchdog_failures >= 1
        await stop(srv, p)

    run_with_clock(scenario)


def test_answered_dwr_keeps_the_connection_and_suspect_fails_back() -> None:
    async def scenario(loop: OffsetLoop) -> None:
        srv = await watchdog_server(loop)
        p = await srv.peer()
        (proto,) = srv.node.protocols
        for _ in range(3):
            loop.offset += 6.01
            req = await p.recv()
            check_dwr(req)
            await p.send(answer_to(req, [u32_avp(ORIGIN_STATE_ID, 7)]))
            await until(lambda: not proto.conn._dwr_pending)
        # Let it go SUSPECT, then any message fails back to OKAY.
        loop.offset += 6.01
        check_dwr(await p.recv())
        loop.offset += 6.01
        await until(lambda: proto.conn.watchdog.value == "SUSPECT")
        eca = await p.request(ecr(IMEI_BLACK))
        assert eca.equipment_status == STATUS.BLACKLISTED
        assert proto.conn.watchdog.value == "OKAY"
        loop.offset += 6.01
        check_dwr(await p.recv())
        await stop(srv, p)

    run_with_clock(scenario)


def test_traffic_resets_the_watchdog_timer() -> None:
    async def scenario(loop: OffsetLoop) -> None:
        srv = await watchdog_server(loop)
        p = await srv.peer()
        for i in range(4):  # 4 x 5 s > 3 Tw, but never 6 s of silence
            loop.offset += 5.0
            eca = await p.request(ecr(IMEI_GREY, n=i + 1))
            assert eca.hbh == i + 1, "no DWR should have come before the ECA"
        # The next message from the server is the DWA to our own DWR, not a DWR of its own.
        dwa = await p.request(dwr(hbh=4242))
        assert dwa.hbh == 4242 and not dwa.flags & R
        await stop(srv, p)

    run_with_clock(scenario)


def test_connection_without_cer_closed_after_cer_timeout() -> None:
    async def scenario(loop: OffsetLoop) -> None:
        srv = await watchdog_server(loop)
        idle = await Peer.connect(srv.port)
        other = await srv.peer()
        loop.offset += 10.01
        assert await idle.expect_closed() == b""
        # The peer that did its CER is still served (and gets a DWR: 10 s > Tw).
        first = await other.recv()
        check_dwr(first)
        eca = await other.request(ecr(IMEI_UNKNOWN))
        assert eca.experimental_result == (V3GPP, 5422)
        await stop(srv, idle, other)

    run_with_clock(scenario)


# ---------------------------------------------------------------------------------------------
# DPR from the peer


async def test_peer_dpr_gets_dpa_then_close(server: Server) -> None:
    p = await server.peer()
    dpa = await p.request(dpr(cause=1, hbh=5, e2e=6))
    assert (dpa.code, dpa.app, dpa.flags, dpa.hbh, dpa.e2e) == (DPR, 0, 0, 5, 6)
    assert dpa.result_code == 2001
    assert dpa.one(ORIGIN_HOST).text == OUR_HOST
    assert await p.expect_closed() == b""
    assert server.node.metrics.dpr[("received", "BUSY")] == 1


async def test_pipelined_ecrs_before_dpr_are_all_answered(server: Server) -> None:
    p = await server.peer()
    await p.send(b"".join(ecr(IMEI_BLACK, n=i) for i in range(1, 51)) + dpr(hbh=999))
    rest = await p.expect_closed()
    got = split(rest)
    assert sorted(m.hbh for m in got) == [*range(1, 51), 999]
    assert all(m.equipment_status == STATUS.BLACKLISTED for m in got if m.code == ECR)
    assert [m.result_code for m in got if m.code == DPR] == [2001]


async def test_dpa_comes_after_answers_to_earlier_requests(server: Server) -> None:
    p = await server.peer()
    await p.send(b"".join(ecr(IMEI_BLACK, n=i) for i in range(1, 51)) + dpr(hbh=999))
    got = split(await p.expect_closed())
    assert [m.hbh for m in got] == [*range(1, 51), 999]


# ---------------------------------------------------------------------------------------------
# DPR from us: node shutdown, in process (with answers that wait for the store) and SIGTERM


class SlowStore(MemoryStore):
    """A store whose every lookup goes through `fetch` and completes when the test says so,
    like a Redis round trip that is still in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple[str, asyncio.Future[ImeiRecord | None]]] = []

    def get_nowait(self, imei14: str) -> Any:
        return MISSING

    def fetch(self, imei14: str) -> asyncio.Future[ImeiRecord | None]:
        fut: asyncio.Future[ImeiRecord | None] = asyncio.get_running_loop().create_future()
        self.pending.append((imei14, fut))
        return fut

    def release(self) -> None:
        for key, fut in self.pending:
            if not fut.done():
                fut.set_result(self._records.get(key))
        self.pending.clear()


async def test_shutdown_sends_dpr_and_in_flight_answers_are_written_before_close(
        servers: Callable[..., Any]) -> None:
    store = SlowStore()
    srv: Server = await servers(store=store)
    p = await srv.peer()
    await p.send(b"".join(ecr(IMEI_BLACK, n=i) for i in range(1, 11)))
    await until(lambda: len(store.pending) == 10)
    assert srv.node.in_flight == 10

    shutdown = asyncio.ensure_future(srv.node.shutdown(deadline=5.0))
    dpr_msg = await p.recv()
    assert (dpr_msg.code, dpr_msg.app, dpr_msg.flags) == (DPR, 0, R)
    assert dpr_msg.one(DISCONNECT_CAUSE).u32 == 0, "REBOOTING"
    assert dpr_msg.one(ORIGIN_HOST).text == OUR_HOST
    # A request that crosses our DPR is still answered (it also waits for the store).
    await p.send(ecr(IMEI_GREY, n=11))
    await until(lambda: len(store.pending) == 11)
    await p.send(answer_to(dpr_msg, []))
    await asyncio.sleep(0.05)
    assert not shutdown.done(), "must wait for the in-flight answers"
    store.release()
    got = [await p.recv() for _ in range(11)]
    assert sorted(m.hbh for m in got) == list(range(1, 12))
    assert all(m.code == ECR and m.result_code == 2001 for m in got)
    assert {m.hbh: m.equipment_status for m in got}[11] == STATUS.GREYLISTED
    assert await p.expect_closed() == b""
    await asyncio.wait_for(shutdown, 5)
    assert not srv.node.protocols


async def test_shutdown_closes_peer_that_never_sends_cer(servers: Callable[..., Any]) -> None:
    srv: Server = await servers()
    p = await Peer.connect(srv.port)
    opened = await srv.peer()
    shutdown = asyncio.ensure_future(srv.node.shutdown(deadline=5.0))
    assert await p.expect_closed() == b""
    req = await opened.recv()
    assert req.code == DPR
    await opened.send(answer_to(req, []))
    assert await opened.expect_closed() == b""
    await asyncio.wait_for(shutdown, 5)


async def test_sigterm_sends_dpr_drains_and_exits_zero(
        serve_process: Callable[..., ServeProcess]) -> None:
    proc = serve_process("--shutdown-timeout", "8", "--unknown-equipment", "unknown")
    p = await Peer.connect(proc.port)
    await p.open()
    idle = await Peer.connect(proc.port)
    assert (await idle.request(cer("mme2.test.example"))).result_code == 2001
    n = 300
    await p.send(b"".join(ecr(IMEI_UNKNOWN, n=i) for i in range(1, n + 1)))
    proc.proc.send_signal(signal.SIGTERM)
    answers: list[Msg] = []
    dpr_msg = None
    while dpr_msg is None:
        m = await p.recv(timeout=10)
        if m.code == DPR:
            dpr_msg = m
        else:
            answers.append(m)
    assert dpr_msg.flags == R and dpr_msg.one(DISCONNECT_CAUSE).u32 == 0
    # Requests sent after the DPR arrived but before our DPA cross it and are answered too.
    await p.send(ecr(IMEI_UNKNOWN, n=n + 1) + answer_to(dpr_msg, []))
    answers.extend(split(await p.expect_closed(timeout=10)))
    assert [m.hbh for m in answers] == list(range(1, n + 2))
    assert all(m.code == ECR and m.experimental_result == (V3GPP, 5422) for m in answers)
    # The other peer got its DPR too; it answers and is closed.
    idle_dpr = await idle.recv(timeout=10)
    assert idle_dpr.code == DPR and idle_dpr.one(DISCONNECT_CAUSE).u32 == 0
    await idle.send(answer_to(idle_dpr, []))
    assert await idle.expect_closed(timeout=10) == b""
    rc = await asyncio.get_running_loop().run_in_executor(None, proc.proc.wait, 15)
    assert rc == 0, proc.log.read_text()
    log = proc.log.read_text()
    assert "shutting_down" in log and "stopped" in log


def test_peer_that_never_answers_our_dpr_is_closed_after_the_dpa_timeout() -> None:
    async def scenario(loop: OffsetLoop) -> None:
        srv = await watchdog_server(loop)  # dpa_timeout 5 s
        p = await srv.peer()
        shutdown = asyncio.ensure_future(srv.node.shutdown(deadline=30.0))
        req = await p.recv()
        assert req.code == DPR and req.flags == R
        await asyncio.sleep(0.05)
        assert not shutdown.done() and not p.reader.at_eof()
        loop.offset += 5.01
        assert await p.expect_closed() == b""
        await asyncio.wait_for(shutdown, 3)
        assert not srv.node.protocols
        await stop(srv, p)

    run_with_clock(scenario)

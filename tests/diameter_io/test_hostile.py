"""Hostile and misconfigured peers against a real `eir-server serve` process: what they cost in
log lines, and that they never take the others down."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import urllib.request
from collections.abc import Callable

from eir_server.diameter.codec import avp, grouped_avp, u32_avp
from tests.diameter_io.conftest import (
    AUTH_APP_ID,
    IMEI_UNKNOWN,
    V3GPP,
    VENDOR_ID,
    VSAI,
    E,
    Msg,
    Peer,
    ServeProcess,
    cer,
    ecr,
    free_port,
    split,
)

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
    proc = serve_process("--overload-target-delay", "0")  # every one answered 3003, not 3004
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


async def test_connections_a_peer_closes_on_itself_are_logged_once_per_reason(
        serve_process: Callable[..., ServeProcess]) -> None:
    """A peer that connects, sends a request before CER or a CER we reject, and comes back
    for more causes a close every time: one connection_closed line per peer and reason in
    the limiter's period, the rest counted in the summary (unlimited, 15k lines in 5 s)."""
    proc = serve_process()
    s6a = grouped_avp(VSAI, [u32_avp(VENDOR_ID, V3GPP), u32_avp(AUTH_APP_ID, 16777251)])
    n = 100
    for i in range(n):
        for first in (ecr(IMEI_UNKNOWN, n=i + 1), cer(apps=[s6a])):
            p = await Peer.connect(proc.port)
            await p.send(first)
            await p.expect_closed()  # answered (3010 / CEA 5010), then closed by the server
            p.close()
    proc.proc.terminate()
    assert proc.proc.wait(20) == 0
    events = log_lines(proc)
    closed = [e for e in events if e.get("event") == "connection_closed"]
    assert sorted(e["reason"] for e in closed) == ["CER rejected with 5010", "message before CER"], \
        f"{len(closed)} connection_closed lines"
    summary = {e["detail"]: e["count"] for e in events
               if e.get("event") == "lines_suppressed" and e["line"] == "connection_closed"}
    assert summary == {"CER rejected with 5010": n - 1, "message before CER": n - 1}, summary


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
            # All answered (a 3004 refused at once under overload may overtake verdicts:
            # answers are matched by hop-by-hop id, RFC 6733 6.2).
            assert sorted(m.hbh for m in got) == [100_000 + k * 50 + i for i in range(50)]
            assert {m.result_code for m in got} <= {2001, 3004}
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


def _ecr_requests(metrics_port: int) -> int:
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in body.decode().splitlines()
               if line.startswith("eir_requests_total{") and 'command="ECR"' in line)


async def test_a_peer_whose_window_is_shut_is_held_early_and_served_once_it_reads(
        serve_process: Callable[..., ServeProcess]) -> None:
    """Answers the peer's kernel will not take (its receive window is shut) are not even sent:
    after a few hundred of them the peer is no longer read from, long before its 192 KiB of
    unacknowledged answers (~1,300), each a check the other peers wait for. Once it reads again
    it is read from again and every request is answered."""
    mport = free_port()
    proc = serve_process("--metrics-listen", f"127.0.0.1:{mport}")
    reader, writer = await _non_reading_peer(proc.port, 1)
    n = 3000
    writer.write(b"".join(ecr(IMEI_UNKNOWN, n=i + 1) for i in range(n)))
    await writer.drain()
    await asyncio.sleep(1.0)
    served = await asyncio.to_thread(_ecr_requests, mport)
    assert 0 < served < 700, served
    await asyncio.sleep(0.5)
    assert await asyncio.to_thread(_ecr_requests, mport) == served  # held, not read from
    writer.transport.resume_reading()  # type: ignore[attr-defined]
    got: dict[int, Msg] = {}
    buf = b""
    while len(got) < n + 1:  # the CEA and every answer
        buf += await asyncio.wait_for(reader.read(1 << 16), 30)
        while len(buf) >= 20 and len(buf) >= (size := int.from_bytes(buf[1:4], "big")):
            m = split(buf[:size])[0]
            buf = buf[size:]
            got[m.hbh if m.code == 324 else -1] = m
    assert sorted(k for k in got if k > 0) == list(range(1, n + 1))
    writer.close()


OC_SUPPORTED, OC_OLR, OC_SEQ, OC_VALIDITY, OC_REDUCTION = 621, 623, 624, 625, 627
DOIC_AVP = grouped_avp(OC_SUPPORTED, [avp(622, (1).to_bytes(8, "big"), mandatory=False)],
                       mandatory=False)


def olr(m: Msg) -> tuple[int, int, int] | None:
    """(sequence, reduction %, validity s) of an answer's OC-OLR."""
    a = m.get(OC_OLR)
    if a is None:
        return None
    kids = {c.code: c.value for c in a.children}
    return (int.from_bytes(kids[OC_SEQ], "big"), int.from_bytes(kids[OC_REDUCTION], "big"),
            int.from_bytes(kids[OC_VALIDITY], "big"))


async def _collect(peer: Peer, n: int, into: dict[int, Msg]) -> None:
    """n answers, read in raw chunks and parsed once all are in: a reader that parsed as it
    went would pace the burst (the worker stops reading a peer whose answers back up)."""
    buf = bytearray()
    ends: list[int] = []
    pos = 0
    while len(ends) < n:
        chunk = await asyncio.wait_for(peer.reader.read(1 << 16), 60)
        if not chunk:
            raise EOFError(f"{len(ends)} answers of {n}")
        buf += chunk
        while len(buf) - pos >= 4 and len(buf) >= pos + (
                length := int.from_bytes(buf[pos + 1:pos + 4], "big")):
            assert length >= 20, f"bad answer length {length}"
            pos += length
            ends.append(pos)
    for m in split(bytes(buf)):
        assert m.hbh not in into, f"answered twice: {m.hbh}"
        into[m.hbh] = m


async def test_overload_is_shed_with_3004_and_reported_to_doic_peers(
        serve_process: Callable[..., ServeProcess]) -> None:
    # A 20 ms target: 60k pipelined ECRs wait in the kernel longer than that.
    mport = free_port()
    proc = serve_process("--overload-target-delay", "0.02", "--metrics-listen",
                         f"127.0.0.1:{mport}")
    doic, plain = await Peer.connect(proc.port), await Peer.connect(proc.port)
    await doic.open()
    await plain.open("mme2.test.example")
    # A third, light DOIC peer sends one ECR every 10 ms throughout: it sees the report come
    # and go as the worker sees it (the big peers' answers are read long after they were sent).
    # Every 0.1 s could miss the whole episode on the compiled build, whose shedding can be
    # over within that (4 runs in 14 at one time).
    probe = await Peer.connect(proc.port)
    await probe.open("mme3.test.example")
    probe_reports: list[tuple[int, int, int] | None] = []
    probing = True

    async def probe_loop() -> None:
        i = 0
        reducing = False  # the last report seen asks for a reduction (not withdrawn since)
        # After the load, on until the report it saw is withdrawn (the wait below bounds it).
        while probing or i < 30 or reducing:
            i += 1
            await probe.send(ecr(IMEI_UNKNOWN, n=10_000_000 + i, extra=[DOIC_AVP]))
            m = await probe.recv(timeout=60)
            while m.code != 324:  # a DWR from our watchdog
                m = await probe.recv(timeout=60)
            r = olr(m)
            probe_reports.append(r)
            if r is not None:
                reducing = r[1] > 0 and r[2] > 0
            await asyncio.sleep(0.01)

    prober = asyncio.ensure_future(probe_loop())
    n = 30_000
    got_doic: dict[int, Msg] = {}
    got_plain: dict[int, Msg] = {}
    readers = [asyncio.ensure_future(_collect(doic, n, got_doic)),
               asyncio.ensure_future(_collect(plain, n, got_plain))]
    # Encoded before the first is sent: the burst must outrun the worker however slow this
    # process is (encoding as it went, a starved client once paced itself below the target).
    doic_batches = [b"".join(ecr(IMEI_UNKNOWN, n=i + 1, extra=[DOIC_AVP])
                             for i in range(k, k + 1000)) for k in range(0, n, 1000)]
    plain_batches = [b"".join(ecr(IMEI_UNKNOWN, n=i + 1) for i in range(k, k + 1000))
                     for k in range(0, n, 1000)]
    for d, p in zip(doic_batches, plain_batches, strict=True):
        await doic.send(d)
        await plain.send(p)
    await asyncio.wait_for(asyncio.gather(*readers), 180)
    # Every request answered once: a verdict or 3004, nothing left to time out.
    for got in (got_doic, got_plain):
        assert sorted(got) == list(range(1, n + 1))
        codes = {m.result_code for m in got.values()}
        assert codes == {2001, 3004}, codes
        busy = [m for m in got.values() if m.result_code == 3004]
        assert all(m.flags & E for m in busy)
    # The DOIC peer reads OC-Supported-Features in every answer and an OC-OLR while we shed,
    # 3004 included; sequence numbers never go back and each names one percentage.
    assert all(m.get(OC_SUPPORTED) is not None for m in got_doic.values())
    reports = [r for i in range(1, n + 1) if (r := olr(got_doic[i])) is not None]
    assert reports and any(pct > 0 and validity > 0 for _, pct, validity in reports)
    assert any(olr(m) is not None for m in got_doic.values() if m.result_code == 3004)
    seqs = [s for s, _, _ in reports]
    assert seqs == sorted(seqs)
    assert len({(s, p) for s, p, _ in reports}) == len(set(seqs))
    # A peer without DOIC gets none of it.
    assert all(m.get(OC_SUPPORTED) is None and m.get(OC_OLR) is None
               for m in got_plain.values())
    # Each peer's request counter counts what it sent, the requests shed with 3004 included.
    body = (await asyncio.to_thread(
        urllib.request.urlopen, f"http://127.0.0.1:{mport}/metrics", timeout=10)).read()
    per_peer = {line.split('"')[1]: float(line.rsplit(" ", 1)[1])
                for line in body.decode().splitlines()
                if line.startswith("eir_diameter_peer_requests_total{")}
    assert per_peer["mme1.test.example"] == per_peer["mme2.test.example"] == n, per_peer
    # Once the load is gone the report is withdrawn (validity 0) with a newer sequence number.
    probing = False
    await asyncio.wait_for(prober, 120)
    seen = [r for r in probe_reports if r is not None]
    assert any(pct > 0 for _, pct, _ in seen), probe_reports
    last = max(i for i, (_, pct, _) in enumerate(seen) if pct > 0)
    withdrawn = next((r for r in seen[last:] if r[2] == 0), None)
    assert withdrawn is not None and withdrawn[0] > seen[last][0] and withdrawn[1] == 0
    probe.close()
    doic.close()
    plain.close()


async def test_a_reacting_client_offers_less_while_overloaded(
        serve_process: Callable[..., ServeProcess]) -> None:
    proc = serve_process("--overload-target-delay", "0.02")
    mme = await Peer.connect(proc.port)
    await mme.open()
    flood_batch = b"".join(ecr(IMEI_UNKNOWN, n=i) for i in range(5000))
    # A peer without DOIC keeps the worker busy. Its own threads write and read: answers it
    # left unread while this loop builds the MME's rounds would shut its window, and the
    # worker stops reading a peer whose answers it cannot even send (no overload then).
    flood = socket.create_connection(("127.0.0.1", proc.port))
    flood.sendall(cer("flood.test.example"))

    def flooder() -> None:
        with contextlib.suppress(OSError):
            for _ in range(40):
                flood.sendall(flood_batch)

    def drain_flood() -> None:
        with contextlib.suppress(OSError):
            while flood.recv(1 << 20):
                pass

    threads = [threading.Thread(target=f, daemon=True) for f in (flooder, drain_flood)]
    for t in threads:
        t.start()
    # The MME wants 500 ECRs per round and applies the loss algorithm: it sends
    # (100 - reduction) % of them, the reduction being the latest OC-OLR it read.
    want, offered, reduction, hbh = 500, [], 0, 0
    try:
        for _ in range(30):
            send = want * (100 - reduction) // 100
            offered.append(send)
            await mme.send(b"".join(ecr(IMEI_UNKNOWN, n=hbh + i + 1, extra=[DOIC_AVP])
                                    for i in range(send)))
            got: list[Msg] = []
            while len(got) < send:
                got += split(await mme.recv_raw(timeout=60))
            hbh += send
            for m in got:
                r = olr(m)
                if r is not None:
                    reduction = r[1] if r[2] else 0
    finally:
        with contextlib.suppress(OSError):
            flood.shutdown(socket.SHUT_RDWR)
        flood.close()
        for t in threads:
            t.join(30)
        mme.close()
    assert min(offered) < want, offered  # it was asked to send less, and did
    assert sum(offered) < 30 * want

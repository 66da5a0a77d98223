"""Helpers for the S13 socket tests: a real DiameterNode on a real TCP port, a Diameter peer
speaking through asyncio streams, and a small AVP parser written independently of the
production codec (so the tests do not check the codec with itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from eir_server.checker import EquipmentChecker
from eir_server.diameter.answers import Identity
from eir_server.diameter.codec import address_payload, avp, grouped_avp, str_avp, u32_avp
from eir_server.diameter.connection import PeerConfig
from eir_server.diameter.dedup import DuplicateCache
from eir_server.diameter.dictionary import Dictionary, load_dictionary
from eir_server.io.diameter_server import DiameterNode
from eir_server.policy import PolicyConfig, load_policy
from eir_server.policy.types import (
    BlacklistEntry,
    EquipmentStatus,
    ExceptionEntry,
    ImeiRecord,
    NotificationEntry,
)
from eir_server.store import MemoryStore

# --- wire constants, spelled out here rather than imported from the code under test ----------
R, P, E, T = 0x80, 0x40, 0x20, 0x10
CER, DWR, DPR, ECR = 257, 280, 282, 324
S13 = 16777252
V3GPP = 10415
SESSION_ID, ORIGIN_HOST, ORIGIN_REALM, DEST_HOST, DEST_REALM = 263, 264, 296, 293, 283
RESULT_CODE, FAILED_AVP, PROXY_INFO, PROXY_HOST, PROXY_STATE = 268, 279, 284, 280, 33
AUTH_SESSION_STATE, USER_NAME, ORIGIN_STATE_ID, ERROR_MESSAGE = 277, 1, 278, 281
EXPERIMENTAL_RESULT, EXPERIMENTAL_RESULT_CODE, VENDOR_ID = 297, 298, 266
AUTH_APP_ID, VSAI, HOST_IP, PRODUCT_NAME, DISCONNECT_CAUSE = 258, 260, 257, 269, 273
TERMINAL_INFORMATION, IMEI, SOFTWARE_VERSION, EQUIPMENT_STATUS = 1401, 1402, 1403, 1445

OUR_HOST = "eir.test.example"
OUR_REALM = "test.example"
PEER_HOST = "mme1.test.example"
PEER_REALM = "test.example"

# IMEIs (14 digits) the default store knows.
IMEI_BLACK = "35209900176148"
IMEI_GREY = "35209900176149"
IMEI_WHITE = "35209900176150"  # blacklisted, but paired with IMSI_PAIRED on the exception list
IMEI_UNKNOWN = "35209900176151"
IMSI_PAIRED = "001010123456789"

DICTIONARY: Dictionary = load_dictionary()


# ---------------------------------------------------------------------------------------------
# An independent view of a message: header fields plus AVPs parsed by a few lines of struct.


@dataclass
class Avp:
    code: int
    vendor: int
    flags: int
    value: bytes
    raw: bytes  # header + value + padding, as on the wire

    @property
    def u32(self) -> int:
        return int(struct.unpack("!I", self.value)[0])

    @property
    def text(self) -> str:
        return self.value.decode()

    @property
    def children(self) -> list[Avp]:
        return parse_avps(self.value)


def parse_avps(buf: bytes) -> list[Avp]:
    out = []
    pos = 0
    while pos < len(buf):
        code, fl = struct.unpack_from("!II", buf, pos)
        flags, length = fl >> 24, fl & 0xFFFFFF
        assert length >= 8, f"AVP {code} with length {length}"
        hlen = 12 if flags & 0x80 else 8
        vendor = struct.unpack_from("!I", buf, pos + 8)[0] if hlen == 12 else 0
        end = pos + length
        assert end <= len(buf), f"AVP {code} overruns its container"
        padded = (end + 3) & ~3
        out.append(Avp(code, vendor, flags, buf[pos + hlen:end], buf[pos:padded]))
        pos = padded
    assert pos == len(buf), "AVPs do not fill their container exactly"
    return out


@dataclass
class Msg:
    raw: bytes
    flags: int
    code: int
    app: int
    hbh: int
    e2e: int
    avps: list[Avp] = field(default_factory=list)

    @classmethod
    def parse(cls, raw: bytes, strict: bool = True) -> Msg:
        """strict=False reads requests we broke on purpose: trailing bytes are ignored."""
        vl, fc, app, hbh, e2e = struct.unpack_from("!IIIII", raw, 0)
        assert vl >> 24 == 1, "version must be 1"
        assert vl & 0xFFFFFF == len(raw), "Message-Length must match the bytes"
        body = raw[20:]
        if strict:
            assert len(raw) % 4 == 0
        else:
            body = body[:len(body) & ~3]
        return cls(raw, fc >> 24, fc & 0xFFFFFF, app, hbh, e2e, parse_avps(body))

    def all(self, code: int, vendor: int = 0) -> list[Avp]:
        return [a for a in self.avps if a.code == code and a.vendor == vendor]

    def get(self, code: int, vendor: int = 0) -> Avp | None:
        found = self.all(code, vendor)
        assert len(found) <= 1, f"AVP {code} appears {len(found)} times"
        return found[0] if found else None

    def one(self, code: int, vendor: int = 0) -> Avp:
        a = self.get(code, vendor)
        assert a is not None, f"AVP {code}/{vendor} missing from {self.summary()}"
        return a

    @property
    def result_code(self) -> int | None:
        a = self.get(RESULT_CODE)
        return a.u32 if a is not None else None

    @property
    def experimental_result(self) -> tuple[int, int] | None:
        a = self.get(EXPERIMENTAL_RESULT)
        if a is None:
            return None
        kids = {c.code: c.u32 for c in a.children}
        return kids[VENDOR_ID], kids[EXPERIMENTAL_RESULT_CODE]

    @property
    def equipment_status(self) -> int | None:
        a = self.get(EQUIPMENT_STATUS, V3GPP)
        return a.u32 if a is not None else None

    @property
    def failed_avp(self) -> list[Avp]:
        a = self.get(FAILED_AVP)
        return a.children if a is not None else []

    def summary(self) -> str:
        return (f"<cmd {self.code} app {self.app} flags {self.flags:#04x} "
                f"avps {[(a.code, a.vendor) for a in self.avps]}>")


# ---------------------------------------------------------------------------------------------
# Request builders


def split(data: bytes) -> list[Msg]:
    """Several messages read in one go, one Msg each."""
    out = []
    pos = 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 1:pos + 4], "big")
        out.append(Msg.parse(data[pos:pos + length]))
        pos += length
    return out


def header(flags: int, code: int, app: int, hbh: int, e2e: int, length: int,
           version: int = 1) -> bytes:
    return struct.pack("!IIIII", (version << 24) | length, (flags << 24) | code, app, hbh, e2e)


def build(flags: int, code: int, app: int, avps: Iterable[bytes], hbh: int = 1,
          e2e: int = 1) -> bytes:
    body = b"".join(avps)
    return header(flags, code, app, hbh, e2e, 20 + len(body)) + body


def raw_avp(code: int, flags: int, payload: bytes, vendor: int | None = None,
            length: int | None = None) -> bytes:
    """An AVP with exactly the flags (and optionally the length) given, padded to 4."""
    hlen = 12 if vendor is not None else 8
    n = hlen + len(payload) if length is None else length
    head = struct.pack("!II", code, (flags << 24) | n)
    if vendor is not None:
        head += struct.pack("!I", vendor)
    data = head + payload
    return data + b"\0" * (-len(data) % 4)


def cer(origin_host: str = PEER_HOST, hbh: int = 1, e2e: int = 1,
        apps: Iterable[bytes] | None = None) -> bytes:
    if apps is None:
        apps = [grouped_avp(VSAI, [u32_avp(VENDOR_ID, V3GPP), u32_avp(AUTH_APP_ID, S13)])]
    return build(R, CER, 0, [
        str_avp(ORIGIN_HOST, origin_host), str_avp(ORIGIN_REALM, PEER_REALM),
        avp(HOST_IP, address_payload("127.0.0.1")), u32_avp(VENDOR_ID, V3GPP),
        str_avp(PRODUCT_NAME, "test-mme", mandatory=False),
        u32_avp(ORIGIN_STATE_ID, 7), u32_avp(265, V3GPP), *apps,
    ], hbh, e2e)


def dwr(hbh: int = 1, e2e: int = 1) -> bytes:
    return build(R, DWR, 0, [str_avp(ORIGIN_HOST, PEER_HOST), str_avp(ORIGIN_REALM, PEER_REALM)],
                 hbh, e2e)


def dpr(cause: int = 0, hbh: int = 1, e2e: int = 1) -> bytes:
    return build(R, DPR, 0, [str_avp(ORIGIN_HOST, PEER_HOST), str_avp(ORIGIN_REALM, PEER_REALM),
                             u32_avp(DISCONNECT_CAUSE, cause)], hbh, e2e)


def answer_to(req: Msg, avps: Iterable[bytes], result: int = 2001) -> bytes:
    """Our (peer side) answer to a request the server sent (DWA, DPA)."""
    return build(req.flags & P, req.code, req.app,
                 [u32_avp(RESULT_CODE, result), str_avp(ORIGIN_HOST, PEER_HOST),
                  str_avp(ORIGIN_REALM, PEER_REALM), *avps], req.hbh, req.e2e)


def session_id(n: int) -> str:
    return f"{PEER_HOST};1700000000;{n}"


def terminal_information(imei: str | None, sv: str | None = "01") -> bytes:
    kids = []
    if imei is not None:
        kids.append(str_avp(IMEI, imei, V3GPP))
    if sv is not None:
        kids.append(str_avp(SOFTWARE_VERSION, sv, V3GPP))
    return grouped_avp(TERMINAL_INFORMATION, kids, V3GPP)


def proxy_info(host: str, state: bytes) -> bytes:
    return grouped_avp(PROXY_INFO, [str_avp(PROXY_HOST, host), avp(PROXY_STATE, state)])


def ecr_avps(imei: str | None = IMEI_UNKNOWN, n: int = 1, imsi: str | None = None,
             dest_realm: str | None = OUR_REALM, dest_host: str | None = None,
             proxies: Iterable[bytes] = (), extra: Iterable[bytes] = (),
             terminal: bytes | None = None) -> list[bytes]:
    """The AVPs of an ECR in TS 29.272 7.2.19 order; Proxy-Info last, `extra` before it."""
    parts = [str_avp(SESSION_ID, session_id(n)),
             grouped_avp(VSAI, [u32_avp(VENDOR_ID, V3GPP), u32_avp(AUTH_APP_ID, S13)]),
             u32_avp(AUTH_SESSION_STATE, 1),
             str_avp(ORIGIN_HOST, PEER_HOST), str_avp(ORIGIN_REALM, PEER_REALM)]
    if dest_host is not None:
        parts.append(str_avp(DEST_HOST, dest_host))
    if dest_realm is not None:
        parts.append(str_avp(DEST_REALM, dest_realm))
    parts.append(terminal if terminal is not None else terminal_information(imei))
    if imsi is not None:
        parts.append(str_avp(USER_NAME, imsi))
    parts.extend(extra)
    parts.extend(proxies)
    return parts


def ecr(imei: str | None = IMEI_UNKNOWN, n: int = 1, flags: int = R | P, **kw: Any) -> bytes:
    """An ECR whose hop-by-hop and end-to-end ids are both `n`."""
    return build(flags, ECR, S13, ecr_avps(imei, n, **kw), n, n)


# ---------------------------------------------------------------------------------------------
# Peer: one TCP connection, driven by the test


class Peer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.received: list[bytes] = []  # every message read, in order (for pcap/interop)

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1", **kw: Any) -> Peer:
        reader, writer = await asyncio.open_connection(host, port, **kw)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv_raw(self, timeout: float = 5.0) -> bytes:
        async def read() -> bytes:
            head = await self.reader.readexactly(20)
            length = struct.unpack_from("!I", head)[0] & 0xFFFFFF
            return head + await self.reader.readexactly(length - 20)

        raw = await asyncio.wait_for(read(), timeout)
        self.received.append(raw)
        return raw

    async def recv(self, timeout: float = 5.0) -> Msg:
        return Msg.parse(await self.recv_raw(timeout))

    async def request(self, data: bytes, timeout: float = 5.0) -> Msg:
        await self.send(data)
        return await self.recv(timeout)

    async def open(self, origin_host: str = PEER_HOST) -> Msg:
        cea = await self.request(cer(origin_host))
        assert cea.result_code == 2001, cea.summary()
        return cea

    async def expect_closed(self, timeout: float = 5.0) -> bytes:
        """Read until the server closes; returns whatever arrived before the EOF."""
        data = await asyncio.wait_for(self.reader.read(), timeout)
        return data

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


# ---------------------------------------------------------------------------------------------
# The server under test, in this process


def default_records() -> dict[str, ImeiRecord]:
    return {
        IMEI_BLACK: ImeiRecord(blacklist=BlacklistEntry("20000101", ("stolen",))),
        IMEI_GREY: ImeiRecord(notifications=(
            NotificationEntry("001019999999999", "15550001", "29991231", ("duplicate",)),)),
        IMEI_WHITE: ImeiRecord(blacklist=BlacklistEntry("20000101"),
                               exceptions=(ExceptionEntry(IMSI_PAIRED),)),
    }


def peer_config(**kw: Any) -> PeerConfig:
    kw.setdefault("identity", Identity(OUR_HOST, OUR_REALM, 1234))
    return PeerConfig(**kw)


@dataclass
class Server:
    node: DiameterNode
    server: asyncio.base_events.Server
    store: MemoryStore
    port: int

    async def peer(self, open_: bool = True) -> Peer:
        p = await Peer.connect(self.port)
        if open_:
            await p.open()
        return p


class ManualClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def start_server(config: PeerConfig | None = None,
                       policy: PolicyConfig | None = None,
                       records: dict[str, ImeiRecord] | None = None,
                       clock: Callable[[], float] | None = None,
                       dedup: DuplicateCache | None = None,
                       store: MemoryStore | None = None) -> Server:
    store = store if store is not None else MemoryStore()
    for k, v in (default_records() if records is None else records).items():
        store.put(k, v)
    await store.start()
    pol = load_policy(policy if policy is not None else PolicyConfig(unknown_equipment=None))
    checker = EquipmentChecker(pol, store, today=lambda: "20250601")
    kw: dict[str, Any] = {} if clock is None else {"clock": clock}
    node = DiameterNode(config or peer_config(), DICTIONARY, checker, None, dedup, **kw)
    srv = await node.start("127.0.0.1", 0)
    return Server(node, srv, store, srv.sockets[0].getsockname()[1])


def pytest_asyncio_loop_factories(config: pytest.Config,
                                  item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """Every async test here runs on the stdlib loop and on uvloop (what `serve` uses), except
    in modules that only drive a server process (`ONE_LOOP = True`)."""
    if getattr(getattr(item, "module", None), "ONE_LOOP", False):
        return {"asyncio": asyncio.SelectorEventLoop}
    import uvloop
    return {"asyncio": asyncio.SelectorEventLoop, "uvloop": uvloop.new_event_loop}


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., Any]]:
    """`await servers(**start_server kwargs)`: a node on a free port, stopped after the test."""
    started: list[Server] = []

    async def factory(**kw: Any) -> Server:
        s = await start_server(**kw)
        started.append(s)
        return s

    yield factory
    for s in started:
        for p in list(s.node.protocols):
            p.abort("test over")
        await s.node.shutdown(0.2)


@pytest.fixture
async def server(servers: Callable[..., Any]) -> Server:
    srv: Server = await servers()
    return srv


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Exceptions the event loop would only have logged (e.g. raised in data_received)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    yield errors
    loop.set_exception_handler(old)


# ---------------------------------------------------------------------------------------------
# A real `eir-server serve` process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    def __init__(self, tmp: Path, *args: str) -> None:
        self.port = free_port()
        self.log = tmp / "serve.log"
        exe = Path(sys.executable).with_name("eir-server")
        cmd = [str(exe), "serve", "--diameter-listen", f"127.0.0.1:{self.port}",
               "--metrics-listen", "", "--origin-host", OUR_HOST, "--origin-realm", OUR_REALM,
               "--log-format", "json", *args]
        self._logf = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"eir-server exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"eir-server did not listen: {self.log.read_text()}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._logf.close()


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    procs: list[ServeProcess] = []

    def start(*args: str) -> ServeProcess:
        p = ServeProcess(tmp_path, *args)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()


STATUS = EquipmentStatus

"""Our answers, captured from real sockets, read by two independent Diameter implementations:
python-diameter (a Python codec with its own S13 command definitions) and Wireshark's dissector
(through tshark). Both must decode every CEA/ECA/DWA/DPA and error answer cleanly and see the
values we meant to send."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from diameter.message import Message as RefMessage
from diameter.message.commands import (
    CapabilitiesExchangeAnswer,
    DeviceWatchdogAnswer,
    DisconnectPeerAnswer,
    MeIdentityCheckAnswer,
)

from eir_server.diameter.codec import grouped_avp, u32_avp

from .conftest import (
    AUTH_APP_ID,
    AUTH_SESSION_STATE,
    ECR,
    ERROR_MESSAGE,
    IMEI_BLACK,
    IMEI_GREY,
    IMEI_UNKNOWN,
    IMEI_WHITE,
    IMSI_PAIRED,
    ORIGIN_HOST,
    ORIGIN_REALM,
    OUR_HOST,
    S13,
    SESSION_ID,
    TERMINAL_INFORMATION,
    V3GPP,
    VENDOR_ID,
    VSAI,
    E,
    Msg,
    P,
    Peer,
    R,
    Server,
    build,
    cer,
    dpr,
    dwr,
    ecr,
    ecr_avps,
    header,
    proxy_info,
    raw_avp,
    str_avp,
    terminal_information,
)

TSHARK = shutil.which("tshark") or "/usr/bin/tshark"
PROXIES = [proxy_info("dra1.test.example", b"one"), proxy_info("dra2.test.example", b"two")]


@dataclass
class Case:
    name: str
    request: bytes
    answer: bytes
    code: int  # command code
    result: int | None  # Result-Code, None when Experimental-Result
    experimental: int | None = None
    status: int | None = None  # Equipment-Status


def _without(avps: list[bytes], code: int) -> list[bytes]:
    return [a for a in avps if int.from_bytes(a[:4], "big") != code]


def _bad_length_ecr(n: int) -> bytes:
    body = b"".join(ecr_avps(n=n)) + b"\0\0"
    return header(R | P, ECR, S13, n, n, 20 + len(body)) + body


ECR_CASES: list[tuple[str, bytes, int | None, int | None, int | None]] = [
    # name, request, Result-Code, Experimental-Result-Code, Equipment-Status
    ("whitelisted", ecr(IMEI_WHITE, n=101, imsi=IMSI_PAIRED, proxies=PROXIES), 2001, None, 0),
    ("blacklisted", ecr(IMEI_BLACK, n=102), 2001, None, 1),
    ("greylisted", ecr(IMEI_GREY, n=103, proxies=PROXIES), 2001, None, 2),
    ("unknown", ecr(IMEI_UNKNOWN, n=104, proxies=PROXIES), None, 5422, None),
    ("3001", build(R | P, 999, S13, ecr_avps(n=105), 105, 105), 3001, None, None),
    ("3002", ecr(n=106, dest_host="elsewhere.test.example"), 3002, None, None),
    ("3003", ecr(n=107, dest_realm="elsewhere.example", proxies=PROXIES), 3003, None, None),
    ("3007", build(R | P, 316, 16777251, ecr_avps(n=108), 108, 108), 3007, None, None),
    ("3008", ecr(n=109, flags=R | P | E), 3008, None, None),
    ("3009", build(R | P, ECR, S13, ecr_avps(n=110, extra=[raw_avp(1, 0x41, b"0010101")]),
                   110, 110), 3009, None, None),
    ("5001", build(R | P, ECR, S13, ecr_avps(n=111, extra=[raw_avp(99999, 0x40, b"abcd")]),
                   111, 111), 5001, None, None),
    ("5004", build(R | P, ECR, S13, _without(ecr_avps(n=112), AUTH_SESSION_STATE)
                   + [u32_avp(AUTH_SESSION_STATE, 9)], 112, 112), 5004, None, None),
    ("5005 missing AVP", build(R | P, ECR, S13, _without(ecr_avps(n=113), ORIGIN_REALM), 113,
                               113), 5005, None, None),
    ("5005 no IMEI", ecr(n=114, terminal=terminal_information(None), proxies=PROXIES), 5005,
     None, None),
    ("5008", build(R | P, ECR, S13, ecr_avps(n=115)[1:] + ecr_avps(n=115)[:1], 115, 115), 5008,
     None, None),
    ("5009", build(R | P, ECR, S13, ecr_avps(n=116, extra=[str_avp(ORIGIN_HOST, "x.example")]),
                   116, 116), 5009, None, None),
    ("5014", build(R | P, ECR, S13, _without(ecr_avps(n=117), AUTH_SESSION_STATE)
                   + [raw_avp(AUTH_SESSION_STATE, 0x40, b"\0\0\0\1\0", length=13)], 117, 117),
     5014, None, None),
    ("5015", _bad_length_ecr(118), 5015, None, None),
]


async def collect(server: Server) -> list[Case]:
    cases: list[Case] = []
    p = await Peer.connect(server.port)
    req = cer()
    cases.append(Case("CEA 2001", req, await p.send(req) or await p.recv_raw(), 257, 2001))
    for name, req, result, exp, status in ECR_CASES:
        await p.send(req)
        cases.append(Case(name, req, await p.recv_raw(), int.from_bytes(req[5:8], "big"), result,
                          exp, status))
    req = dwr(hbh=200, e2e=200)
    cases.append(Case("DWA", req, await p.send(req) or await p.recv_raw(), 280, 2001))
    req = dpr(hbh=201, e2e=201)
    cases.append(Case("DPA", req, await p.send(req) or await p.recv_raw(), 282, 2001))
    assert await p.expect_closed() == b""

    s6a_only = [grouped_avp(VSAI, [u32_avp(VENDOR_ID, V3GPP), u32_avp(AUTH_APP_ID, 16777251)])]
    q = await Peer.connect(server.port)
    req = cer(apps=s6a_only, hbh=300, e2e=300)
    cases.append(Case("CEA 5010", req, await q.send(req) or await q.recv_raw(), 257, 5010))
    q.close()
    r = await Peer.connect(server.port)
    req = ecr(IMEI_BLACK, n=301, proxies=PROXIES)
    cases.append(Case("3010 before CER", req, await r.send(req) or await r.recv_raw(), ECR, 3010))
    r.close()
    return cases


# ---------------------------------------------------------------------------------------------
# python-diameter


async def test_python_diameter_decodes_every_answer(server: Server) -> None:
    cases = await collect(server)
    for c in cases:
        ref = RefMessage.from_bytes(c.answer)
        h = ref.header
        req = Msg.parse(c.request, strict=False)
        assert not h.is_request, c.name
        assert (h.command_code, h.application_id) == (req.code, req.app), c.name
        assert (h.hop_by_hop_identifier, h.end_to_end_identifier) == (req.hbh, req.e2e), c.name
        assert h.length == len(c.answer)
        assert h.is_error == (c.result is not None and 3000 <= c.result < 4000), c.name
        assert h.is_proxyable == bool(req.flags & P), c.name
        # Each AVP re-encodes to the bytes we sent: the reference read every header and value.
        plain = RefMessage.from_bytes(c.answer, plain_msg=True)
        assert b"".join(a.as_bytes() for a in plain.avps) == c.answer[20:], c.name
        assert ref.avps[0].code == (SESSION_ID if c.code == ECR else ref.avps[0].code)
        if c.code == ECR:
            assert isinstance(ref, MeIdentityCheckAnswer), c.name
            assert ref.session_id == req.one(SESSION_ID).text
            assert ref.origin_host == OUR_HOST.encode()
            assert ref.result_code == c.result, c.name
            if c.experimental is not None:
                er = ref.experimental_result
                assert (er.vendor_id, er.experimental_result_code) == (V3GPP, c.experimental)
            else:
                assert ref.experimental_result is None, c.name
            assert ref.equipment_status == c.status, c.name
            if not 3000 <= (c.result or 0) < 4000:
                assert ref.auth_session_state == 1, c.name
            assert [(pi.proxy_host, pi.proxy_state) for pi in ref.proxy_info] == \
                [(a.children[0].value, a.children[1].value) for a in req.all(284)], c.name
            if c.result is not None and c.result >= 5000 and c.result != 5015:
                assert ref.failed_avp, c.name
                assert ref.failed_avp[0].additional_avps, c.name
        elif c.code == 257:
            assert isinstance(ref, CapabilitiesExchangeAnswer)
            assert ref.result_code == c.result and ref.origin_host == OUR_HOST.encode()
            assert ref.origin_state_id == 1234
            assert ref.host_ip_address and ref.vendor_id == 0
            assert ref.product_name == "eir-server"
            if c.result == 2001:
                vsai = ref.vendor_specific_application_id[0]
                assert (vsai.vendor_id, vsai.auth_application_id) == (V3GPP, S13)
        elif c.code == 280:
            assert isinstance(ref, DeviceWatchdogAnswer) and ref.result_code == 2001
        elif c.code == 282:
            assert isinstance(ref, DisconnectPeerAnswer) and ref.result_code == 2001
    assert {c.name for c in cases} >= {"whitelisted", "unknown", "5014", "CEA 5010"}
    assert TERMINAL_INFORMATION and ERROR_MESSAGE and ORIGIN_REALM


# ---------------------------------------------------------------------------------------------
# tshark


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


class Pcap:
    """Ethernet/IPv4/TCP frames of a few TCP conversations, with valid checksums."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.ts = 1_700_000_000

    def _frame(self, src: tuple[str, int], dst: tuple[str, int], seq: int, ack: int, flags: int,
               payload: bytes) -> None:
        sip = bytes(int(x) for x in src[0].split("."))
        dip = bytes(int(x) for x in dst[0].split("."))
        tcp = struct.pack("!HHIIBBHHH", src[1], dst[1], seq, ack, 5 << 4, flags, 65535, 0, 0)
        pseudo = sip + dip + struct.pack("!BBH", 0, 6, len(tcp) + len(payload))
        c = _csum(pseudo + tcp + payload)
        tcp = tcp[:16] + struct.pack("!H", c) + tcp[18:]
        total = 20 + len(tcp) + len(payload)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, len(self.frames) & 0xFFFF, 0x4000, 64,
                         6, 0, sip, dip)
        ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
        eth = b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01" + b"\x08\x00"
        self.frames.append(eth + ip + tcp + payload)

    def conversation(self, client_port: int, messages: list[tuple[bool, bytes]]) -> None:
        """messages: (from_server, bytes) in order; each message is one segment."""
        cli, srv = ("10.0.0.1", client_port), ("10.0.0.2", 3868)
        cseq, sseq = 1000, 5000
        self._frame(cli, srv, cseq, 0, 0x02, b"")
        self._frame(srv, cli, sseq, cseq + 1, 0x12, b"")
        cseq, sseq = cseq + 1, sseq + 1
        self._frame(cli, srv, cseq, sseq, 0x10, b"")
        for from_server, data in messages:
            if from_server:
                self._frame(srv, cli, sseq, cseq, 0x18, data)
                sseq += len(data)
            else:
                self._frame(cli, srv, cseq, sseq, 0x18, data)
                cseq += len(data)

    def write(self, path: Path) -> None:
        out = [struct.pack("!IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)]
        for i, f in enumerate(self.frames):
            out.append(struct.pack("!IIII", self.ts + i, 0, len(f), len(f)) + f)
        path.write_bytes(b"".join(out))


def tshark(path: Path, *args: str) -> str:
    if not Path(TSHARK).exists():
        pytest.fail("tshark is required for the interop tests (apt-get install tshark)")
    res = subprocess.run([TSHARK, "-n", "-r", str(path), "-o", "tcp.check_checksum:TRUE",
                          "-d", "tcp.port==3868,diameter", *args],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


# The Failed-AVP of these answers carries the offending AVP as received (RFC 6733 7.5), or a
# zero-filled example of a missing one (7.1.5), which Wireshark points out.
EXPECTED_WARNINGS = {
    "3001": {"Unknown command, if you know what this is you can add it to dictionary.xml"},
    "3009": {"Reserved bit set"},
    "5001": {"Unknown AVP 99999 (vendor=Reserved), if you know what this is you can add it to "
             "dictionary.xml"},
    "5005 missing AVP": {"Data is empty"},
    "5005 no IMEI": {"Data is empty"},
    "5014": {"Bad Integer32 Length (5)"},
}


async def test_tshark_dissects_every_answer_cleanly(server: Server, tmp_path: Path) -> None:
    cases = await collect(server)
    pcap = Pcap()
    # One conversation per case: answers to malformed requests reach the dissector without
    # their (deliberately broken) requests; well-formed requests go along so answers are matched.
    for i, c in enumerate(cases):
        clean_request = c.result in (2001, None, 3002, 3003, 5010) or c.name == "3010 before CER"
        msgs = ([(False, c.request)] if clean_request else []) + [(True, c.answer)]
        pcap.conversation(40000 + i, msgs)
    path = tmp_path / "answers.pcap"
    pcap.write(path)

    verbose = tshark(path, "-V", "-Y", "diameter && tcp.srcport == 3868")
    frames = re.split(r"\n(?=Frame \d+:)", verbose.strip())
    assert len(frames) == len(cases)
    for c, text in zip(cases, frames, strict=True):
        assert text.count("Diameter Protocol") == 1, c.name
        assert "Malformed Packet" not in text, (c.name, text)
        assert "Expert Info (Error" not in text, (c.name, text)
        assert "[incorrect" not in text and "Bad checksum" not in text, c.name
        # Warnings only where the answer must echo what the peer got wrong (Failed-AVP) or
        # where the command itself is unknown to everyone (3001).
        warnings = re.findall(r"Expert Info \(Warning/[^)]*\): ([^\]]*)", text)
        assert set(warnings) <= EXPECTED_WARNINGS.get(c.name, set()), (c.name, warnings)

    rows = tshark(path, "-Y", "diameter && tcp.srcport == 3868", "-T", "fields", "-E",
                  "separator=|", "-e", "diameter.hopbyhopid", "-e", "diameter.cmd.code",
                  "-e", "diameter.flags.error", "-e", "diameter.Result-Code",
                  "-e", "diameter.Experimental-Result-Code", "-e", "diameter.Equipment-Status",
                  "-e", "diameter.Session-Id", "-e", "diameter.Origin-Host")
    lines = [line.split("|") for line in rows.strip().splitlines()]
    assert len(lines) == len(cases)
    for c, (hbh, code, err, rc, erc, status, sid, host) in zip(cases, lines, strict=True):
        req = Msg.parse(c.request, strict=False)
        assert int(hbh, 0) == req.hbh, c.name
        assert int(code) == c.code, c.name
        assert err in ("True", "1") if (c.result or 0) // 1000 == 3 else err in ("False", "0"), \
            (c.name, err)
        # Result-Code can also appear inside Failed-AVP (never here): take the first value.
        assert (int(rc.split(",")[0]) if rc else None) == c.result, (c.name, rc)
        assert (int(erc) if erc else None) == c.experimental, (c.name, erc)
        assert (int(status) if status else None) == c.status, (c.name, status)
        if c.code == ECR:
            assert sid.split(",")[0] == req.one(SESSION_ID).text, c.name  # 5008: + Failed-AVP
        assert host.split(",")[0] == OUR_HOST, c.name

"""N5g-eir over real HTTP/2 (h2c prior knowledge, TLS, HTTP/1.1) from real clients: httpx (h2)
and curl. Every status the interface answers has a case here or in test_overload_http.py."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import pytest

from eir_server.n5g_eir.h2conn import PREFACE
from tests.diameter_io.conftest import IMEI_BLACK, IMEI_GREY, IMEI_UNKNOWN, IMEI_WHITE, IMSI_PAIRED
from tests.n5g_eir.conftest import PATH, H2Client

CURL = shutil.which("curl") or "/usr/bin/curl"


def pei(imei14: str) -> str:
    from eir_server.policy.imei import luhn_check_digit
    return f"imei-{imei14}{luhn_check_digit(imei14)}"


async def curl(*args: str) -> tuple[int, dict[str, str], str]:
    """(status, headers, body) from curl; -w prints the HTTP version after the body."""
    p = await asyncio.create_subprocess_exec(
        CURL, "-s", "-S", "-i", "--max-time", "10", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await p.communicate()
    assert p.returncode == 0, err.decode()
    head, _, body = out.decode().partition("\r\n\r\n")
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


async def test_verdicts_over_h2c_prior_knowledge(eirs) -> None:
    eir = await eirs()
    async with eir.h2c() as c:
        expect = {IMEI_BLACK: "BLACKLISTED", IMEI_GREY: "GREYLISTED", IMEI_WHITE: "BLACKLISTED"}
        for imei, status in expect.items():
            r = await c.get(PATH, params={"pei": pei(imei)})
            assert r.http_version == "HTTP/2"
            assert (r.status_code, r.json()) == (200, {"status": status})
            assert r.headers["content-type"] == "application/json"
        # The blacklisted IMEI paired with its IMSI on the exception list: SUPI pairs like S13's
        # User-Name does.
        r = await c.get(PATH, params={"pei": pei(IMEI_WHITE), "supi": f"imsi-{IMSI_PAIRED}",
                                      "gpsi": "msisdn-4915100000001"})
        assert r.json() == {"status": "WHITELISTED"}
        r = await c.get(PATH, params={"pei": f"imeisv-{IMEI_BLACK}01"})
        assert r.json() == {"status": "BLACKLISTED"}
        r = await c.get(PATH, params={"pei": pei(IMEI_UNKNOWN)})
        assert r.status_code == 404
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json() == {"status": 404, "title": "Not Found",
                            "cause": "ERROR_EQUIPMENT_UNKNOWN",
                            "detail": "the equipment is not known to the EIR"}
    m = eir.metrics
    assert m.requests[("n5g_eir", "GET", "200")] == 5
    assert m.requests[("n5g_eir", "GET", "404")] == 1
    assert sum(m.latency_n5g.counts) == 6


async def test_every_error_status_with_curl_h2c(eirs) -> None:
    eir = await eirs()
    url = eir.base + PATH
    h2 = "--http2-prior-knowledge"
    s, h, b = await curl(h2, url + "?supi=imsi-001010123456789")
    assert (s, json.loads(b)["cause"]) == (400, "MANDATORY_QUERY_PARAM_MISSING")
    assert h["content-type"] == "application/problem+json"
    s, _, b = await curl(h2, url + "?pei=imei-12")
    assert (s, json.loads(b)["cause"]) == (400, "MANDATORY_QUERY_PARAM_INCORRECT")
    assert json.loads(b)["invalidParams"][0]["param"] == "query pei"
    s, _, b = await curl(h2, url + f"?pei={pei(IMEI_BLACK)}&supi=imsi-x")
    assert (s, json.loads(b)["cause"]) == (400, "OPTIONAL_QUERY_PARAM_INCORRECT")
    s, _, b = await curl(h2, eir.base + "/n5g-eir-eic/v1/nothing-here")
    assert (s, json.loads(b)["cause"]) == (404, "RESOURCE_URI_STRUCTURE_NOT_FOUND")
    s, h, _ = await curl(h2, "-X", "DELETE", url + f"?pei={pei(IMEI_BLACK)}")
    assert (s, h["allow"]) == (405, "GET")
    s, _, _ = await curl(h2, "-H", "Accept: text/html", url + f"?pei={pei(IMEI_BLACK)}")
    assert s == 406
    s, _, _ = await curl(h2, url + "?pei=imei-" + "1" * 6000)
    assert s == 414
    s, _, b = await curl(h2, url + "?pei=mac-00-11-22-33-44-55")
    assert (s, json.loads(b)["cause"]) == (404, "ERROR_EQUIPMENT_UNKNOWN")
    s, h, b = await curl(h2, "-D", "-", url + f"?pei={pei(IMEI_GREY)}")
    assert (s, json.loads(b)) == (200, {"status": "GREYLISTED"})
    assert eir.metrics.requests[("n5g_eir", "GET", "400")] == 3
    assert eir.metrics.requests[("n5g_eir", "other", "405")] == 1


async def test_http1_is_tolerated(eirs) -> None:
    eir = await eirs()
    s, _, b = await curl("--http1.1", eir.base + PATH + f"?pei={pei(IMEI_BLACK)}")
    assert (s, json.loads(b)) == (200, {"status": "BLACKLISTED"})
    async with httpx.AsyncClient(base_url=eir.base) as c:  # HTTP/1.1 keep-alive
        for _ in range(3):
            r = await c.get(PATH, params={"pei": pei(IMEI_GREY)})
            assert r.http_version == "HTTP/1.1" and r.json() == {"status": "GREYLISTED"}


async def test_long_lived_connection_is_not_cut(eirs) -> None:
    """hypercorn sends GOAWAY after 1000 requests by default; an AMF's connection must stay up
    through many requests and idle gaps."""
    eir = await eirs()
    client = H2Client(eir.http_port)
    try:
        path = f"{PATH}?pei={pei(IMEI_BLACK)}"
        for _ in range(5):
            answers = await asyncio.to_thread(client.get_many, [path] * 500)
            assert {a[0] for a in answers} == {200}
        await asyncio.sleep(2.5)  # idle longer than any short keep-alive timeout
        answers = await asyncio.to_thread(client.get_many, [path])
        assert answers == [(200, b'{"status":"BLACKLISTED"}')]
        assert not client.goaway
    finally:
        client.close()
    assert eir.metrics.requests[("n5g_eir", "GET", "200")] == 2501


async def test_internal_error_leaks_nothing(eirs) -> None:
    eir = await eirs()

    class BrokenPolicy:  # a bug in the policy, as the worker would meet it
        def __getattr__(self, name):
            raise RuntimeError("secret internal state 0xdeadbeef")

    eir.node.service.checker.policy = BrokenPolicy()
    async with eir.h2c() as c:
        r = await c.get(PATH, params={"pei": pei(IMEI_BLACK)})
    assert r.status_code == 500
    assert r.json() == {"status": 500, "title": "Internal Server Error", "cause": "SYSTEM_FAILURE"}
    assert "deadbeef" not in r.text


@pytest.mark.parametrize("path", ["/openapi/TS29511_N5g-eir_EquipmentIdentityCheck.yaml",
                                  "/openapi/TS29571_CommonData.yaml"])
async def test_openapi_document_is_served(eirs, path: str) -> None:
    eir = await eirs()
    s, h, b = await curl("--http2-prior-knowledge", eir.base + path)
    assert s == 200 and h["content-type"] == "application/yaml" and b.startswith("openapi:")



async def test_protocol_errors_are_answered_counted_and_the_server_lives_on(eirs) -> None:
    """What a broken or hostile consumer gets on the wire: GOAWAY with the RFC 9113 code for a
    connection error, RST_STREAM for a malformed request (the connection stays), 400 for
    unparsable HTTP/1.1; each counted by kind. A healthy client is served throughout."""
    import struct

    import hpack

    eir = await eirs()

    async def exchange(data: bytes) -> bytes:
        r, w = await asyncio.open_connection("127.0.0.1", eir.http_port)
        w.write(data)
        out = b""
        try:
            while True:
                chunk = await asyncio.wait_for(r.read(65536), 1.0)
                if not chunk:
                    break
                out += chunk
        except TimeoutError:
            pass
        w.close()
        return out

    def frames(data: bytes) -> list[tuple[int, int, bytes]]:
        out, i = [], 0
        while i + 9 <= len(data):
            n = int.from_bytes(data[i:i + 3], "big")
            out.append((data[i + 3], int.from_bytes(data[i + 5:i + 9], "big") & 0x7FFFFFFF,
                        data[i + 9:i + 9 + n]))
            i += 9 + n
        return out

    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    block = hpack.Encoder().encode([(":method", "GET"), (":scheme", "http"), (":path", "/x"),
                                    ("Bad-Case", "1")])
    got = frames(await exchange(
        preface + struct.pack(">BHBBL", 0, len(block), 1, 5, 1) + block
        + b"\x00\x00\x05\x01\x05\x00\x00\x00\x03\xff\xff\xff\xff\xff"))
    rst = [f for f in got if f[0] == 3]
    goaway = [f for f in got if f[0] == 7]
    assert [(sid, struct.unpack(">L", p)[0]) for _, sid, p in rst] == [(1, 1)]  # PROTOCOL
    # the last stream acted on is 1: stream 3 was never processed
    assert len(goaway) == 1 and struct.unpack(">LL", goaway[0][2][:8]) == (1, 9)  # COMPRESSION
    assert (await exchange(b"NOT HTTP AT ALL\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    async with eir.h2c() as c:
        r = await c.get(PATH, params={"pei": pei(IMEI_BLACK)})
        assert r.json() == {"status": "BLACKLISTED"}
    assert dict(eir.metrics.http_errors) == {
        "h2_stream_error": 1, "h2_compression_error": 1, "http1_bad_request": 1}


async def test_connection_limits_and_the_first_request_deadline(eirs) -> None:
    """Per consumer address, at most N connections; one that sends neither an HTTP/2 preface
    nor an HTTP/1.1 request in time is closed; an idle HTTP/2 connection past its SETTINGS
    stays (AMFs keep connections open between requests)."""
    from eir_server.io.http_server import Limits

    eir = await eirs(http_limits=Limits(max_connections=100, max_per_source=2,
                                        first_request_timeout=0.3))
    loop = asyncio.get_running_loop()

    async def closed_within(r: asyncio.StreamReader, seconds: float) -> bool:
        try:
            return await asyncio.wait_for(r.read(65536), seconds) == b""
        except TimeoutError:
            return False

    r1, w1 = await asyncio.open_connection("127.0.0.1", eir.http_port)
    w1.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    r2, w2 = await asyncio.open_connection("127.0.0.1", eir.http_port)  # says nothing
    r3, w3 = await asyncio.open_connection("127.0.0.1", eir.http_port)  # one too many
    assert await closed_within(r3, 1.0)
    t0 = loop.time()
    assert await closed_within(r2, 2.0) and loop.time() - t0 < 1.5
    await asyncio.sleep(0.3)
    w1.write(b"\x00\x00\x08\x06\x00\x00\x00\x00\x0012345678")  # PING: still served
    seen = b""
    while b"12345678" not in seen:
        chunk = await asyncio.wait_for(r1.read(65536), 2.0)
        assert chunk, "the idle HTTP/2 connection was closed"
        seen += chunk
    for w in (w1, w2, w3):
        w.close()
    errors = eir.metrics.http_errors
    assert errors["connection_refused"] == 1 and errors["first_request_timeout"] == 1


async def test_head_has_no_content_and_methods_are_bounded_labels(eirs) -> None:
    eir = await eirs()
    url = eir.base + PATH + f"?pei={pei(IMEI_BLACK)}"
    for version in ("--http2-prior-knowledge", "--http1.1"):
        s, h, b = await curl(version, "-I", url)  # curl fails on content after HEAD
        assert (s, h["allow"], b) == (405, "GET", "")
    for method in ("BREW", "XYZZY"):
        s, _, _ = await curl("--http2-prior-knowledge", "-X", method, eir.base + "/nothing")
        assert s == 404
    assert eir.metrics.requests[("n5g_eir", "other", "404")] == 2
    assert not any(c in ("BREW", "XYZZY") for _, c, _ in eir.metrics.requests)


async def test_http1_expect_100_continue_and_absolute_form(eirs) -> None:
    eir = await eirs()
    host = eir.base.split("://")[1]
    target = PATH + f"?pei={pei(IMEI_BLACK)}"
    reader, writer = await asyncio.open_connection(*host.rsplit(":", 1))
    # RFC 9110 10.1.1: the interim answer comes before the body is sent (a client that honours
    # the expectation would otherwise wait its whole timeout)
    writer.write(f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n"
                 "Expect: 100-continue\r\n\r\n".encode())
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert interim.startswith(b"HTTP/1.1 100 ")
    writer.write(b"hello")
    final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert final.startswith(b"HTTP/1.1 405 ")
    writer.close()
    # RFC 9112 3.2.2: the absolute form is accepted
    reader, writer = await asyncio.open_connection(*host.rsplit(":", 1))
    writer.write(f"GET {eir.base}{target} HTTP/1.1\r\nHost: {host}\r\n"
                 "Connection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert data.startswith(b"HTTP/1.1 200") and b"BLACKLISTED" in data


async def test_a_header_list_over_the_limit_is_431_and_the_connection_serves_on(eirs) -> None:
    # RFC 9113 10.5.1: the oversized request alone is refused; other streams of the connection
    # (an SCP's other consumers) are answered
    eir = await eirs()
    async with eir.h2c() as c:
        big = await c.get(PATH, params={"pei": pei(IMEI_BLACK)}, headers={"x-big": "v" * 20000})
        assert big.http_version == "HTTP/2" and big.status_code == 431
        assert big.headers["content-type"] == "application/problem+json"
        r = await c.get(PATH, params={"pei": pei(IMEI_BLACK)})
        assert (r.status_code, r.json()) == (200, {"status": "BLACKLISTED"})
    assert eir.metrics.http_errors["h2_stream_error"] >= 1


async def test_a_first_read_of_one_byte_does_not_decide_the_protocol(eirs) -> None:
    # "P" begins the HTTP/2 preface and POST/PUT/PATCH alike: an HTTP/1.1 client whose first
    # segment is that one byte still gets HTTP/1.1, and an h2c client splitting its preface
    # there still gets HTTP/2
    eir = await eirs()
    host, port = eir.base.split("://")[1].rsplit(":", 1)
    target = PATH + f"?pei={pei(IMEI_BLACK)}"
    for first, rest, expect in (
            (b"P", f"OST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode(),
             b"HTTP/1.1 405 "),
            (b"PR", PREFACE[2:] + b"\0\0\0\x04\0\0\0\0\0", b"\0\0\x12\x04")):  # SETTINGS
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(first)
        await writer.drain()
        await asyncio.sleep(0.1)  # its own segment and read
        writer.write(rest)
        got = await asyncio.wait_for(reader.readexactly(len(expect)), 10)
        writer.close()
        assert got == expect, (first, got)

"""HTTPS register sources against a real TLS server (http.server + ssl in a thread) whose
certificates come from a throwaway CA made with the openssl CLI: a full sync trusting the
private CA with --ca-file, conditional GETs (304) on the next run, and certificates that do not
verify -> exit 4 with an actionable error while the previous version keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import json
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import structlog

from eir_server.cli import main
from eir_server.store import open_store
from eir_server.sync.source import HttpSource, SourceError, tls_context
from tests.sync.test_http_source import Handler

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
A, B, C = "35000000000001", "35000000000002", "35000000000003"
TAC = b"TAC|Manufacturer|Model_Name|Bands|Allocation_Date\r\n35209900|Acme|P1|LTE|01-Jan-2020\r\n"


@dataclass(frozen=True)
class Pki:
    ca: Path  # the register's private CA
    other_ca: Path  # an unrelated CA
    server: tuple[Path, Path]  # cert, key for 127.0.0.1 / localhost, issued by `ca`
    wrong_name: tuple[Path, Path]  # issued by `ca`, but for register.example only


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"openssl {' '.join(args)}: {r.stderr}"


def _make_ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _issue(d: Path, ca: str, name: str, san: str) -> tuple[Path, Path]:
    (d / f"{name}.ext").write_text(
        f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
        cwd=d,
    )  # fmt: skip
    return d / f"{name}.pem", d / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if not Path(OPENSSL).exists():
        pytest.fail("the openssl CLI is needed to make the test CA")
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "register-ca")
    _make_ca(d, "other-ca")
    return Pki(
        ca=d / "register-ca.pem",
        other_ca=d / "other-ca.pem",
        server=_issue(d, "register-ca", "server", "IP:127.0.0.1,DNS:localhost"),
        wrong_name=_issue(d, "register-ca", "wrong-name", "DNS:register.example"),
    )


@pytest.fixture
def www(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    Handler.hits = {}
    Handler.answers = []
    Handler.truncate = set()
    return root


@pytest.fixture
def https(www: Path) -> Iterator[Callable[[tuple[Path, Path]], str]]:
    """https(cert_and_key) -> URL of a TLS autoindex server over `www` presenting that cert."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(cert: tuple[Path, Path]) -> str:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*cert)
        srv = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(www))
        )
        # Handshake on accept: a client refusing the certificate just drops that connection.
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"https://127.0.0.1:{srv.server_address[1]}/"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def sync_argv(url: str, store: str, cache: Path, *extra: str) -> list[str]:
    return [
        "sync", "--source", url, "--store", store, "--cache-dir", str(cache),
        "--grace", "0", "--progress", "never", "--http-timeout", "5", *extra,
    ]  # fmt: skip


def served_version(store_url: str) -> tuple[str | None, dict[str, object]]:
    with contextlib.closing(redis.Redis.from_url(store_url, decode_responses=True)) as c:
        runs = c.lrange("eir:runs", 0, 0)
        return c.get("eir:cur"), json.loads(runs[0]) if runs else {}


def blacklisted(store_url: str, imeis: list[str]) -> list[bool]:
    """What a serving node answers now (fresh store, so from Redis): on the blacklist or not."""

    async def ask() -> list[bool]:
        s = open_store(store_url)
        await s.start()
        try:
            assert s.ready
            got = await asyncio.gather(*(s.fetch(i) for i in imeis))
            return [r is not None and r.blacklist is not None for r in got]
        finally:
            await s.close()

    return asyncio.run(ask())


def test_full_sync_over_https_with_private_ca_then_304_noop(
    pki: Pki, https, www: Path, dirbs, redis_url: str, tmp_path: Path
) -> None:
    url = https(pki.server)
    dirbs.root = www
    dirbs.publish("blacklist", "20240101_000000", [[A, "20240101", "stolen"]], checksum="sha256")
    dirbs.publish("exceptions_op1", "20240101_000000", [[B, "310150000000001", ""]])
    (www / "gsma_tac_20240101.txt").write_bytes(TAC)
    argv = sync_argv(url, redis_url, tmp_path / "cache", "--ca-file", str(pki.ca))

    assert main(argv) == 0
    version, run = served_version(redis_url)
    assert version is not None and run["mode"] == "full" and run["imeis"] == 2
    files = {
        "/20240101_000000_blacklist.zip",
        "/20240101_000000_blacklist.zip.sha256",
        "/20240101_000000_exceptions_op1.zip",
        "/gsma_tac_20240101.txt",
    }
    assert sorted(Handler.answers) == sorted((f, 200) for f in files)  # each downloaded once
    assert blacklisted(redis_url, [A, B, C]) == [True, False, False]  # B: an exception only

    # Nothing changed on the server: the TAC file is revalidated (304), the lists are up to
    # date, nothing is written and the same version keeps serving.
    Handler.answers.clear()
    assert main(argv) == 0
    again, run = served_version(redis_url)
    assert again == version and run["mode"] == "noop"
    assert Handler.answers == [("/gsma_tac_20240101.txt", 304)]

    # The source object itself: cached files are revalidated, not downloaded again.
    Handler.answers.clear()
    src = HttpSource(url, tmp_path / "cache", 5, tls_context(pki.ca))
    src.fetch("20240101_000000_blacklist.zip")
    assert (src.downloads, src.not_modified) == (0, 2)  # zip and its checksum sidecar
    assert {s for _, s in Handler.answers} == {304}

    # A new publication over the same connection settings is downloaded and applied.
    dirbs.publish(
        "blacklist",
        "20240102_000000",
        [[A, "20240101", "stolen"], [C, "20240102", "lost"]],
        checksum="sha256",
    )
    assert main(argv) == 0
    newer, run = served_version(redis_url)
    assert newer != version and run["mode"] == "full"
    assert blacklisted(redis_url, [A, B, C]) == [True, False, True]


def test_certificate_that_does_not_verify_is_source_error_and_old_version_serves(
    pki: Pki, https, www: Path, dirbs, redis_url: str, tmp_path: Path
) -> None:
    url = https(pki.server)
    dirbs.root = www
    dirbs.publish("blacklist", "20240101_000000", [[A, "20240101", "stolen"]])
    assert main(sync_argv(url, redis_url, tmp_path / "c0", "--ca-file", str(pki.ca))) == 0
    version, _ = served_version(redis_url)
    dirbs.publish("blacklist", "20240102_000000", [[C, "20240102", "stolen"]])

    wrong_name_url = https(pki.wrong_name)
    cases = {
        # default: the system trust store, which does not know the private CA
        "system trust store": (url, []),
        "another CA": (url, ["--ca-file", str(pki.other_ca)]),
        "hostname mismatch": (wrong_name_url, ["--ca-file", str(pki.ca)]),
    }
    for case, (src_url, extra) in cases.items():
        with structlog.testing.capture_logs() as logs:
            rc = main(sync_argv(src_url, redis_url, tmp_path / case, *extra))
        assert rc == 4, case  # EXIT_SOURCE: source unreadable, retry later
        errors = [e for e in logs if e["log_level"] == "error"]
        assert [e["event"] for e in errors] == [
            "sync source unreadable; previous version keeps serving"
        ], case
        msg = errors[0]["error"]
        assert "TLS certificate of 127.0.0.1 does not verify" in msg, msg
        if case == "hostname mismatch":
            assert "IP address mismatch" in msg and "URL must name a host" in msg, msg
        else:
            assert "unable to get local issuer certificate" in msg and "--ca-file" in msg, msg
        assert served_version(redis_url)[0] == version, case
        assert not any(p == "/20240102_000000_blacklist.zip" for p, _ in Handler.answers)
    assert blacklisted(redis_url, [A, C]) == [True, False]  # still the first publication

    # The installed command line says the same on stderr and exits 4.
    r = subprocess.run(
        [sys.executable, "-m", "eir_server.cli", *sync_argv(url, redis_url, tmp_path / "cli")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 4, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "source unreadable" in out and "does not verify" in out and "--ca-file" in out, out
    assert served_version(redis_url)[0] == version

    # Trusting the right CA, the waiting publication goes through.
    assert main(sync_argv(url, redis_url, tmp_path / "c0", "--ca-file", str(pki.ca))) == 0
    assert served_version(redis_url)[0] != version
    assert blacklisted(redis_url, [A, C]) == [False, True]


def test_https_source_errors_and_bad_ca_file(
    pki: Pki, https, www: Path, redis_url: str, tmp_path: Path
) -> None:
    url = https(pki.server)
    with pytest.raises(SourceError, match="does not verify"):
        HttpSource(url, tmp_path / "c", 5, tls_context(pki.other_ca)).list_zips()
    with pytest.raises(SourceError, match="does not verify"):
        HttpSource(url + "x.zip", tmp_path / "c", 5).fetch("x.zip")  # single zip URL, no CA
    with pytest.raises(SourceError, match="HTTP 404"):
        HttpSource(url + "x.zip", tmp_path / "c", 5, tls_context(pki.ca)).fetch("x.zip")
    # An unreadable or empty CA file is a usage error (2), found before touching anything.
    (tmp_path / "empty.pem").write_text("")
    for bad in (tmp_path / "missing.pem", tmp_path / "empty.pem"):
        with structlog.testing.capture_logs() as logs:
            assert main(sync_argv(url, redis_url, tmp_path / "c", "--ca-file", str(bad))) == 2
        assert any(e["event"].startswith("bad --ca-file") for e in logs)
    assert served_version(redis_url) == (None, {})

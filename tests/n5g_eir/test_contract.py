"""Contract: schemathesis generates requests from the OpenAPI documents the server itself serves
(3GPP's TS 29.511 and the TS 29.571 common data it references) and checks every response
against them: no 5xx, documented status codes, content types, headers and body schemas.

TS 29.571's ProblemDetails has two optional properties typed in TS 29.510's AccessToken file
(accessTokenError, accessTokenRequest), which we neither ship nor send; the test types them as
plain objects so schemathesis resolves every schema instead of skipping the error responses."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.netutil import free_port, wait_for_port

EIR = [sys.executable, "-m", "eir_server.cli"]
SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
DOC = "TS29511_N5g-eir_EquipmentIdentityCheck.yaml"
COMMON = "TS29571_CommonData.yaml"
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_headers_conformance,response_schema_conformance")


@pytest.fixture
def eir(tmp_path: Path):  # noqa: ANN201
    reg = tmp_path / "reg"
    reg.mkdir()
    (reg / "20260101_000000_blacklist.csv").write_text(
        "imei,block_date,reasons\n35209900176148,20200101,stolen\n")
    port = free_port()
    proc = subprocess.Popen(
        [*EIR, "serve", "--register", str(reg), "--unknown-equipment", "unknown",
         "--diameter-listen", f"127.0.0.1:{free_port()}", "--metrics-listen", "",
         "--http-listen", f"127.0.0.1:{port}"],
        env={**os.environ, "EIR_LOG_LEVEL": "warning"}, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def served(base: str, name: str) -> str:
    with urllib.request.urlopen(f"{base}/openapi/{name}", timeout=10) as r:
        return r.read().decode()


def test_schemathesis_against_the_served_document(eir: int, tmp_path: Path) -> None:
    assert os.access(SCHEMATHESIS, os.X_OK), "schemathesis is a test dependency"
    base = f"http://127.0.0.1:{eir}"
    docs = tmp_path / "openapi"
    docs.mkdir()
    (docs / DOC).write_text(served(base, DOC))
    common = served(base, COMMON)
    for ref in ("AccessTokenErr", "AccessTokenReq"):
        line = f"$ref: 'TS29510_Nnrf_AccessToken.yaml#/components/schemas/{ref}'"
        assert line in common
        common = common.replace(line, "type: object")
    (docs / COMMON).write_text(common)
    r = subprocess.run(
        [SCHEMATHESIS, "run", str(docs / DOC), "--url", base + "/n5g-eir-eic/v1",
         "--checks", CHECKS, "--max-examples", "150", "--seed", "29511",
         "--generation-database", "none", "--no-color", "--workers", "1",
         "--report", "junit", "--report-dir", str(tmp_path / "report")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "nresolvable" not in r.stdout, r.stdout[-3000:]  # every response schema checked
    # The run did exercise the operation (it is easy to test nothing at all).
    junit = (tmp_path / "report").glob("*.xml")
    text = "".join(p.read_text() for p in junit)
    assert "GET /equipment-status" in text and 'failures="0"' in text
    shutil.rmtree(tmp_path / "report", ignore_errors=True)

"""`eir-server load` run as its user runs it: against a real `eir-server serve` with a register
(expected statuses checked, mismatches detected), and against peers that refuse or stall."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from eir_server.diameter.codec import message, str_avp, u32_avp
from tests.netutil import free_port, recv_message, wait_for_port

EXE = str(Path(sys.executable).parent / "eir-server")
BLACK, GREY = "35209900176148", "35209900176149"


def load(*args: str, timeout: float = 60) -> tuple[int, dict, str]:
    out = Path(args[args.index("--json") + 1]) if "--json" in args else None
    p = subprocess.run([EXE, "load", "--progress", "off", *args], capture_output=True,
                       text=True, timeout=timeout)
    report = json.loads(out.read_text()) if out is not None and out.exists() else {}
    return p.returncode, report, p.stdout + p.stderr


@pytest.fixture(scope="module")
def eir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    reg = tmp_path_factory.mktemp("reg")
    (reg / "20250101_000000_blacklist.csv").write_text(
        f"imei,block_date,reasons\n{BLACK},20200101,stolen\n")
    (reg / "20250101_000000_notifications_op1.csv").write_text(
        "imei,imsi,msisdn,block_date,reasons\n"
        f"{GREY},001019999999999,15550001,29991231,duplicate\n")
    port = free_port()
    proc = subprocess.Popen([EXE, "serve", "--diameter-listen", f"127.0.0.1:{port}",
                             "--metrics-listen", "", "--log-level", "warning", "--register",
                             str(reg), "--unknown-equipment", "unknown"])
    try:
        wait_for_port(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(15)


def test_expected_statuses_against_our_server(eir, tmp_path):
    listed = tmp_path / "listed.csv"
    # A grey IMEI with a check digit and an SVN; an unlisted one the server does not know.
    listed.write_text(f"# register entries\n{BLACK},blacklisted\n{GREY}0,greylisted,07\n"
                      "35209900176150,unknown,01,001010000000001\n")
    rc, r, out = load("--target", f"127.0.0.1:{eir}", "--connections", "3", "--inflight", "8",
                      "--duration", "1.5", "--warmup", "0.3", "--imeis",
                      "range:35209900200000:500", "--listed", str(listed), "--listed-share",
                      "0.3", "--json", str(tmp_path / "r.json"), "--plot",
                      str(tmp_path / "r.png"))
    assert rc == 0, out
    assert r["exit_code"] == 0 and r["exit_reason"] == "ok"
    assert r["expected_checked"] and r["mismatches"] == 0 and r["malformed"] == 0
    assert r["timeouts"] == 0 and r["connections"]["up"] == 3
    assert r["answers"] > 50 and r["throughput_per_s"] > 0
    assert set(r["statuses"]) == {"blacklisted", "greylisted"}
    # Unlisted IMEIs: Experimental-Result 5422 DIAMETER_ERROR_EQUIPMENT_UNKNOWN.
    assert set(r["results"]) == {"Result-Code 2001", "Experimental-Result 5422"}
    assert sum(r["results"].values()) == r["answers"]
    share = sum(r["statuses"].values()) / r["answers"]
    assert 0.1 < share < 0.3  # 0.3 listed, 2 of its 3 IMEIs answered with a status
    lat = r["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert r["generator"]["cpu_us_per_request"] > 0
    assert r["connections"]["dpa_received"] == 3  # DPR at the end, answered
    assert r["timeline"] and sum(s["answers"] for s in r["timeline"]) >= r["answers"]
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert "answers" in out and "exit 0: ok" in out


def test_wrong_expectations_are_mismatches(eir, tmp_path):
    wrong = tmp_path / "wrong.csv"
    wrong.write_text(f"{BLACK},whitelisted\n{GREY},greylisted\n")
    rc, r, out = load("--target", f"127.0.0.1:{eir}", "--connections", "1", "--rate", "300",
                      "--duration", "1", "--warmup", "0", "--imeis", str(wrong), "--json",
                      str(tmp_path / "r.json"))
    assert rc == 1, out
    assert r["mismatches"] > 0 and r["statuses"]["greylisted"] > 0
    assert abs(r["mismatches"] - r["statuses"]["blacklisted"]) == 0
    assert {"imei": BLACK, "expected": 0, "got": 1, "problem": ""} in r["mismatch_examples"]
    assert r["config"]["mode"].startswith("open loop")
    # The same run tolerating them passes.
    rc, r, out = load("--target", f"127.0.0.1:{eir}", "--connections", "1", "--rate", "300",
                      "--duration", "0.5", "--warmup", "0", "--imeis", str(wrong),
                      "--max-mismatches", "100000", "--json", str(tmp_path / "r2.json"))
    assert rc == 0, out


def test_only_error_answers_are_no_passing_run(eir, tmp_path):
    """No expected statuses given and every answer an error (here 3003: the EIR's realm
    mistyped): exit 1, not "ok". With an expected Result-Code the same errors are the verdict."""
    rc, r, out = load("--target", f"127.0.0.1:{eir}", "--connections", "1", "--rate", "300",
                      "--duration", "0.5", "--warmup", "0", "--destination-realm",
                      "other.realm", "--json", str(tmp_path / "r.json"))
    assert rc == 1, out
    assert r["answers"] > 0 and r["results"] == {"Result-Code 3003": r["answers"]}, r["results"]
    assert "no answer was a verdict" in r["exit_reason"]
    expected = tmp_path / "expected.csv"
    expected.write_text(f"{BLACK},3003\n")
    rc, r, out = load("--target", f"127.0.0.1:{eir}", "--connections", "1", "--rate", "300",
                      "--duration", "0.5", "--warmup", "0", "--destination-realm",
                      "other.realm", "--imeis", str(expected), "--json", str(tmp_path / "e.json"))
    assert rc == 0 and r["mismatches"] == 0, out


def test_exact_pacing_sends_the_whole_schedule(eir, tmp_path):
    """--pacing exact: each request on its own turn of the generator's loop, none left out."""
    rc, r, out = load("--target", f"127.0.0.1:{eir}", "--connections", "2", "--rate", "2000",
                      "--duration", "1", "--warmup", "0", "--pacing", "exact", "--json",
                      str(tmp_path / "r.json"))
    assert rc == 0, out
    assert r["config"]["mode"] == "open loop, 2000 requests/s, exact pacing"
    assert 1990 <= r["answers"] <= 2010 and r["timeouts"] == 0


def test_nothing_listening_is_exit_3(tmp_path):
    rc, r, out = load("--target", f"127.0.0.1:{free_port()}", "--duration", "1", "--json",
                      str(tmp_path / "r.json"))
    assert rc == 3, out
    assert r["connections"]["up"] == 0 and r["connections"]["failures"]


def test_bad_usage_is_exit_2(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("3520990017614x\n")
    for args in (["--imeis", str(bad)], ["--imeis", "range:1:2"], ["--target", "nope"],
                 ["--rate", "0"], ["--connections", "2", "--origin-host", "one.host"],
                 ["--pacing", "exact"]):  # exact pacing is for the open loop
        rc, _r, out = load(*args)
        assert rc == 2, (args, out)


class StallingPeer:
    """Answers CER with CEA 2001, then reads and never answers: every ECR times out."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            recv_message(c)
            c.sendall(message(0, 257, 0, 1, 1, [u32_avp(268, 2001), str_avp(264, "stall"),
                                                 str_avp(296, "test")]))
            threading.Thread(target=self.drain, args=(c,), daemon=True).start()

    @staticmethod
    def drain(c: socket.socket) -> None:
        try:
            while c.recv(65536):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_stalled_server_is_timeouts_exit_4(tmp_path):
    peer = StallingPeer()
    try:
        rc, r, out = load("--target", f"127.0.0.1:{peer.port}", "--connections", "1",
                          "--rate", "200", "--duration", "1", "--warmup", "0", "--timeout",
                          "0.3", "--json", str(tmp_path / "r.json"))
    finally:
        peer.close()
    assert rc == 4, out
    # Open loop: the schedule kept sending although nothing came back.
    assert r["answers"] == 0 and r["timeouts"] >= 150
    assert r["requests"] == r["timeouts"]


def test_progress_says_it_is_preparing_before_connecting(eir):
    """A range of millions takes the generator a minute to build before its first connection:
    with progress on, that minute is announced, not silent."""
    p = subprocess.run([EXE, "load", "--progress", "on", "--target", f"127.0.0.1:{eir}",
                        "--duration", "1.5", "--warmup", "0", "--imeis",
                        "range:35209900300000:1000"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    first = p.stderr.splitlines()[0]
    assert first == "preparing the requests of range:35209900300000:1000 ..."
    assert "answers/s" in p.stderr  # then the live progress line

"""The command line as an operator uses it: real processes, real sockets, real files."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from eir_server.config import load_config
from tests.diameter.builders import cer, ecr
from tests.netutil import free_port, recv_message, wait_for_port

EIR = [sys.executable, "-m", "eir_server.cli"]


@pytest.fixture
def register(tmp_path: Path) -> Path:
    (tmp_path / "20260101_000000_blacklist.csv").write_text(
        "imei,block_date,reasons\n35209900176148,20200101,stolen|police report\n")
    return tmp_path


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EIR, "check", *args], capture_output=True, text=True, timeout=60)


def test_check_explains_and_exit_code_is_the_status(register: Path) -> None:
    r = check("352099001761481", "--register", str(register), "--date", "20260101")
    assert r.returncode == 1, r.stderr
    assert "BLACKLISTED" in r.stdout and "national_blacklist" in r.stdout
    assert "stolen" in r.stdout and "police report" in r.stdout
    r = check("49015420323751", "--register", str(register))
    assert r.returncode == 0 and "WHITELISTED" in r.stdout
    r = check("49015420323751", "--unknown-equipment", "unknown")
    assert r.returncode == 3
    r = check("4901542032375X")
    assert r.returncode == 2 and "malformed" in r.stdout


def test_config_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    f = tmp_path / "eir.toml"
    f.write_text('origin_host = "file.host"\norigin_realm = "file.realm"\nworkers = 3\n'
                 '[policy]\nmalformed = "blacklisted"\n')
    cfg = load_config(str(f), env={"EIR_ORIGIN_HOST": "env.host", "EIR_WORKERS": "2"},
                      overrides={"origin_host": "flag.host", "workers": None})
    assert (cfg.origin_host, cfg.origin_realm, cfg.workers) == ("flag.host", "file.realm", 2)
    assert cfg.policy == {"malformed": "blacklisted"}


@pytest.mark.parametrize("text, env, message", [
    ('bogus = 1\n', {}, "unknown option"),
    ('workers = 0\n', {}, "workers"),
    ('', {"EIR_WATCHDOG_INTERVAL": "5"}, "RFC 3539"),
    ('', {"EIR_UNKNOWN_EQUIPMENT": "maybe"}, "unknown_equipment"),
    ('diameter_listen = "nowhere"\n', {}, "HOST:PORT"),
])
def test_bad_configuration_is_refused(tmp_path: Path, text: str, env: dict[str, str],
                                      message: str) -> None:
    f = tmp_path / "eir.toml"
    f.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(str(f), env=env)


def test_serve_reports_configuration_errors(tmp_path: Path) -> None:
    f = tmp_path / "eir.toml"
    f.write_text('[policy]\nunknown_equipment = "unknown"\n')
    r = subprocess.run([*EIR, "serve", "--config", str(f)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "unknown_equipment" in r.stderr






def test_workers_share_the_port_and_metrics_add_up(tmp_path: Path) -> None:
    port, mport = free_port(), free_port()
    env = {**os.environ, "EIR_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([*EIR, "serve", "--workers", "2", "--diameter-listen",
                             f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{mport}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc)
        time.sleep(1.0)  # let both workers bind before spreading connections
        conns = []
        for i in range(8):
            s = socket.create_connection(("127.0.0.1", port), 5)
            s.sendall(cer(hbh=1, host=f"mme{i}.epc.test"))
            cea = recv_message(s)
            assert struct.unpack("!II", cea[20:24] + cea[28:32]) == (268, 2001)
            # A device each: the device signals' gauge counts them (in the background flush).
            s.sendall(ecr(hbh=2, imei=f"490154203237{i:02d}", imsi=f"00101000000000{i}"))
            assert struct.unpack("!I", recv_message(s)[4:8])[0] & 0xFFFFFF == 324
            conns.append(s)
        body = ""
        want = ('eir_requests_total{command="ECR",interface="s13",result="2001"} 8.0',
                'eir_device_signals_tracked{kind="imei"} 8.0',
                'eir_device_signals_tracked{kind="imsi"} 8.0')
        for _ in range(50):
            body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read()
            body = body.decode()
            if all(w in body for w in want):
                break
            time.sleep(0.1)
        assert [w for w in want if w not in body] == []
        assert 'eir_metrics_workers{state="reporting"} 2.0' in body
        for s in conns:
            s.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_check_failures_have_their_own_exit_codes(register: Path, tmp_path: Path,
                                                   redis_url: str) -> None:
    """0-3 are verdicts; 4 usage/configuration, 5 store unavailable: one line, no traceback."""
    cases = [
        ((), 4, "required"),  # no IMEI: argparse's usage error would otherwise exit 2 (GREYLISTED)
        (("352099001761481", "--bogus"), 4, "unrecognized"),
        (("352099001761481", "--config", str(tmp_path / "missing.toml")), 4, "configuration"),
        (("352099001761481", "--store", "redis://127.0.0.1:1/0", "--register", str(register)),
         4, "--register"),
        (("352099001761481", "--store", f"redis://127.0.0.1:{free_port()}/0"), 5, "unavailable"),
        (("352099001761481", "--store", redis_url), 5, "eir-server sync"),  # no register yet
        (("352099001761481", "--register", str(tmp_path / "nope")), 5, "unavailable"),
    ]
    for args, code, text in cases:
        r = check(*args)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr and text in r.stderr, (args, r.stderr)
        if code == 5 or "configuration" in text:
            assert r.stderr.strip().count("\n") == 0, (args, r.stderr)


def test_check_refuses_a_date_that_is_not_yyyymmdd(register: Path) -> None:
    """The policy compares YYYYMMDD strings: another form would give a wrong verdict (exit 0 or
    1 for a day the date does not name). A usage error: exit 4, one line."""
    for date in ("2020-01-01", "2019", "20191301", "20190230", "foo"):
        r = check("352099001761481", "--register", str(register), "--date", date)
        assert r.returncode == 4, (date, r.returncode, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and "YYYYMMDD" in r.stderr, (date, r.stderr)
        assert r.stderr.strip().count("\n") == 0 and r.stdout == "", (date, r.stderr)
    # a valid date still decides: the device is blocked from 20200101
    r = check("352099001761481", "--register", str(register), "--date", "20191231")
    assert r.returncode == 0 and "WHITELISTED" in r.stdout, r.stdout + r.stderr
    r = check("352099001761481", "--register", str(register), "--date", "20200101")
    assert r.returncode == 1 and "BLACKLISTED" in r.stdout, r.stdout + r.stderr


def test_serve_with_a_refused_register_says_so_in_one_line(tmp_path: Path) -> None:
    """More than 1% bad rows: the register refuses the file, serve exits 1 with one stderr
    line naming it (the operator's fix is the file), not a traceback."""
    (tmp_path / "20260101_000000_blacklist.csv").write_text(
        "imei,block_date,reasons\n35209900176148,20200101,stolen\nnot-an-imei,20200101,x\n")
    env = {**os.environ, "EIR_LOG_LEVEL": "warning"}
    r = subprocess.run([*EIR, "serve", "--register", str(tmp_path), "--diameter-listen",
                        f"127.0.0.1:{free_port()}", "--metrics-listen",
                        f"127.0.0.1:{free_port()}"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("eir-server: 20260101_000000_blacklist.csv: 1 of 2 rows are bad")
    assert "file refused" in r.stderr and "line 3" in r.stderr, r.stderr


def test_sync_honours_log_format_flag_and_environment(tmp_path: Path) -> None:
    store = f"redis://127.0.0.1:{free_port()}/0"  # nothing there: one error line, exit 3
    base = [*EIR, "sync", "--source", str(tmp_path), "--once", "--progress", "never"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EIR_")}
    r = subprocess.run([*base, "--store", store], capture_output=True, text=True, timeout=60,
                       env={**env, "EIR_LOG_FORMAT": "json"})
    lines = [x for x in r.stdout.splitlines() if x.strip()]
    assert r.returncode == 3 and lines, r.stdout + r.stderr
    assert all(json.loads(x)["logger"] == "eir.sync" for x in lines)
    # the flag wins over the environment; EIR_STORE is the --store default
    r = subprocess.run([*base, "--log-format", "console"], capture_output=True, text=True,
                       timeout=60, env={**env, "EIR_LOG_FORMAT": "json", "EIR_STORE": store})
    assert r.returncode == 3 and r.stdout.strip(), r.stdout + r.stderr
    assert not r.stdout.lstrip().startswith("{") and "[error" in r.stdout

"""Live interop with a Diameter implementation we did not write: Erlang/OTP's `diameter`.

An OTP diameter service acting as the MME (tests/interop/erlang/s13_mme.escript) connects to a
real `eir-server serve` process over TCP, does the capabilities exchange, sends ECRs with
diameter:call/4, lets the watchdogs run, and stops (DPR/DPA). Its S13 dictionary
(tests/interop/erlang/s13.dia) is compiled at test time with diameterc + erlc into a temporary
directory.

Missing Erlang tooling is a test FAILURE, not a skip: CI installs the Debian packages
erlang-base erlang-diameter erlang-dev (see ERLANG_PACKAGES).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
DIA = HERE / "erlang" / "s13.dia"
ESCRIPT = HERE / "erlang" / "s13_mme.escript"
DICT_MODULE = "eir_interop_s13"  # @name in s13.dia

# erlang-base: erl, erlc, escript; erlang-diameter: the diameter application and diameterc
# (pulls erlang-syntax-tools, erlang-ssl, erlang-runtime-tools); erlang-dev: the diameter
# include files (diameter.hrl, diameter_gen.hrl) every generated dictionary module includes.
ERLANG_PACKAGES = ("erlang-base", "erlang-diameter", "erlang-dev")

EIR_HOST = "eir.interop.test"
EIR_REALM = "interop.test"
MME_HOST = "mme.erlang.test"
MME_REALM = "erlang.test"

# The register served: IMEIs (14 digits) and their expected Equipment-Status.
IMEI_BLACK = "35209900176148"
IMEI_GREY = "35209900176149"
IMEI_WHITE = "35209900176150"  # on no list: WHITELISTED by default
IMEI_UNKNOWN = "35209900176151"  # on no list either; the `unknown` server answers 5422
WHITELISTED, BLACKLISTED, GREYLISTED = 0, 1, 2


def _tool_missing(what: str) -> None:
    pytest.fail(
        f"{what}: the OTP interop tests need the Debian packages {' '.join(ERLANG_PACKAGES)} "
        "(apt-get install --no-install-recommends " + " ".join(ERLANG_PACKAGES) + ")",
        pytrace=False,
    )


def _which(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    if not os.access(path, os.X_OK):
        _tool_missing(f"{name} not found")
    return path


@dataclass(frozen=True)
class Erlang:
    escript: str
    dict_ebin: Path


@pytest.fixture(scope="session")
def erlang(tmp_path_factory: pytest.TempPathFactory) -> Erlang:
    """The S13 dictionary compiled for OTP (diameterc, then erlc) into a temporary directory."""
    escript, diameterc, erlc = _which("escript"), _which("diameterc"), _which("erlc")
    out = tmp_path_factory.mktemp("otp_s13")
    gen = subprocess.run([diameterc, "-o", str(out), str(DIA)], capture_output=True, text=True,
                         timeout=60)
    if gen.returncode != 0:
        pytest.fail(f"diameterc refused {DIA}:\n{gen.stdout}{gen.stderr}")
    erl = out / f"{DICT_MODULE}.erl"
    assert erl.is_file(), f"diameterc produced {sorted(p.name for p in out.iterdir())}"
    beam = subprocess.run([erlc, "-o", str(out), str(erl)], capture_output=True, text=True,
                          timeout=120)
    if beam.returncode != 0:
        if "diameter/include" in beam.stdout + beam.stderr:
            first = "\n".join(beam.stdout.splitlines()[:3])
            _tool_missing(f"erlc cannot find the diameter include files:\n{first}\n")
        pytest.fail(f"erlc failed on the generated dictionary:\n{beam.stdout}{beam.stderr}")
    assert (out / f"{DICT_MODULE}.beam").is_file()
    return Erlang(escript, out)


@pytest.fixture(scope="session")
def register_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small DIRBS register: one blacklisted IMEI, one with a pending (future) block."""
    d = tmp_path_factory.mktemp("register")
    (d / "20250101_000000_blacklist.csv").write_text(
        f"imei,block_date,reasons\n{IMEI_BLACK},20200101,stolen\n")
    (d / "20250101_000000_notifications_op1.csv").write_text(
        "imei,imsi,msisdn,block_date,reasons\n"
        f"{IMEI_GREY},001019999999999,15550001,29991231,duplicate\n")
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EirServer:
    """One `eir-server serve` child process with JSON logs, optionally with /metrics."""

    def __init__(self, workdir: Path, *args: str, metrics: bool = False) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.metrics_port = free_port() if metrics else None
        self.log_path = workdir / f"serve-{self.port}.log"
        exe = Path(sys.executable).with_name("eir-server")
        metrics_listen = f"127.0.0.1:{self.metrics_port}" if metrics else ""
        cmd = [str(exe), "serve", "--diameter-listen", f"127.0.0.1:{self.port}",
               "--metrics-listen", metrics_listen, "--origin-host", EIR_HOST,
               "--origin-realm", EIR_REALM, "--log-format", "json", *args]
        self._logf = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"eir-server exited {self.proc.returncode}: {self.log_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"eir-server did not listen: {self.log_text()}")
                time.sleep(0.05)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.log_events() if e.get("event") == name]

    def wait_event(self, name: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The log lines called `name`, waiting (up to `timeout`) for at least one."""
        deadline = time.monotonic() + timeout
        while not (found := self.events(name)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return found

    def metrics_text(self) -> str:
        assert self.metrics_port is not None
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(r.read().decode())

    def wait_metric(self, line_prefix: str, timeout: float = 10.0) -> float | None:
        """Value of the first /metrics sample starting with `line_prefix`, waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.metrics_text().splitlines():
                if line.startswith(line_prefix):
                    return float(line.rsplit(" ", 1)[1])
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._logf.close()


@dataclass
class MmeRun:
    """What the OTP MME printed: one JSON object per stdout line."""

    returncode: int
    stdout: str
    stderr: str
    events: list[dict[str, Any]] = field(default_factory=list)

    def context(self) -> str:
        return f"\n--- OTP stdout ---\n{self.stdout}\n--- OTP stderr ---\n{self.stderr}"

    def of(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    def one(self, event: str) -> dict[str, Any]:
        found = self.of(event)
        assert len(found) == 1, f"expected one {event!r} event, got {len(found)}{self.context()}"
        return found[0]

    def answer(self, label: str) -> dict[str, Any]:
        found = [e for e in self.of("answer") if e.get("label") == label]
        assert len(found) == 1, f"no single answer for {label!r}{self.context()}"
        return found[0]


def run_mme(erlang: Erlang, server: EirServer, *steps: str, watchdog_timer_ms: int = 6000,
            timeout: float = 60.0) -> MmeRun:
    """Run the OTP MME against `server` and parse its report; it must run to the end cleanly."""
    env = {**os.environ, "EIR_REALM": EIR_REALM, "MME_WATCHDOG_TIMER": str(watchdog_timer_ms)}
    cmd = [erlang.escript, str(ESCRIPT), str(erlang.dict_ebin), "127.0.0.1", str(server.port),
           *steps]
    p = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env)
    stdout = p.stdout.decode(errors="backslashreplace")
    stderr = p.stderr.decode(errors="backslashreplace")
    run = MmeRun(p.returncode, stdout, stderr)
    for line in stdout.splitlines():
        if line.startswith("{"):
            run.events.append(json.loads(line))
        elif line.strip():
            pytest.fail(f"unexpected line on the OTP MME's stdout: {line!r}{run.context()}")
    assert p.returncode == 0, f"OTP MME exited {p.returncode}{run.context()}" \
                              f"\n--- eir-server log ---\n{server.log_text()}"
    # OTP's logger (redirected to stderr) reports callback crashes, codec failures and
    # supervisor restarts; any report means something went wrong inside OTP.
    for marker in ("ERROR REPORT", "CRASH REPORT", "SUPERVISOR REPORT", "WARNING REPORT"):
        assert marker not in stderr, f"OTP logged a {marker}{run.context()}"
    return run


@pytest.fixture
def eir_servers(tmp_path: Path) -> Iterator[Callable[..., EirServer]]:
    """`eir_servers(*serve args, metrics=False)`: eir-server processes killed after the test."""
    started: list[EirServer] = []

    def start(*args: str, metrics: bool = False) -> EirServer:
        s = EirServer(tmp_path, *args, metrics=metrics)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()

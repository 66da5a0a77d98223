"""`serve --workers N` as an operator runs it: crash-looping workers, a dead parent, SIGHUP,
a configuration that can never work. Real processes, sockets and files."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.eirproc import EIR, S13Client, http_get, log_lines, stop, wait_until
from tests.netutil import free_port, wait_for_port

STOLEN = "35209900176148"
CLEAN = "49015420323751"
BLACKLISTED, GREYLISTED, WHITELISTED = 1, 2, 0


def serve(tmp_path: Path, *args: str, log: str = "serve.log") -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp_path / log
    env = {**os.environ, "EIR_LOG_FORMAT": "json"}
    proc = subprocess.Popen([*EIR, "serve", *args], env=env, stdout=out.open("wb"),
                            stderr=subprocess.STDOUT)
    return proc, out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (reaped by nobody yet) is dead for our purpose
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_crash_looping_workers_back_off_and_fail_healthz(tmp_path: Path) -> None:
    # The Diameter port is held by a socket without SO_REUSEPORT: every worker start fails.
    port, mport = free_port(), free_port()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    proc, out = serve(tmp_path, "--workers", "2", "--diameter-listen", f"127.0.0.1:{port}",
                      "--metrics-listen", f"127.0.0.1:{mport}")
    try:
        wait_for_port(mport, proc)

        def exits() -> list[dict[str, object]]:
            return [r for r in log_lines(out) if r.get("event") == "worker_exited"
                    and r.get("worker") == 0]

        wait_until(lambda: len(exits()) >= 3, "three failed starts of worker 0", 60, proc)
        status, body = http_get(mport, "/healthz")
        assert status == 503 and "crash-looping" in body, body
        first = exits()[:3]
        # exponential backoff, announced on the one line per restart
        assert [r["restart_in_s"] for r in first] == [1.0, 2.0, 4.0]
        assert all(r["logger"] == "eir_server.app" and "exit code 1" in str(r["reason"])
                   for r in first)
        crashes = [r for r in log_lines(out) if r.get("event") == "worker_crashed"
                   and r.get("worker") == 0]
        # the traceback once per series, then one line per crash
        assert "exception" in crashes[0] and all("exception" not in r for r in crashes[1:])
        # the port frees up: the next start succeeds and /healthz recovers
        blocker.close()
        wait_until(lambda: http_get(mport, "/healthz")[0] == 200, "healthz back to 200", 60,
                   proc)
        assert proc.poll() is None
    finally:
        blocker.close()
        stop(proc)


def test_workers_exit_when_the_parent_is_killed(tmp_path: Path) -> None:
    port, mport = free_port(), free_port()
    proc, out = serve(tmp_path, "--workers", "2", "--diameter-listen", f"127.0.0.1:{port}",
                      "--metrics-listen", f"127.0.0.1:{mport}")
    try:
        wait_until(lambda: http_get(mport, "/healthz")[0] == 200 if _listening(mport) else False,
                   "both workers up", 60, proc)
        pids = [int(r["pid"]) for r in log_lines(out) if r.get("event") == "worker_started"]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        proc.kill()  # SIGKILL: no chance to stop its children itself
        proc.wait(10)
        wait_until(lambda: not any(alive(p) for p in pids), "workers gone", 30)
        # they left through the normal shutdown (DPR, drain), not killed
        stopped = {r["worker"] for r in log_lines(out) if r.get("event") == "stopped"}
        assert stopped == {0, 1}
    finally:
        stop(proc)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


def test_sighup_reloads_register_and_policy_without_a_restart(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    reg.mkdir()
    (reg / "20260101_000000_blacklist.csv").write_text(
        "imei,block_date,reasons\n35209900176148,20200101,stolen\n")
    toml = tmp_path / "eir.toml"
    toml.write_text('unknown_equipment = "whitelisted"\n')
    port, mport = free_port(), free_port()
    proc, out = serve(tmp_path, "--config", str(toml), "--workers", "2", "--register", str(reg),
                      "--diameter-listen", f"127.0.0.1:{port}",
                      "--metrics-listen", f"127.0.0.1:{mport}")
    try:
        wait_until(lambda: _listening(mport) and http_get(mport, "/readyz")[0] == 200,
                   "ready", 60, proc)
        pids = sorted(int(r["pid"]) for r in log_lines(out) if r.get("event") == "worker_started")
        c = S13Client(port)
        assert c.status(STOLEN) == BLACKLISTED and c.status(CLEAN) == WHITELISTED
        # a newer register (the stolen phone unblocked, another one listed) and a new policy
        (reg / "20260102_000000_blacklist.csv").write_text(
            "imei,block_date,reasons\n49015420323751,20200101,stolen\n")
        toml.write_text('unknown_equipment = "greylisted"\n')
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len([r for r in log_lines(out) if r.get("event") == "reloaded"]) == 2,
                   "both workers reloaded", 60, proc)
        for _ in range(4):  # whichever worker the connection landed on
            c2 = S13Client(port)
            assert c2.status(CLEAN) == BLACKLISTED
            assert c2.status(STOLEN) == GREYLISTED  # unlisted now: the new default verdict
            c2.close()
        c.close()
        # same processes: reloaded, not restarted
        now = sorted(int(r["pid"]) for r in log_lines(out) if r.get("event") == "worker_started")
        assert now == pids and proc.poll() is None
        # every line says which process (worker index, -1 the parent) and which logger
        lines = log_lines(out)
        assert lines and all(isinstance(r.get("worker"), int) and r.get("logger")
                             for r in lines), [r for r in lines if "worker" not in r][:3]
        assert {r["worker"] for r in lines} == {-1, 0, 1}
        metrics = http_get(mport, "/metrics")[1]
        assert "eir_register_version 2.0260102e+13" in metrics
        # a broken file is refused by the parent, once; the workers keep serving
        toml.write_text("unknown_equipment = 'sometimes'\n")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: [r for r in log_lines(out) if r.get("event") == "reload_refused"],
                   "reload refused", 30, proc)
        time.sleep(0.5)
        c3 = S13Client(port)
        assert c3.status(STOLEN) == GREYLISTED
        c3.close()
        assert proc.poll() is None
    finally:
        stop(proc)
    assert proc.returncode == 0


def test_store_and_register_together_fail_fast_with_one_line(tmp_path: Path) -> None:
    r = subprocess.run([*EIR, "serve", "--workers", "2", "--store", "redis://127.0.0.1:1/0",
                        "--register", str(tmp_path), "--diameter-listen",
                        f"127.0.0.1:{free_port()}", "--metrics-listen", ""],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stderr.strip().count("\n") == 0 and "--register" in r.stderr, r.stderr


def test_sighup_with_one_worker_reloads_in_process(tmp_path: Path) -> None:
    toml = tmp_path / "eir.toml"
    toml.write_text('unknown_equipment = "whitelisted"\n')
    port, mport = free_port(), free_port()
    proc, out = serve(tmp_path, "--config", str(toml), "--diameter-listen",
                      f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{mport}")
    try:
        wait_for_port(port, proc)
        c = S13Client(port)
        assert c.status(CLEAN) == WHITELISTED
        toml.write_text('unknown_equipment = "greylisted"\n')
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: [r for r in log_lines(out) if r.get("event") == "reloaded"],
                   "reloaded", 30, proc)
        assert c.status(CLEAN) == GREYLISTED  # same connection, same process
        c.close()
        assert proc.poll() is None
    finally:
        stop(proc)
    assert proc.returncode == 0

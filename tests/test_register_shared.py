"""`serve --workers 2 --register DIR` as an operator runs it: the register is built once into a
snapshot file that both workers map (the same file in /proc/PID/maps), both answer the same
verdicts over real TCP, a SIGHUP with a changed register switches both to a new file and the old
one goes; with no place for the file, each worker loads the register itself, said once. Real
processes, sockets and files."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

from tests.eirproc import EIR, S13Client, http_get, log_lines, stop, wait_until
from tests.netutil import free_port

BLACKLISTED, GREYLISTED, WHITELISTED = 1, 2, 0
STOLEN = "35209900176148"
LOST = "35209900176149"
CLEAN = "49015420323751"
NOTIFIED = "35209900176150"  # on a notification list only: greylisted (default policy)
PAIRED = "35209900176151"  # blacklisted, but paired with IMSI_OK on the exception list
IMSI_OK = "001010123456789"


def write_register(reg: Path, ts: str, blacklist: list[str]) -> None:
    reg.mkdir(exist_ok=True)
    (reg / f"{ts}_blacklist.csv").write_text(
        "imei,block_date,reasons\n" + "".join(f"{i},20200101,stolen\n" for i in blacklist))
    (reg / f"{ts}_notifications_op1.csv").write_text(
        "imei,imsi,msisdn,block_date,reasons,amnesty_granted\n"
        f"{NOTIFIED},001010000000001,,20991231,duplicate,False\n")
    (reg / f"{ts}_exceptions_op1.csv").write_text(f"imei,imsi,msisdn\n{PAIRED},{IMSI_OK},\n")


def serve(tmp_path: Path, *args: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp_path / "serve.log"
    proc = subprocess.Popen([*EIR, "serve", *args], env={**os.environ, "EIR_LOG_FORMAT": "json",
                                                         **env},
                            stdout=out.open("wb"), stderr=subprocess.STDOUT)
    return proc, out


def ready(port: int) -> bool:
    try:
        return http_get(port, "/readyz")[0] == 200
    except OSError:  # not listening yet (URLError is an OSError)
        return False


def server_inode(client: socket.socket) -> int:
    """The inode of the server side of a loopback connection (/proc/net/tcp)."""
    cport = client.getsockname()[1]
    sport = client.getpeername()[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        local, remote = f[1], f[2]
        if int(local.split(":")[1], 16) == sport and int(remote.split(":")[1], 16) == cport:
            return int(f[9])
    raise AssertionError("connection not found in /proc/net/tcp")


def owner(pids: list[int], inode: int) -> int:
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no worker holds socket {inode}")


def clients_per_worker(port: int, pids: list[int]) -> dict[int, S13Client]:
    """An S13 connection to each worker (SO_REUSEPORT spreads them: connect until it did)."""
    got: dict[int, S13Client] = {}
    spare: list[S13Client] = []
    for _ in range(64):
        c = S13Client(port)
        pid = owner(pids, server_inode(c.sock))
        if pid in got:
            spare.append(c)
        else:
            got[pid] = c
        if len(got) == len(pids):
            break
    for c in spare:
        c.close()
    assert sorted(got) == sorted(pids), "connections never reached every worker"
    return got


def mapped(pid: int, directory: Path) -> set[str]:
    """Snapshot files in `directory` that process `pid` has mapped (' (deleted)' kept)."""
    out = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith(str(directory)):
            out.add(parts[5])
    return out


def verdicts(c: S13Client) -> tuple[int | None, ...]:
    return (c.status(STOLEN), c.status(LOST), c.status(CLEAN), c.status(NOTIFIED),
            c.status(PAIRED, imsi=IMSI_OK), c.status(PAIRED))


def test_two_workers_map_one_snapshot_and_reload_together(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    write_register(reg, "20260101_000000", [STOLEN, PAIRED])
    snapdir = tmp_path / "snapshots"
    private = snapdir / f"eir-register-{os.getuid()}"
    port, mport = free_port(), free_port()
    proc, out = serve(tmp_path, "--workers", "2", "--register", str(reg),
                      "--diameter-listen", f"127.0.0.1:{port}",
                      "--metrics-listen", f"127.0.0.1:{mport}",
                      env={"EIR_REGISTER_SNAPSHOT_DIR": str(snapdir)})
    try:
        wait_until(lambda: ready(mport), "ready", 60, proc)
        lines = log_lines(out)
        pids = [int(r["pid"]) for r in lines if r.get("event") == "worker_started"]
        assert len(pids) == 2
        # built once, by the parent before the fork; both workers loaded the file, not the CSVs
        built = [r for r in lines if r.get("event") == "register snapshot ready"]
        assert len(built) == 1 and built[0]["worker"] == -1
        assert [r["worker"] for r in lines if r.get("event") == "register snapshot built"] == [-1]
        snap = Path(built[0]["snapshot"])
        assert snap.parent == private and oct(private.stat().st_mode & 0o777) == "0o700"
        loaded = [r for r in lines if r.get("event") == "register loaded"]
        assert sorted(r["worker"] for r in loaded) == [0, 1]
        assert all(r["snapshot"] == str(snap) for r in loaded)
        assert not [p for p in reg.iterdir() if not p.name.startswith("20260101")]
        for pid in pids:
            assert mapped(pid, private) == {str(snap)}, pid
        assert os.stat(snap).st_ino == os.stat(private / snap.name).st_ino

        clients = clients_per_worker(port, pids)
        want = (BLACKLISTED, WHITELISTED, WHITELISTED, GREYLISTED, WHITELISTED, BLACKLISTED)
        assert {pid: verdicts(c) for pid, c in clients.items()} == {p: want for p in pids}

        # a changed register, then SIGHUP: both switch to a new file, the old one goes
        write_register(reg, "20260102_000000", [LOST, PAIRED])
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len([r for r in log_lines(out) if r.get("event") == "reloaded"]) == 2,
                   "both workers reloaded", 60, proc)
        files = sorted(private.glob("*.snap"))
        assert len(files) == 1 and files[0] != snap and not snap.exists()
        for pid in pids:  # the old mapping is gone with the old register, not just unlinked
            assert mapped(pid, private) == {str(files[0])}, pid
        want = (WHITELISTED, BLACKLISTED, WHITELISTED, GREYLISTED, WHITELISTED, BLACKLISTED)
        assert {pid: verdicts(c) for pid, c in clients.items()} == {p: want for p in pids}
        # one of the workers built it (under the lock), the other waited and mapped it
        builders = [r["worker"] for r in log_lines(out)
                    if r.get("event") == "register snapshot built"]
        assert builders[0] == -1 and len(builders) == 2 and builders[1] in (0, 1), builders
        assert "eir_register_version 2.0260102e+13" in http_get(mport, "/metrics")[1]
        for c in clients.values():
            c.close()
    finally:
        stop(proc)
    assert proc.returncode == 0


def test_no_place_for_the_snapshot_each_worker_loads_and_it_is_said_once(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    write_register(reg, "20260101_000000", [STOLEN])
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    port, mport = free_port(), free_port()
    proc, out = serve(tmp_path, "--workers", "2", "--register", str(reg),
                      "--register-snapshot-dir", str(blocker),
                      "--diameter-listen", f"127.0.0.1:{port}",
                      "--metrics-listen", f"127.0.0.1:{mport}", env={})
    try:
        wait_until(lambda: ready(mport), "ready", 60, proc)
        lines = log_lines(out)
        warned = [r for r in lines if "snapshot unavailable" in str(r.get("event"))]
        assert len(warned) == 1 and warned[0]["worker"] == -1 and warned[0]["level"] == "warning"
        loaded = [r for r in lines if r.get("event") == "register loaded"]
        assert sorted(r["worker"] for r in loaded) == [0, 1]
        assert all("snapshot" not in r for r in loaded)
        c = S13Client(port)
        assert c.status(STOLEN) == BLACKLISTED and c.status(CLEAN) == WHITELISTED
        c.close()
        # and a reload still works, per worker, without another warning
        write_register(reg, "20260102_000000", [CLEAN])
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len([r for r in log_lines(out) if r.get("event") == "reloaded"]) == 2,
                   "both workers reloaded", 60, proc)
        c = S13Client(port)
        assert c.status(STOLEN) == WHITELISTED and c.status(CLEAN) == BLACKLISTED
        c.close()
        assert len([r for r in log_lines(out)
                    if "snapshot unavailable" in str(r.get("event"))]) == 1
    finally:
        stop(proc)


def test_one_worker_maps_the_snapshot_and_a_restart_reuses_it(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    write_register(reg, "20260101_000000", [STOLEN])
    snapdir = tmp_path / "snapshots"
    port, mport = free_port(), free_port()
    args = ("--register", str(reg), "--register-snapshot-dir", str(snapdir),
            "--diameter-listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{mport}")
    for run in range(2):
        proc, out = serve(tmp_path, *args, env={})
        try:
            wait_until(lambda: ready(mport), "ready", 60, proc)
            files = list(snapdir.glob("*/*.snap"))
            assert len(files) == 1
            if run == 0:
                first = (files[0], files[0].stat().st_mtime_ns)
            else:  # not built again: the same file, untouched
                assert (files[0], files[0].stat().st_mtime_ns) == first
            assert mapped(proc.pid, files[0].parent) == {str(files[0])}
            c = S13Client(port)
            assert c.status(STOLEN) == BLACKLISTED and c.status(CLEAN) == WHITELISTED
            c.close()
        finally:
            stop(proc)

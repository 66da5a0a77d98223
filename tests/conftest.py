"""Shared fixtures: real redis-server processes (single, Sentinel, Cluster) on free ports.

No Redis mocks anywhere: a missing redis-server is a test FAILURE (CI installs it via .ci/run).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import settings

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

# Hypothesis' per-example deadline is a wall-clock assertion: on a loaded 2-core CI machine it
# fails tests that found no bug. Correctness is what the property tests check; speed is measured
# in benchmarks/.
settings.register_profile("eir", deadline=None)
settings.load_profile("eir")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProc:
    """One redis-server child process; can be stopped and restarted on the same port."""

    def __init__(self, workdir: Path, port: int | None = None, extra: tuple[str, ...] = ()) -> None:
        if not os.access(REDIS_SERVER, os.X_OK):
            pytest.fail(f"redis-server not found at {REDIS_SERVER}: install it (.ci/run does)")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, conf: Path | None = None) -> RedisProc:
        args = [REDIS_SERVER] + ([str(conf)] if conf else [])
        args += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        if conf is None:
            args += ["--save", "", "--appendonly", "no"]
        args += list(self.extra)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        while True:
            try:
                if client.ping():
                    break
            except redis.exceptions.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)
        client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProc]:
    proc = RedisProc(tmp_path_factory.mktemp("redis")).start()
    yield proc
    proc.stop()


@pytest.fixture
def redis_url(redis_server: RedisProc) -> str:
    """URL of the session's redis-server, emptied before each test."""
    with contextlib.closing(redis_server.client()) as c:
        c.flushall()
    return redis_server.url


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[type]:
    """Start dedicated servers (for tests that kill and restart Redis)."""
    procs: list[RedisProc] = []

    class Factory:
        @staticmethod
        def start(port: int | None = None) -> RedisProc:
            p = RedisProc(tmp_path / f"r{len(procs)}", port).start()
            procs.append(p)
            return p

    yield Factory
    for p in procs:
        p.stop()


@contextlib.contextmanager
def cluster_nodes(base: Path) -> Iterator[list[RedisProc]]:
    """A 3-master Redis Cluster (no replicas) under `base`; yields its nodes."""
    nodes = []
    bus_ports = []
    for i in range(3):
        bus_ports.append(free_port())
        p = RedisProc(
            base / f"n{i}",
            # An explicit bus port: the default (port + 10000) may be taken or out of range.
            extra=(
                "--cluster-enabled", "yes",
                "--cluster-port", str(bus_ports[-1]),
                "--cluster-config-file", str(base / f"nodes{i}.conf"),
            ),
        )  # fmt: skip
        nodes.append(p.start())
    try:
        step = 16384 // 3
        for i, p in enumerate(nodes):
            hi = 16383 if i == 2 else (i + 1) * step - 1
            with contextlib.closing(p.client()) as c:
                # Distinct config epochs from the start, as redis-cli --cluster create sets
                # them: left at 0, the nodes resolve the collision by bumping epochs while
                # the tests run, and a bump can make a stale slot claim win over a migration
                # (the new owner then drops the slot's keys).
                c.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * step, hi)
        with contextlib.closing(nodes[0].client()) as c:
            for p, bus in zip(nodes[1:], bus_ports[1:], strict=True):
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", p.port, bus)
        deadline = time.monotonic() + 20
        for p in nodes:
            with contextlib.closing(p.client()) as c:
                while b"cluster_state:ok" not in c.execute_command("CLUSTER", "INFO"):
                    if time.monotonic() > deadline:
                        pytest.fail("redis cluster did not converge")
                    time.sleep(0.05)
        # All nodes must also agree on the slot map before clients rely on MOVED-free routing.
        time.sleep(0.5)
        yield nodes
    finally:
        for p in nodes:
            p.stop()


def cluster_url(nodes: list[RedisProc]) -> str:
    return "redis+cluster://" + ",".join(f"127.0.0.1:{p.port}" for p in nodes)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A 3-master Redis Cluster (no replicas); yields a redis+cluster:// URL."""
    with cluster_nodes(tmp_path_factory.mktemp("cluster")) as nodes:
        yield cluster_url(nodes)


@pytest.fixture
def redis_cluster_url(redis_cluster: str) -> str:
    from eir_server.store.urls import parse_store_url, sync_client

    c = sync_client(parse_store_url(redis_cluster), 5)
    c.flushall(target_nodes=c.PRIMARIES)
    c.close()
    return redis_cluster


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A master plus one Sentinel monitoring it as `eirmaster`; yields a redis+sentinel:// URL."""
    base = tmp_path_factory.mktemp("sentinel")
    master = RedisProc(base / "master").start()
    sport = free_port()
    conf = base / "sentinel.conf"
    conf.write_text(
        f"port {sport}\nbind 127.0.0.1\ndir {base}\n"
        f"sentinel monitor eirmaster 127.0.0.1 {master.port} 1\n"
        "sentinel down-after-milliseconds eirmaster 1000\n"
    )
    sentinel = RedisProc(base / "s", port=sport, extra=("--sentinel",))
    sentinel.start(conf)
    try:
        s = redis.Redis(port=sport)
        deadline = time.monotonic() + 10
        while not s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "eirmaster"):
            if time.monotonic() > deadline:
                pytest.fail("sentinel did not learn the master")
            time.sleep(0.05)
        s.close()
        yield f"redis+sentinel://127.0.0.1:{sport}/eirmaster"
    finally:
        sentinel.stop()
        master.stop()


class SentinelGroup:
    """A master, one replica and `n` Sentinels (quorum: majority) monitoring them as `service`,
    with short down-after / failover timeouts: for tests that kill the master."""

    def __init__(self, base: Path, n: int = 3, service: str = "eirfo") -> None:
        self.base = base
        self.n = n
        self.service = service
        # No 5 s wait for more replicas before the initial diskless sync.
        self.master = RedisProc(base / "master", extra=("--repl-diskless-sync-delay", "0"))
        self.replica = RedisProc(
            base / "replica", extra=("--replicaof", "127.0.0.1", str(self.master.port))
        )
        self.sentinels: list[RedisProc] = []

    def start(self) -> SentinelGroup:
        base, n, service = self.base, self.n, self.service
        self.master.start()
        self.replica.start()
        self._wait(lambda: self._info(self.replica)["master_link_status"] == "up", "replication")
        for i in range(n):
            sport = free_port()
            conf = base / f"sentinel{i}.conf"  # Sentinel rewrites its config: one file each
            conf.write_text(
                f"port {sport}\nbind 127.0.0.1\n"
                f"sentinel monitor {service} 127.0.0.1 {self.master.port} {n // 2 + 1}\n"
                # Much lower and a busy host makes Sentinels flag the new master s_down.
                f"sentinel down-after-milliseconds {service} 1000\n"
                f"sentinel failover-timeout {service} 3000\n"
            )
            proc = RedisProc(base / f"s{i}", port=sport, extra=("--sentinel",))
            self.sentinels.append(proc.start(conf))
        # Every Sentinel knows the replica and its peers (hello messages, every 2 s).
        for sproc in self.sentinels:
            with contextlib.closing(sproc.client()) as c:

                def ready(c: redis.Redis = c) -> bool:
                    m = c.sentinel_master(service)
                    return m["num-slaves"] == 1 and m["num-other-sentinels"] == n - 1

                self._wait(ready, f"sentinel on {sproc.port} to see the replica and its peers")
        return self

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p.port}" for p in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}"

    @staticmethod
    def _info(proc: RedisProc) -> dict[str, object]:
        with contextlib.closing(redis.Redis(port=proc.port, socket_timeout=1)) as c:
            return c.info("replication")

    @staticmethod
    def _wait(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if cond():
                    return
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.05)

    def master_port(self) -> int | None:
        """The master's port when every Sentinel names it and sees it healthy (flags exactly
        `master`: not s_down, o_down, disconnected or in a failover); None otherwise."""
        ports = set()
        for sproc in self.sentinels:
            with contextlib.closing(redis.Redis(port=sproc.port, socket_timeout=1)) as c:
                m = c.sentinel_master(self.service)
                ports.add(m["port"] if m["flags"] == "master" else None)
        return ports.pop() if len(ports) == 1 else None

    def wait_replicated(self) -> None:
        """Block until the replica has every write the master acknowledged so far."""
        with contextlib.closing(self.master.client()) as c:
            assert c.execute_command("WAIT", 1, 5000) == 1, "replica did not acknowledge"

    def kill_master_and_wait_failover(self, timeout: float = 15.0) -> RedisProc:
        """SIGKILL the master; return the promoted replica once it is master and every
        Sentinel names it as a healthy master."""
        self.master.stop()
        self._wait(
            lambda: (
                self.master_port() == self.replica.port
                and self._info(self.replica)["role"] == "master"
            ),
            "Sentinel to promote the replica",
            timeout,
        )
        return self.replica

    def stop(self) -> None:
        for p in (*self.sentinels, self.replica, self.master):
            p.stop()


@pytest.fixture
def redis_sentinel_failover(tmp_path: Path) -> Iterator[SentinelGroup]:
    """A dedicated master + replica + 3 Sentinels (service `eirfo`) that a test may fail over:
    `.url` (redis+sentinel:// naming every Sentinel), `.wait_replicated()`,
    `.kill_master_and_wait_failover()`."""
    group = SentinelGroup(tmp_path / "failover")
    try:
        yield group.start()
    finally:
        group.stop()


# ---------------------------------------------------------------------------------------------
# DIRBS-style register files for store and sync tests

HEADERS = {
    "blacklist": "imei,block_date,reasons",
    "notifications": "imei,imsi,msisdn,block_date,reasons,amnesty_granted",
    "exceptions": "imei,imsi,msisdn",
}


class Dirbs:
    """Writes register zips the way a DIRBS list generator publishes them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def publish(
        self,
        list_name: str,
        ts: str,
        rows: list[list[str]] | None = None,
        deltas: dict[str, list[list[str]]] | None = None,
        base: str | int = -1,
        run: str | int | None = None,
        raw_full: bytes | None = None,
        checksum: str | None = None,
    ) -> Path:
        import hashlib
        import zipfile

        kind = list_name.split("_")[0]
        path = self.root / f"{ts}_{list_name}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            full = raw_full
            if full is None:
                full = (
                    "\n".join([HEADERS[kind]] + [",".join(r) for r in rows or []]) + "\n"
                ).encode()
            zf.writestr(f"{ts}_{list_name}.csv", full)
            for reason, drows in (deltas or {}).items():
                body = "\n".join([HEADERS[kind]] + [",".join(r) for r in drows]) + "\n"
                zf.writestr(f"{ts}_{list_name}_delta_{base}_{run}_{reason}.csv", body)
        if checksum:
            digest = hashlib.new(checksum, path.read_bytes()).hexdigest()
            (self.root / (path.name + "." + checksum)).write_text(f"{digest}  {path.name}\n")
        return path


@pytest.fixture
def dirbs(tmp_path: Path) -> Dirbs:
    return Dirbs(tmp_path / "register")


@pytest.fixture
def sync_dir():  # noqa: ANN201
    """sync_dir(store_url, directory, **SyncOptions fields) -> RunResult (grace 0)."""
    from eir_server.store.urls import parse_store_url
    from eir_server.sync.engine import SyncOptions, run_once
    from eir_server.sync.redis_db import RegisterDB
    from eir_server.sync.source import DirSource

    dbs = []

    def run(url: str, directory: Path, **opts: object):  # noqa: ANN202
        target = parse_store_url(url)
        db = RegisterDB(target, target.options.get("namespace", "eir"))
        dbs.append(db)
        return run_once(DirSource(directory), db, SyncOptions(**{"grace": 0.0, **opts}))

    yield run
    for db in dbs:
        db.close()

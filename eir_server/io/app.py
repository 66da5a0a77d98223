"""Process lifecycle for `eir-server serve`: build a worker from the config, run it, stop it in
order on SIGTERM; with `--workers N`, a parent that forks N workers and serves node metrics."""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import gc
import json
import os
import re
import shutil
import signal
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import structlog

from .. import build_kind
from ..checker import FALLBACK_ERRORS, EquipmentChecker
from ..config import ServeConfig, parse_hostport
from ..diameter.answers import Identity
from ..diameter.connection import PeerConfig
from ..diameter.dedup import DuplicateCache
from ..diameter.dictionary import load_dictionary
from ..obs.audit import AuditRecorder, DeviceChangeDetector, make_sink
from ..obs.health import make_readiness
from ..obs.logging import get_logger
from ..obs.metrics import Metrics
from ..obs.server import (
    MetricsAggregator,
    start_metrics_server,
    start_worker_snapshot_server,
    worker_socket_path,
)
from ..policy import (
    LoadError,
    Policy,
    PolicyConfig,
    TacDatabase,
    load_policy,
    parse_status,
)
from ..store import MemoryStore, open_store
from ..store.register import RegisterError
from ..store.register_snapshot import SnapshotUnavailable, resolve_dir
from .diameter_server import DiameterNode, NodeLimits
from .http_server import resolve_nf_instance_id, start_n5g_eir
from .tls import server_context

log = get_logger("eir_server.app")


def build_policy(cfg: ServeConfig) -> Any:
    table = dict(cfg.policy)
    if "unknown_equipment" in table:
        raise ValueError("set unknown_equipment at the top level (or --unknown-equipment), "
                         "not in [policy]")
    table["unknown_equipment"] = cfg.unknown_equipment
    return load_policy(PolicyConfig.from_mapping(table))


async def run_worker(cfg: ServeConfig, index: int = 0, runtime_dir: str | None = None,
                     origin_state_id: int | None = None,
                     started: asyncio.Event | None = None,
                     stop: asyncio.Event | None = None,
                     policy: Any = None,
                     reload: Callable[[], ServeConfig] | None = None,
                     register_snapshot: bool = True) -> DiameterNode:
    """Run one full node until SIGTERM/SIGINT (or `stop` is set); returns the stopped node.
    `policy`: one already built from `cfg` (else it is built here). SIGHUP reloads the policy
    (from `reload()`, the configuration read again) and the embedded register.
    `register_snapshot` False: the parent found no place for the register's snapshot file."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    structlog.contextvars.bind_contextvars(worker=index)
    if policy is None:
        policy = build_policy(cfg)
    store = open_store(cfg.store if cfg.store != "memory://" else None, cfg.register or None,
                       **store_options(cfg, register_snapshot))
    await store.start()
    started_at = time.time()
    checker = EquipmentChecker(policy, store, store_fallback(cfg))
    metrics = Metrics()
    metrics.worker_label = str(index)
    metrics.store_kind = getattr(store, "name", "")
    # The checker counts every fallback verdict (store unreachable, or a lookup that failed
    # otherwise); the store's own stats say the rest.
    metrics.set_gauge_callback(
        "store", lambda: {**store.stats.as_dict(), "fallback_verdicts": checker.fallbacks,
                          "fallback_episodes": checker.episodes,
                          # Redis down with a last-known-good snapshot answering is no fallback.
                          # An episode ends with the next verdict from the store; on an idle
                          # node that may be long after the store is back: not active then.
                          "fallback_active": int(
                              (checker.fallback_active
                               and not (store.ready and store.version is not None))
                              or not (store.ready or store.stats.redis_up))})
    metrics.set_gauge_callback("register", lambda: register_info(store, started_at))
    metrics.set_gauge_callback("queue_depth", lambda: store.queue_depth)
    sync_runs = SyncRuns(store) if getattr(store, "name", "") == "redis" else None
    if sync_runs is not None:
        metrics.set_gauge_callback("sync", lambda: sync_runs.info)
    identity = Identity(cfg.origin_host, cfg.origin_realm,
                        origin_state_id if origin_state_id is not None else int(time.time()))
    peer_cfg = PeerConfig(
        identity=identity,
        host_ip_addresses=cfg.host_ips(),
        allowed_hosts=tuple(p.strip() for p in cfg.allowed_peers.split(",") if p.strip()),
        allowed_networks=tuple(n.strip() for n in cfg.allowed_networks.split(",") if n.strip()),
        watchdog_interval=cfg.watchdog_interval,
        max_message_length=cfg.max_message_length,
    )
    tac_task = None
    if hasattr(store, "tac_file") and not policy.config.tac_database_file:
        tac_task = asyncio.ensure_future(_follow_tac_file(store, cfg, checker))
    recorder = _audit_recorder(cfg, metrics)
    if recorder is not None and recorder.detector is not None:
        metrics.set_gauge_callback("device_signals", recorder.detector.tracked)
    node = DiameterNode(peer_cfg, load_dictionary(), checker, metrics,
                        DuplicateCache(cfg.duplicate_window, cfg.duplicate_max_entries,
                                       cfg.duplicate_max_bytes),
                        audit=recorder.record_now if recorder is not None else None,
                        max_in_flight=cfg.max_in_flight,
                        limits=NodeLimits(
                            max_connections=cfg.max_connections,
                            max_connections_per_source=cfg.max_connections_per_source,
                            tls_handshake_timeout=cfg.tls_handshake_timeout,
                            tls_peer_identity=cfg.tls_peer_identity == "origin-host",
                            origin_host_check=cfg.origin_host_check,
                            write_stall_timeout=cfg.write_stall_timeout,
                            overload_target=cfg.overload_target_delay))
    if recorder is not None:
        recorder.start()
    if cfg.diameter_listen:  # empty: TLS only
        host, port = parse_hostport(cfg.diameter_listen, "diameter_listen")
        await node.start(host, port, reuse_port=cfg.workers > 1)
    if cfg.diameter_tls_listen:
        thost, tport = parse_hostport(cfg.diameter_tls_listen, "diameter_tls_listen")
        await node.start(thost, tport, reuse_port=cfg.workers > 1, ssl=tls_context(cfg))
    server = node.servers[0]
    n5g_eir = await start_n5g_eir(cfg, metrics, node, index)
    readiness = make_readiness(
        listening=server.is_serving,
        store_reachable=lambda: bool(store.ready),
        # While misses get the fallback answer, not ready unless configured otherwise.
        fallback_allowed=cfg.ready_during_fallback == "on",
        register_timestamp=lambda: register_info(store, started_at)["date"],
        # A Redis store holding no register answers every miss with --store-fallback (a
        # fallback episode): not ready unless --ready-during-fallback on (docs/operations.md).
        # Only the embedded store of a lab serves the default verdict and is ready without one.
        register_required=cfg.max_register_age > 0 or (
            getattr(store, "name", "") != "memory" and cfg.ready_during_fallback != "on"),
        max_register_age=cfg.max_register_age or None,
    )
    metrics_server = None
    if runtime_dir is not None:
        metrics_server = await start_worker_snapshot_server(
            metrics, worker_socket_path(runtime_dir, index), readiness=readiness)
    elif cfg.metrics_listen:
        mhost, mport = parse_hostport(cfg.metrics_listen, "metrics_listen")
        metrics_server = await start_metrics_server(metrics, mhost, mport, readiness=readiness)
    _settle_gc()
    sockets = [s.getsockname() for srv in node.servers for s in srv.sockets]
    log.info("diameter_listening", worker=index, addresses=[f"{a[0]}:{a[1]}" for a in sockets],
             origin_host=cfg.origin_host, origin_realm=cfg.origin_realm, store=store.name,
             metrics=cfg.metrics_listen if runtime_dir is None else "parent", build=build_kind())
    reloader = Reloader(cfg, reload, store, checker, tac_from_store=tac_task is not None,
                        worker=index)
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGHUP, reloader.request)
    if started is not None:
        started.set()
    await stop.wait()
    await reloader.wait()
    log.info("shutting_down", worker=index, peers=node.peers_open(),
             in_flight=node.in_flight)
    await node.shutdown(cfg.shutdown_timeout)
    await n5g_eir.stop(cfg.shutdown_timeout)
    if tac_task is not None:
        tac_task.cancel()
    if sync_runs is not None:
        await sync_runs.close()
    if recorder is not None:
        await recorder.close()
    if metrics_server is not None:
        metrics_server.close()
        with contextlib.suppress(Exception):
            await metrics_server.wait_closed()
    await store.close()
    log.info("stopped", worker=index)
    return node


def _embedded(cfg: ServeConfig) -> bool:
    return cfg.store.strip() in ("", "memory://", "memory:")


def register_options(cfg: ServeConfig, snapshot: bool = True) -> dict[str, Any]:
    """Store options for the embedded register: where its node-shared snapshot is kept
    (`snapshot` False: nowhere, the register is loaded into this process)."""
    if not _embedded(cfg) or not cfg.register:
        return {}
    return {"snapshot_dir": resolve_dir(cfg.register_snapshot_dir) if snapshot else None}


def store_options(cfg: ServeConfig, register_snapshot: bool = True) -> dict[str, Any]:
    """open_store's options: the embedded register's, or Redis's --store-snapshot-dir."""
    if _embedded(cfg):
        return register_options(cfg, register_snapshot)
    return {"snapshot_dir": cfg.store_snapshot_dir} if cfg.store_snapshot_dir else {}


def prepare_register(cfg: ServeConfig) -> bool:
    """Before the workers fork: build the embedded register's snapshot once, so that no worker
    parses the register (they map this file). False when it cannot be had: said once here, and
    each worker then loads the register itself, as without a snapshot."""
    options = register_options(cfg)
    if options.get("snapshot_dir") is None:
        return True
    structlog.contextvars.bind_contextvars(worker=-1)  # the parent's lines, as in Supervisor
    store = MemoryStore(cfg.register, **options)
    started = time.monotonic()
    try:
        path = store.prepare_snapshot()
    except SnapshotUnavailable as e:
        log.warning("register snapshot unavailable: every worker loads the register itself "
                    "(memory per worker)", snapshot_dir=str(options["snapshot_dir"]),
                    error=str(e))
        return False
    except (OSError, RegisterError) as e:
        # The workers load it and fail the same way, as without a snapshot.
        log.error("register not loaded", path=cfg.register, error=str(e))
        return True
    log.info("register snapshot ready", snapshot=str(path),
             seconds=round(time.monotonic() - started, 2))
    return True


def store_fallback(cfg: ServeConfig) -> Any:
    """--store-fallback as the checker takes it: an error answer name, or a status."""
    if cfg.store_fallback in FALLBACK_ERRORS:
        return cfg.store_fallback
    return parse_status(cfg.store_fallback, "store_fallback")


# Options a SIGHUP applies without a restart; any other change is logged as needing one.
RELOADABLE = frozenset({"unknown_equipment", "store_fallback", "register", "policy"})


def restart_only_changes(old: ServeConfig, new: ServeConfig) -> list[str]:
    return [f.name for f in fields(ServeConfig)
            if f.name not in RELOADABLE and getattr(old, f.name) != getattr(new, f.name)]


class Reloader:
    """SIGHUP in a worker: read the configuration again, build the policy, reload the embedded
    register, then swap them in (one assignment each). A failure is logged and changes
    nothing: the worker keeps serving what it had."""

    def __init__(self, cfg: ServeConfig, reload: Callable[[], ServeConfig] | None, store: Any,
                 checker: EquipmentChecker, *, tac_from_store: bool, worker: int) -> None:
        self.cfg = cfg
        self.reload = reload
        self.store = store
        self.checker = checker
        self.tac_from_store = tac_from_store
        self.worker = worker
        self.task: asyncio.Task[None] | None = None
        self.again = False

    def request(self) -> None:
        if self.task is not None and not self.task.done():
            self.again = True  # one more pass after the running one
            return
        self.task = asyncio.ensure_future(self._run())

    async def wait(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task

    async def _run(self) -> None:
        while True:
            self.again = False
            await self._reload_once()
            if not self.again:
                return

    async def _reload_once(self) -> None:
        try:
            new = self.reload() if self.reload is not None else self.cfg
            policy = build_policy(new)
            if self.tac_from_store and not policy.config.tac_database_file:
                # keep the GSMA TAC database the store delivered
                policy = Policy(policy.config, policy.local, self.checker.policy.tacs)
            store = self.store
            if getattr(store, "name", "") == "memory" and new.register:
                await asyncio.to_thread(store.load_register_dir, new.register)
                store.loaded_at = time.time()
        except Exception as e:  # noqa: BLE001 - a bad reload never takes the worker down
            log.error("reload_failed", worker=self.worker, error=f"{type(e).__name__}: {e}")
            return
        self.checker.policy = policy
        # the checker builds the fallback verdict; take it from a throwaway one
        self.checker.fallback = EquipmentChecker(policy, store, store_fallback(new)).fallback
        needs_restart = restart_only_changes(self.cfg, new)
        log.info("reloaded", worker=self.worker, register_version=self.store.version,
                 unknown_equipment=new.unknown_equipment, store_fallback=new.store_fallback,
                 not_applied_until_restart=needs_restart)


TAC_POLL_INTERVAL = 30.0
SYNC_POLL_INTERVAL = 15.0


class SyncRuns:
    """The run records `eir-server sync` leaves in Redis, read every SYNC_POLL_INTERVAL s for
    the eir_sync_* metrics: a `sync --once` (CronJob, timer) exits before any scrape, but its
    record stays, so its outcome is still scraped, from every EIR, without a pushgateway."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.info: dict[str, Any] = {}
        self.client: Any = None
        self.task = asyncio.ensure_future(self._poll())

    async def _poll(self) -> None:
        from ..store import layout
        from ..store.urls import async_client

        ns = getattr(self.store, "ns", "eir")
        while True:
            try:
                if self.client is None:
                    self.client = async_client(self.store.target, 2.0)
                counts = await self.client.hgetall(layout.run_counts_key(ns))
                recent = await self.client.lrange(layout.runs_key(ns), 0, 99)
                self.info = summarize_runs(counts, recent)
            except Exception as e:  # noqa: BLE001 - Redis down: the store reports it
                log.debug("sync_runs_unreadable", error=repr(e))
            await asyncio.sleep(SYNC_POLL_INTERVAL)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()


def summarize_runs(counts: dict[bytes, bytes], recent: list[bytes]) -> dict[str, Any]:
    """Redis run counts and records (newest first) -> the "sync" metrics callback's mapping."""
    from ..store.layout import run_result

    runs = [json.loads(r) for r in recent]
    info: dict[str, Any] = {"runs": {k.decode(): int(v) for k, v in counts.items()}}
    if runs:
        newest = runs[0]
        info["last_run"] = float(newest.get("finished") or 0)
        info["last_duration"] = float(newest.get("duration_s") or 0)
        info["last_failed"] = 1 if run_result(newest) in ("failed", "refused") else 0
        ok = [r for r in runs if run_result(r) in ("full", "delta", "noop")]
        if ok:
            info["last_success"] = float(ok[0].get("finished") or 0)
    return info


async def _follow_tac_file(store: Any, cfg: ServeConfig, checker: EquipmentChecker) -> None:
    """Serve with the GSMA TAC database that `eir-server sync` put in Redis (unless the
    configuration names a local file): load it at start, then whenever its checksum changes,
    swap in a new Policy (policies are immutable; the swap is one assignment)."""
    served = None
    while True:
        found = await store.tac_file()
        if found is not None and found[0] != served:
            sha, text = found
            try:
                # Parsed off the loop: a national TAC file has ~10^5 lines.
                tacs = await asyncio.to_thread(TacDatabase.parse_gsma, text.splitlines(),
                                               source=f"redis:{sha[:12]}")
                checker.policy = Policy(checker.policy.config, checker.policy.local, tacs)
                served = sha
                gc.freeze()  # the new tables live until the next TAC file: keep GC walks short
                log.info("tac_database_loaded", sha256=sha, bad_lines=len(tacs.bad_lines))
            except (ValueError, LoadError) as e:
                log.error("tac_database_refused", sha256=sha, error=str(e))
                served = sha  # do not retry the same bad file every poll
        await asyncio.sleep(TAC_POLL_INTERVAL)


GC_PAUSE_LOG = 0.05  # seconds: a collection this long is visible in answer latency


def _settle_gc() -> None:
    """Everything built at start (register, policy tables, dictionaries) lives as long as the
    process: move it out of the cyclic collector's reach, so that a full collection walks only
    what was allocated since. The hot path keeps its long-lived data in GC-untracked form
    (tuples of atomics), so full collections stay short; the ones that are not get logged."""
    gc.collect()
    gc.freeze()
    started: list[float] = [0.0]

    def timing(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            took = time.perf_counter() - started[0]
            if took >= GC_PAUSE_LOG:
                log.warning("gc_pause", generation=info.get("generation"),
                            seconds=round(took, 3), collected=info.get("collected"))

    gc.callbacks.append(timing)


def tls_context(cfg: ServeConfig) -> ssl.SSLContext:
    """Server-side TLS for Diameter: peer certificates verified against `tls_ca` if given."""
    return server_context(cfg.tls_cert, cfg.tls_key, cfg.tls_ca)


_REGISTER_TS = re.compile(r"(\d{8}_\d{6})")


def register_timestamp(ts: str | None) -> float | None:
    """A register run timestamp (YYYYMMDD_HHMMSS, UTC, as in its file names) -> unix seconds."""
    m = _REGISTER_TS.fullmatch(ts or "")
    if m is None:
        return None
    return calendar.timegm(time.strptime(m.group(1), "%Y%m%d_%H%M%S"))


def _list_of(source: str) -> str:
    """The register list a file belongs to (blacklist, notifications_<op>...), not its name."""
    name = source.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
    m = re.match(r"\d{8}_\d{6}_(.+?)(?:_delta_.*)?\.(?:csv|zip)$", name)
    return m.group(1) if m else name


def register_info(store: Any, started_at: float) -> dict[str, Any]:
    """What the node serves, for /readyz, /status and the register gauges; the same meaning on
    both stores:
      date: the register's own date (the newest run timestamp of the list files served), unix
            seconds; None when no register is served. /readyz ages this, not process start.
      version: that date as a number YYYYMMDDHHMMSS (eir_register_version).
      store_version: the store's own id (Redis: the version counter; embedded: the run stamp).
      last_sync: when this node's data last changed (Redis: the switch by `eir-server sync`;
            embedded: the load at start or SIGHUP)."""
    meta = getattr(store, "meta", None) or {}
    lists: dict[str, Any] = {}
    if meta.get("lists"):
        with contextlib.suppress(ValueError):
            lists = json.loads(meta["lists"])
    rows: dict[tuple[str, str], int] = {}
    stamps: list[str] = []
    for name, info in lists.items():
        if isinstance(info, dict):
            if "rows" in info:
                rows[(name, "applied")] = int(info["rows"])
            if info.get("ts"):
                stamps.append(str(info["ts"]))
    for report in getattr(store, "reports", None) or ():
        lst = _list_of(report.source)
        rows[(lst, "applied")] = rows.get((lst, "applied"), 0) + report.rows
        rows[(lst, "rejected")] = rows.get((lst, "rejected"), 0) + report.bad
    if getattr(store, "name", "") == "memory":
        stamps.append(str(store.version or ""))
        last_sync = getattr(store, "loaded_at", None) or (started_at if store.version else None)
    else:
        last_sync = float(meta["created"]) if meta.get("created") else None
    newest = max((s for s in stamps if register_timestamp(s) is not None), default=None)
    date = register_timestamp(newest)
    return {"version": int(newest.replace("_", "")) if newest else None,
            "store_version": store.version, "date": date, "last_sync": last_sync,
            "rows": rows}


def _audit_recorder(cfg: ServeConfig, metrics: Metrics) -> AuditRecorder | None:
    """Observations are written off the hot path in batches; the device-change detector sees
    every check even when auditing is off or sampled."""
    detector = (DeviceChangeDetector(metrics, max_imsis=cfg.device_signal_max_imsis,
                                     window=cfg.device_signal_window,
                                     max_tracked=cfg.device_signal_max_devices,
                                     log_identities=cfg.log_identities == "on")
                if cfg.device_signals == "on" else None)
    sink = (make_sink(cfg.store, audit_dir=cfg.audit_dir or None)
            if cfg.audit == "on" else None)
    if sink is None and detector is None:
        return None
    return AuditRecorder(metrics, sink, sample=cfg.audit_sample, detector=detector)


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def serve(cfg: ServeConfig, reload: Callable[[], ServeConfig] | None = None) -> int:
    """Run `eir-server serve`. `reload` re-reads the configuration (file and environment) on
    SIGHUP; without it SIGHUP re-applies `cfg` (the embedded register is read again)."""
    _use_uvloop()
    policy = build_policy(cfg)  # fail fast on a bad [policy] before forking
    # Fail fast on a store the workers could never open (e.g. --register with a Redis URL):
    # the parent exits with one line instead of respawning workers that die the same way.
    open_store(cfg.store if cfg.store != "memory://" else None, cfg.register or None)
    # SIGHUP's default action kills the process; ignore it until a loop handles it, so a
    # reload request arriving during start-up (or at a worker being forked) is never fatal.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    cfg = resolve_nf_instance_id(cfg)  # before forking: one NF instance id for every worker
    if reload is not None:  # a re-read configuration names the same NF instance
        read_again = reload

        def reload() -> ServeConfig:
            return resolve_nf_instance_id(read_again())
    if cfg.workers == 1:
        asyncio.run(run_worker(cfg, policy=policy, reload=reload))
        return 0
    return Supervisor(cfg, reload, register_snapshot=prepare_register(cfg)).run()


# Restart policy for crashed workers: a worker that lived less than WORKER_STABLE_AFTER seconds
# counts as a failed start; each failed start doubles the wait before the next one, from
# RESTART_BACKOFF_MIN up to RESTART_BACKOFF_MAX. CRASH_LOOP_AFTER failed starts in a row make
# /healthz fail, so an orchestrator replaces the node instead of it limping on forever.
RESTART_BACKOFF_MIN = 1.0
RESTART_BACKOFF_MAX = 60.0
WORKER_STABLE_AFTER = 30.0
CRASH_LOOP_AFTER = 3

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """In a forked worker: get SIGTERM (a clean shutdown with DPRs) when the parent dies, so a
    killed parent never leaves workers holding the Diameter port."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux: the pipe check remains
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


@dataclass
class WorkerSlot:
    """The parent's view of worker `index` (times are monotonic seconds)."""

    index: int
    pid: int | None = None
    started_at: float = 0.0
    failures: int = 0  # failed starts in a row
    restart_at: float = 0.0
    restarts: int = 0
    last_exit: str = ""

    def exited(self, now: float, status: int) -> float:
        """Record an exit; returns the delay before the next start."""
        lived = now - self.started_at
        self.pid = None
        self.last_exit = describe_exit(status)
        self.failures = self.failures + 1 if lived < WORKER_STABLE_AFTER else 1
        delay = min(RESTART_BACKOFF_MIN * 2 ** (self.failures - 1), RESTART_BACKOFF_MAX)
        self.restart_at = now + delay
        return delay

    @property
    def crash_looping(self) -> bool:
        return self.failures >= CRASH_LOOP_AFTER


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        try:
            return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        except ValueError:
            return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


class Supervisor:
    """Parent of `--workers N` forked workers: restarts crashed ones with exponential backoff,
    serves the node's /metrics, /healthz, /readyz, /status, forwards SIGHUP (reload) and
    SIGTERM (drain), and makes its workers exit when it dies."""

    def __init__(self, cfg: ServeConfig, reload: Callable[[], ServeConfig] | None = None,
                 register_snapshot: bool = True) -> None:
        self.cfg = cfg
        self.reload = reload
        self.register_snapshot = register_snapshot
        self.runtime_dir = tempfile.mkdtemp(prefix="eir-")
        self.osi = int(time.time())  # one Origin-State-Id: the workers are one node
        self.slots = [WorkerSlot(i) for i in range(cfg.workers)]
        self.pid = os.getpid()
        self.started = time.monotonic()

    def spawn(self, slot: WorkerSlot) -> None:
        sock = worker_socket_path(self.runtime_dir, slot.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)  # its reappearance says the new worker is serving
        first_failure = slot.failures == 0
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _die_with_parent(self.pid)
                asyncio.run(run_worker(self.cfg, slot.index, self.runtime_dir, self.osi,
                                       reload=self.reload,
                                       register_snapshot=self.register_snapshot))
            except BaseException as e:  # noqa: BLE001 - one line, then the parent decides
                if first_failure:
                    log.exception("worker_crashed", worker=slot.index, error=repr(e))
                else:  # the traceback was logged at the first failure of this series
                    log.error("worker_crashed", worker=slot.index, error=repr(e))
                code = 1
            os._exit(code)
        slot.pid = pid
        slot.started_at = time.monotonic()
        slot.restarts += 1 if slot.last_exit else 0
        log.info("worker_started", worker=slot.index, pid=pid)

    def worker_up(self, slot: WorkerSlot) -> bool:
        return slot.pid is not None and os.path.exists(
            worker_socket_path(self.runtime_dir, slot.index))

    def health(self) -> tuple[bool, str]:
        """/healthz: fails when the node cannot serve: a worker crash-looping, or none up."""
        looping = [s for s in self.slots if s.crash_looping and not self.worker_up(s)]
        if looping:
            return False, "; ".join(
                f"worker {s.index} crash-looping ({s.failures} failed starts, last {s.last_exit})"
                for s in looping)
        up = sum(1 for s in self.slots if self.worker_up(s))
        if up == 0:
            return False, "no worker serving"
        return True, f"ok: {up}/{len(self.slots)} workers serving"

    def workers_status(self) -> list[dict[str, Any]]:
        return [{"worker": s.index, "pid": s.pid, "up": self.worker_up(s),
                 "restarts": s.restarts, "failed_starts": s.failures,
                 "last_exit": s.last_exit or None} for s in self.slots]

    def reap(self, stopping: bool) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            if stopping:
                slot.pid = None
                continue
            delay = slot.exited(time.monotonic(), status)
            # One line per restart, saying when the next start is.
            log.error("worker_exited", worker=slot.index, pid=pid, reason=slot.last_exit,
                      failed_starts=slot.failures, restart_in_s=delay,
                      crash_looping=slot.crash_looping)

    def run(self) -> int:
        # The parent's own lines say worker -1; each worker binds its index after the fork.
        structlog.contextvars.bind_contextvars(worker=-1)
        for slot in self.slots:
            self.spawn(slot)
        asyncio.run(self._parent())
        return 0

    async def _parent(self) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        server = None
        agg = MetricsAggregator([worker_socket_path(self.runtime_dir, i)
                                 for i in range(cfg.workers)])
        if cfg.metrics_listen:
            host, port = parse_hostport(cfg.metrics_listen, "metrics_listen")
            server = await start_metrics_server(agg, host, port, health=self.health,
                                                workers=self.workers_status)
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
            self.reap(stop.is_set())
            now = time.monotonic()
            for slot in self.slots:
                if slot.pid is None and not stop.is_set() and now >= slot.restart_at:
                    self.spawn(slot)
        await self._stop_children()
        if server is not None:
            server.close()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.runtime_dir)

    def _sighup(self) -> None:
        """Check the new configuration here first, so a broken file is reported once, by the
        parent, and the workers keep serving with what they have."""
        if self.reload is not None:
            try:
                new = self.reload()
                build_policy(new)
            except (OSError, ValueError, LoadError) as e:
                log.error("reload_refused", worker=-1, error=str(e))
                return
            changed = restart_only_changes(self.cfg, new)
            if changed:
                log.warning("reload_needs_restart", worker=-1, options=changed)
        log.info("reload_requested", worker=-1,
                 workers=[s.pid for s in self.slots if s.pid is not None])
        for slot in self.slots:
            if slot.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGHUP)

    async def _stop_children(self) -> None:
        children = {s.pid for s in self.slots if s.pid is not None}
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.shutdown_timeout + 5
        while children and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                children.discard(pid)
            else:
                await asyncio.sleep(0.05)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

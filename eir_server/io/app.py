"""Process lifecycle for `eir-server serve`: build a worker from the config, run it, stop it in
order on SIGTERM; with `--workers N`, a parent that forks N workers and serves node metrics."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import ssl
import tempfile
import time
from typing import Any

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
from ..policy import LoadError, Policy, PolicyConfig, TacDatabase, load_policy, parse_status
from ..store import open_store
from .diameter_server import DiameterNode

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
                     policy: Any = None) -> DiameterNode:
    """Run one full node until SIGTERM/SIGINT (or `stop` is set); returns the stopped node.
    `policy`: one already built from `cfg` (else it is built here)."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    if policy is None:
        policy = build_policy(cfg)
    store = open_store(cfg.store if cfg.store != "memory://" else None, cfg.register or None)
    await store.start()
    started_at = time.time()
    checker = EquipmentChecker(policy, store, cfg.store_fallback
                               if cfg.store_fallback in FALLBACK_ERRORS
                               else parse_status(cfg.store_fallback, "store_fallback"))
    metrics = Metrics()
    # The checker counts every fallback verdict (store unreachable, or a lookup that failed
    # otherwise); the store's own stats say the rest.
    metrics.set_gauge_callback(
        "store", lambda: {**store.stats.as_dict(), "fallback_verdicts": checker.fallbacks,
                          "fallback_episodes": checker.episodes})
    metrics.set_gauge_callback("register", lambda: register_info(store, started_at))
    metrics.set_gauge_callback("queue_depth", lambda: store.queue_depth)
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
    node = DiameterNode(peer_cfg, load_dictionary(), checker, metrics,
                        DuplicateCache(cfg.duplicate_window, cfg.duplicate_max_entries),
                        audit=recorder.record if recorder is not None else None,
                        max_in_flight=cfg.max_in_flight)
    if recorder is not None:
        recorder.start()
    host, port = parse_hostport(cfg.diameter_listen, "diameter_listen")
    server = await node.start(host, port, reuse_port=cfg.workers > 1)
    if cfg.diameter_tls_listen:
        thost, tport = parse_hostport(cfg.diameter_tls_listen, "diameter_tls_listen")
        await node.start(thost, tport, reuse_port=cfg.workers > 1, ssl=tls_context(cfg))
    readiness = make_readiness(
        listening=server.is_serving,
        store_reachable=lambda: bool(store.ready),
        # While misses get the fallback answer, not ready unless configured otherwise.
        fallback_allowed=cfg.ready_during_fallback == "on",
        register_timestamp=lambda: register_info(store, started_at)["last_sync"],
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
             metrics=cfg.metrics_listen if runtime_dir is None else "parent")
    if started is not None:
        started.set()
    await stop.wait()
    log.info("shutting_down", worker=index, peers=node.peers_open(),
             in_flight=node.in_flight)
    await node.shutdown(cfg.shutdown_timeout)
    if tac_task is not None:
        tac_task.cancel()
    if recorder is not None:
        await recorder.close()
    if metrics_server is not None:
        metrics_server.close()
        with contextlib.suppress(Exception):
            await metrics_server.wait_closed()
    await store.close()
    log.info("stopped", worker=index)
    return node


TAC_POLL_INTERVAL = 30.0


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
    """Server-side TLS for Diameter (RFC 6733 13.1): TLS 1.2+, our certificate, and peer
    certificates verified against `tls_ca` when one is given."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    if cfg.tls_ca:
        ctx.load_verify_locations(cfg.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def register_info(store: Any, started_at: float) -> dict[str, Any]:
    """What the node serves, for /readyz and the register gauges. Redis: the version's meta
    written by `eir-server sync` (created = when that sync switched it in). Embedded: the
    register loaded at start (a node with no register serves defaults from its start)."""
    meta = getattr(store, "meta", None) or {}
    last_sync: float | None = started_at if store.ready else None
    if meta.get("created"):
        last_sync = float(meta["created"])
    elif getattr(store, "name", "") != "memory" and store.version is None:
        last_sync = None  # Redis without any register version yet: not ready
    rows: dict[tuple[str, str], int] = {}
    lists = meta.get("lists")
    if lists:
        import json
        for name, info in json.loads(lists).items():
            if isinstance(info, dict) and "rows" in info:
                rows[(name, "applied")] = int(info["rows"])
    for report in getattr(store, "reports", None) or ():
        key = (report.source, "applied")
        rows[key] = rows.get(key, 0) + report.rows
        rows[(report.source, "rejected")] = rows.get((report.source, "rejected"), 0) + report.bad
    return {"version": store.version, "last_sync": last_sync, "rows": rows}


def _audit_recorder(cfg: ServeConfig, metrics: Metrics) -> AuditRecorder | None:
    """Observations are written off the hot path in batches; the device-change detector sees
    every check even when auditing is off or sampled."""
    detector = (DeviceChangeDetector(metrics, max_imsis=cfg.device_signal_max_imsis,
                                     window=cfg.device_signal_window)
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


def serve(cfg: ServeConfig) -> int:
    _use_uvloop()
    policy = build_policy(cfg)  # fail fast on a bad [policy] before forking
    if cfg.workers == 1:
        asyncio.run(run_worker(cfg, policy=policy))
        return 0
    return _serve_forked(cfg)


def _serve_forked(cfg: ServeConfig) -> int:
    runtime_dir = tempfile.mkdtemp(prefix="eir-")
    osi = int(time.time())  # one Origin-State-Id: the workers are one node
    children: dict[int, int] = {}

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                asyncio.run(run_worker(cfg, index, runtime_dir, osi))
            except BaseException:
                log.exception("worker_crashed", worker=index)
                code = 1
            os._exit(code)
        children[pid] = index
        log.info("worker_started", worker=index, pid=pid)

    for i in range(cfg.workers):
        spawn(i)

    async def parent() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = None
        if cfg.metrics_listen:
            host, port = parse_hostport(cfg.metrics_listen, "metrics_listen")
            agg = MetricsAggregator([worker_socket_path(runtime_dir, i)
                                     for i in range(cfg.workers)])
            server = await start_metrics_server(agg, host, port)
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            while True:  # reap and restart crashed workers
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    pid = 0
                if pid == 0:
                    break
                index = children.pop(pid, None)
                if index is not None and not stop.is_set():
                    log.error("worker_exited", worker=index, pid=pid, status=status)
                    spawn(index)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + cfg.shutdown_timeout + 5
        while children and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                children.pop(pid, None)
            else:
                await asyncio.sleep(0.05)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if server is not None:
            server.close()

    asyncio.run(parent())
    return 0

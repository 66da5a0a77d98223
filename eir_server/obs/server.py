"""The metrics listener (`/metrics`, `/healthz`, `/readyz`) and node-wide aggregation of workers.

Wiring (`--workers N` forks N processes sharing the Diameter port with SO_REUSEPORT):

Parent process (owns `--metrics-listen`; serves no Diameter traffic, so scrapes never steal
time from answers)::

    runtime_dir = tempfile.mkdtemp(prefix="eir-")          # before forking; 0700
    paths = [worker_socket_path(runtime_dir, i) for i in range(n)]
    # fork the workers, each gets its index and runtime_dir ...
    agg = MetricsAggregator(paths)
    srv = await start_metrics_server(agg, host, port)     # readiness: all workers ready

Each worker::

    metrics = Metrics()
    metrics.set_gauge_callback("peers", node.peers_by_state)   # etc.
    snap_srv = await start_worker_snapshot_server(
        metrics, worker_socket_path(runtime_dir, index), readiness=make_readiness(...))

Single process (`--workers 1` without forking): skip the aggregator and serve directly::

    srv = await start_metrics_server(metrics, host, port, readiness=make_readiness(...))

On each scrape the parent asks every worker's unix socket for a snapshot (JSON, a few kB),
adds them up and renders once: one scrape returns the node's totals. A worker that does not
answer within `timeout` is left out of the gauges and `eir_metrics_workers{state="reporting"}`
drops; its counters are carried from its last snapshot, and when it comes back as a new process
(counters at zero) the old totals are kept as a base, so node counters never go backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from eir_server.obs.metrics import (
    Metrics,
    Snapshot,
    add_process_samples,
    merge_snapshots,
    render,
)

ReadinessResult = tuple[bool, str]
ReadinessFn = Callable[[], ReadinessResult | Awaitable[ReadinessResult]]

_MAX_HEAD = 16 * 1024
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def worker_socket_path(runtime_dir: str, index: int) -> str:
    """Where worker `index` serves its snapshot (keep runtime_dir short: sun_path is 108 bytes)."""
    return os.path.join(runtime_dir, f"metrics-{index}.sock")


async def _call_readiness(fn: ReadinessFn | None) -> ReadinessResult | None:
    if fn is None:
        return None
    result = fn()
    if inspect.isawaitable(result):
        result = await result
    return result


async def start_worker_snapshot_server(
    metrics: Metrics, path: str, readiness: ReadinessFn | None = None
) -> asyncio.Server:
    """Serve `metrics.snapshot()` (plus this worker's readiness) as JSON on a unix socket.

    One connection = one snapshot; the snapshot is taken on the worker's own loop, so it is a
    consistent copy with no locking on the hot path.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # stale socket from a previous incarnation of this worker

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ready = await _call_readiness(readiness)
            snap = metrics.snapshot(ready)
            writer.write(json.dumps(snap.to_json_obj(), separators=(",", ":")).encode())
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, path=path)
    os.chmod(path, 0o600)
    return server


class MetricsAggregator:
    """Collects and merges the workers' snapshots on demand (see the module docstring)."""

    def __init__(self, socket_paths: Sequence[str], *, timeout: float = 2.0) -> None:
        self.socket_paths = tuple(socket_paths)
        self.timeout = timeout
        self._last: dict[str, Snapshot] = {}
        self._base = Snapshot()  # counters of worker incarnations that have been replaced
        self._lock = asyncio.Lock()

    async def _fetch(self, path: str) -> Snapshot:
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                data = await reader.read()
            finally:
                writer.close()
        return Snapshot.from_json_obj(json.loads(data))

    async def collect(self) -> Snapshot:
        results = await asyncio.gather(
            *(self._fetch(p) for p in self.socket_paths), return_exceptions=True
        )
        async with self._lock:  # /metrics and /readyz may collect concurrently
            live: list[Snapshot] = []
            gone: list[Snapshot] = []
            problems: list[str] = []
            for index, (path, res) in enumerate(zip(self.socket_paths, results, strict=True)):
                last = self._last.get(path)
                if isinstance(res, Snapshot):
                    if last is not None and last.incarnation != res.incarnation:
                        self._base = merge_snapshots([self._base, last], counters_only=True)
                    self._last[path] = res
                    live.append(res)
                    if res.ready is not None and not res.ready[0]:
                        problems.append(f"worker {index}: {res.ready[1]}")
                else:
                    problems.append(f"worker {index}: not answering ({type(res).__name__})")
                    if last is not None:
                        gone.append(last)
            merged = merge_snapshots([self._base, merge_snapshots(gone, counters_only=True), *live])
        merged.samples["eir_metrics_workers"] = {
            ("expected",): float(len(self.socket_paths)),
            ("reporting",): float(len(live)),
        }
        merged.ready = (False, "; ".join(problems)) if problems else (True, "ready")
        merged.samples["eir_ready"] = {(): 1.0 if merged.ready[0] else 0.0}
        # The workers know the store kind; the parent's own build_info keeps it.
        store = next((k[2] for k in merged.samples.get("eir_build_info", {})
                      if len(k) > 2 and k[2]), "")
        add_process_samples(merged.samples, "parent", str(store))
        return merged

    async def readiness(self) -> ReadinessResult:
        snap = await self.collect()
        assert snap.ready is not None
        return snap.ready


async def start_metrics_server(
    metrics: Metrics | MetricsAggregator,
    host: str,
    port: int,
    readiness: ReadinessFn | None = None,
    *,
    health: ReadinessFn | None = None,
    workers: Callable[[], list[dict[str, Any]]] | None = None,
    request_timeout: float = 5.0,
) -> asyncio.Server:
    """Tiny HTTP/1.1 server: GET/HEAD /metrics, /healthz, /readyz; 404 otherwise.

    `metrics` is this process's `Metrics` (single process) or a `MetricsAggregator` (parent of
    forked workers). `readiness` returns (ready, reason), sync or async; when None, an
    aggregator's own readiness (every worker answering and ready) is used, and a plain
    `Metrics` is always ready. /healthz answers 200 as long as this event loop runs, unless
    `health` (the supervisor's view of its workers) says the node cannot serve: then 503.
    Rendering runs in a thread so a large exposition never stalls the loop.
    """
    if readiness is None and isinstance(metrics, MetricsAggregator):
        readiness = metrics.readiness

    async def metrics_body() -> bytes:
        if isinstance(metrics, MetricsAggregator):
            snap = await metrics.collect()
        else:
            ready = await _call_readiness(readiness)
            snap = metrics.snapshot(ready if ready is not None else (True, "ready"))
        return await asyncio.to_thread(render, snap)

    async def respond(path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            return 200, CONTENT_TYPE_PLAIN_0_0_4, await metrics_body()
        if path == "/healthz":
            result = await _call_readiness(health)
            ok, reason = result if result is not None else (True, "ok")
            return (200 if ok else 503), "text/plain; charset=utf-8", reason.encode() + b"\n"
        if path == "/status":
            from eir_server.obs.status import status_document

            take = metrics.collect if isinstance(metrics, MetricsAggregator) else metrics.snapshot
            ready = await _call_readiness(readiness) or (True, "ready")
            healthy = await _call_readiness(health) or (True, "ok")
            doc = await status_document(take, ready=ready, health=healthy,
                                        workers=workers() if workers is not None else None)
            return 200, "application/json", json.dumps(doc, indent=1).encode() + b"\n"
        if path == "/readyz":
            result = await _call_readiness(readiness)
            ok, reason = result if result is not None else (True, "ready")
            return (200 if ok else 503), "text/plain; charset=utf-8", reason.encode() + b"\n"
        return 404, "text/plain; charset=utf-8", b"not found\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(request_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            writer.close()
            return
        method = ""
        try:
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                status, ctype, body = 400, "text/plain; charset=utf-8", b"bad request\n"
            else:
                method, path = parts[0], parts[1].split("?", 1)[0]
                if method not in ("GET", "HEAD"):
                    status, ctype, body = 405, "text/plain; charset=utf-8", b"GET only\n"
                else:
                    status, ctype, body = await respond(path)
        except Exception as exc:  # noqa: BLE001 - a scrape must never kill the listener
            status, ctype, body = 500, "text/plain; charset=utf-8", f"{exc!r}\n".encode()
        headers = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
            f"Content-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n"
            + ("Allow: GET, HEAD\r\n" if status == 405 else "")
            + "Connection: close\r\n\r\n"
        )
        try:
            writer.write(headers.encode("latin-1") + (b"" if method == "HEAD" else body))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, limit=_MAX_HEAD)

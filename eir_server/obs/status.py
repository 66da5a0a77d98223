"""The operator view (`GET /status`, `eir-server status`): one JSON document built from two
metric snapshots a second apart (rates), plus readiness, health and the workers' state."""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from eir_server.obs.metrics import Snapshot

SnapshotFn = Callable[[], Snapshot | Awaitable[Snapshot]]
RATE_WINDOW = 1.0  # seconds between the two snapshots rates are computed from


async def _snap(fn: SnapshotFn) -> Snapshot:
    got = fn()
    if inspect.isawaitable(got):
        got = await got
    return got  # type: ignore[return-value]


def _one(snap: Snapshot, name: str) -> float | None:
    rows = snap.samples.get(name) or {}
    return rows.get(())


def _total(snap: Snapshot, name: str) -> float:
    return sum((snap.samples.get(name) or {}).values())


async def status_document(take: SnapshotFn, *, ready: tuple[bool, str],
                          health: tuple[bool, str],
                          workers: list[dict[str, Any]] | None = None,
                          window: float = RATE_WINDOW,
                          clock: Callable[[], float] = time.time) -> dict[str, Any]:
    before = await _snap(take)
    t0 = time.monotonic()
    await asyncio.sleep(window)
    now = await _snap(take)
    dt = max(time.monotonic() - t0, 1e-6)

    def rate(name: str, labels: tuple[str, ...] | None = None) -> float:
        a, b = before.samples.get(name) or {}, now.samples.get(name) or {}
        if labels is not None:
            return round(max(b.get(labels, 0.0) - a.get(labels, 0.0), 0.0) / dt, 2)
        return round(max(sum(b.values()) - sum(a.values()), 0.0) / dt, 2)

    peers: dict[str, dict[str, Any]] = {}
    for (host,), n in (now.samples.get("eir_diameter_peer_requests_total") or {}).items():
        peers[host] = {"origin_host": host, "connections": {}, "requests": int(n),
                       "requests_per_s": rate("eir_diameter_peer_requests_total", (host,))}
    for (host, state), n in (now.samples.get("eir_diameter_peer_connections") or {}).items():
        if n:
            p = peers.setdefault(host, {"origin_host": host, "connections": {}, "requests": 0,
                                        "requests_per_s": 0.0})
            p["connections"][state] = int(n)

    date = _one(now, "eir_register_timestamp_seconds")
    version = _one(now, "eir_register_version")
    store_versions = sorted(k[0] for k in now.samples.get("eir_register_info") or {})
    rows: dict[str, int] = {}
    for (lst, outcome), n in (now.samples.get("eir_register_sync_rows") or {}).items():
        if outcome == "applied":
            rows[lst] = int(n)
    lookups = {f"{tier}_{result}": int(n) for (tier, result), n in
               (now.samples.get("eir_store_lookups_total") or {}).items()}
    redis_up = _one(now, "eir_store_redis_up")
    fallback = _one(now, "eir_store_fallback_active")
    sync: dict[str, Any] = {}
    if "eir_sync_last_run_timestamp_seconds" in now.samples:
        failed = _one(now, "eir_sync_last_run_failed")
        sync = {"last_run": _one(now, "eir_sync_last_run_timestamp_seconds"),
                "last_success": _one(now, "eir_sync_last_success_timestamp_seconds"),
                "last_run_failed": bool(failed),
                "runs": {k[0]: int(v) for k, v in
                         (now.samples.get("eir_sync_runs_total") or {}).items()}}
    proc: dict[str, dict[str, float]] = {}
    for name, key in (("eir_process_resident_memory_bytes", "rss_bytes"),
                      ("eir_process_cpu_seconds_total", "cpu_seconds"),
                      ("eir_process_open_fds", "open_fds")):
        for (worker,), v in (now.samples.get(name) or {}).items():
            proc.setdefault(worker, {})[key] = v
    if workers is None:
        workers = [{"worker": 0, "pid": os.getpid(), "up": True, "restarts": 0}]
    workers = [{**w, **proc.get(str(w["worker"]), {})} for w in workers]
    return {
        "ready": {"ok": ready[0], "reason": ready[1]},
        "health": {"ok": health[0], "reason": health[1]},
        "requests_per_s": rate("eir_requests_total"),
        "shed_per_s": rate("eir_requests_shed_total"),
        "peers": sorted(peers.values(), key=lambda p: p["origin_host"]),
        "register": {
            "version": int(version) if version is not None else None,
            "store_version": store_versions,
            "date": date,
            "age_s": round(clock() - date) if date is not None else None,
            "last_sync": _one(now, "eir_register_last_sync_timestamp_seconds"),
            "rows": rows,
        },
        "store": {
            "redis_up": bool(redis_up) if redis_up is not None else None,
            "fallback_active": bool(fallback) if fallback is not None else None,
            "redis_errors": int(_total(now, "eir_store_redis_errors_total")),
            "fallback_verdicts": int(_total(now, "eir_store_fallback_verdicts_total")),
            "lookups": lookups,
        },
        "sync": sync,
        "workers": workers,
        "process": proc.get("parent") or proc.get("0") or {},
    }


def render_text(doc: dict[str, Any]) -> str:
    """`eir-server status` without --json: a few lines a NOC engineer reads at a glance."""
    out = []
    r, h = doc["ready"], doc["health"]
    out.append(f"ready:    {'yes' if r['ok'] else 'NO'} ({r['reason']})")
    out.append(f"health:   {'ok' if h['ok'] else 'FAILING'} ({h['reason']})")
    reg = doc["register"]
    if reg["version"] is None:
        out.append("register: none served")
    else:
        age = reg["age_s"]
        rows = ", ".join(f"{k} {v}" for k, v in sorted(reg["rows"].items())) or "-"
        out.append(f"register: {reg['version']} (age {_duration(age)}; store version "
                   f"{'/'.join(reg['store_version']) or '-'}; rows: {rows})")
    st = doc["store"]
    state = ("up" if st["redis_up"] else "DOWN") if st["redis_up"] is not None else "?"
    out.append(f"store:    {state}; fallback {'ACTIVE' if st['fallback_active'] else 'off'}; "
               f"{st['redis_errors']} errors, {st['fallback_verdicts']} fallback verdicts")
    if doc["sync"]:
        s = doc["sync"]
        out.append(f"sync:     last run {'FAILED' if s['last_run_failed'] else 'ok'}; runs "
                   + ", ".join(f"{k} {v}" for k, v in sorted(s["runs"].items())))
    out.append(f"traffic:  {doc['requests_per_s']} requests/s, {doc['shed_per_s']} shed/s")
    out.append(f"peers:    {len(doc['peers'])}")
    for p in doc["peers"]:
        conns = ", ".join(f"{k} {v}" for k, v in sorted(p["connections"].items())) or "closed"
        out.append(f"  {p['origin_host']}: {conns}; {p['requests_per_s']} req/s, "
                   f"{p['requests']} total")
    out.append(f"workers:  {len(doc['workers'])}")
    for w in doc["workers"]:
        rss = w.get("rss_bytes")
        out.append(f"  worker {w['worker']}: pid {w.get('pid')}, "
                   f"{'up' if w.get('up') else 'DOWN'}, restarts {w.get('restarts', 0)}"
                   + (f", rss {rss / 2**20:.0f} MiB" if rss else ""))
    return "\n".join(out) + "\n"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"

"""What operations see from a real `serve` process: register version and age with the same
meaning on both stores, sync outcomes that outlive `sync --once`, per-peer and process metrics,
readiness as a gauge, the /status view. Real processes, a real redis-server, real sockets."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from eir_server import build_kind
from tests.eirproc import EIR, S13Client, http_get, stop, wait_until
from tests.netutil import free_port, wait_for_port

STOLEN = "35209900176148"
CLEAN = "49015420323751"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = http_get(port, "/metrics")[1]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples}


def serve(tmp: Path, name: str, *args: str) -> tuple[subprocess.Popen[bytes], int, int]:
    port, mport = free_port(), free_port()
    env = {**os.environ, "EIR_LOG_FORMAT": "json"}
    proc = subprocess.Popen([*EIR, "serve", "--diameter-listen", f"127.0.0.1:{port}",
                             "--metrics-listen", f"127.0.0.1:{mport}", *args], env=env,
                            stdout=(tmp / f"{name}.log").open("wb"), stderr=subprocess.STDOUT)
    wait_for_port(mport, proc)
    return proc, port, mport


def sync_once(source: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EIR, "sync", "--source", str(source), "--store", url, "--once",
                           "--progress", "never"], capture_output=True, text=True, timeout=120)


def test_register_version_and_age_mean_the_same_on_both_stores(tmp_path: Path, dirbs,
                                                               redis_url: str) -> None:
    # An 11-month-old register with a 1-day limit: not ready, on either store, though both
    # processes just loaded it.
    stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime(time.time() - 330 * 86400))
    dirbs.publish("blacklist", stamp, [[STOLEN, "20200101", "stolen"]])
    r = sync_once(dirbs.root, redis_url)
    assert r.returncode == 0, r.stdout + r.stderr
    expected_ts = time.mktime(time.strptime(stamp + " UTC", "%Y%m%d_%H%M%S %Z")) - time.timezone
    procs = []
    try:
        emb = serve(tmp_path, "embedded", "--register", str(dirbs.root),
                    "--max-register-age", "86400")
        procs.append(emb[0])
        red = serve(tmp_path, "redis", "--store", redis_url, "--max-register-age", "86400",
                    "--workers", "2")
        procs.append(red[0])
        views = {}
        for name, (proc, port, mport) in {"embedded": emb, "redis": red}.items():
            wait_until(lambda mport=mport: ("eir_register_version", ()) in scrape(mport),
                       f"{name}: register served", 60, proc)
            status, body = http_get(mport, "/readyz")
            assert status == 503 and "old (max 86400 s)" in body, (name, body)
            got = scrape(mport)
            views[name] = (got[("eir_register_version", ())],
                           got[("eir_register_timestamp_seconds", ())])
            assert got[("eir_ready", ())] == 0.0
            # rows by register list, not by file name, on both stores
            assert got[("eir_register_sync_rows",
                        (("list", "blacklist"), ("outcome", "applied")))] == 1.0
            c = S13Client(port)
            assert c.status(STOLEN) == 1  # not ready, but it answers from what it has
            c.close()
        assert views["embedded"] == views["redis"] == (float(stamp.replace("_", "")),
                                                        expected_ts)
    finally:
        for p in procs:
            stop(p)


def test_a_redis_store_without_a_register_is_not_ready_unless_fallback_is_allowed(
        tmp_path: Path, dirbs, redis_url: str) -> None:
    """`serve` on a Redis namespace no sync has filled answers every device with
    --store-fallback: /readyz 503 naming the register, eir_ready 0, unless
    --ready-during-fallback on. The embedded store without a register is a lab serving the
    default verdict: ready. Once a sync loads a register, the Redis node is ready."""
    procs = []
    try:
        bare = serve(tmp_path, "bare", "--store", redis_url)
        procs.append(bare[0])
        allowed = serve(tmp_path, "allowed", "--store", redis_url,
                        "--ready-during-fallback", "on")
        procs.append(allowed[0])
        lab = serve(tmp_path, "lab")  # memory://, no --register
        procs.append(lab[0])
        status, body = http_get(bare[2], "/readyz")
        assert status == 503 and "register" in body, (status, body)
        assert scrape(bare[2])[("eir_ready", ())] == 0.0
        for name, (_, _, mport) in {"allowed": allowed, "lab": lab}.items():
            status, body = http_get(mport, "/readyz")
            assert status == 200, (name, body)
            assert scrape(mport)[("eir_ready", ())] == 1.0, name

        dirbs.publish("blacklist", time.strftime("%Y%m%d_%H%M%S", time.gmtime()),
                      [[STOLEN, "20200101", "stolen"]])
        r = sync_once(dirbs.root, redis_url)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_until(lambda: http_get(bare[2], "/readyz")[0] == 200, "ready once synced", 60,
                   bare[0])
        assert scrape(bare[2])[("eir_ready", ())] == 1.0
        c = S13Client(bare[1])
        assert c.status(STOLEN) == 1 and c.status(CLEAN) == 0  # from the register now
        c.close()
    finally:
        for p in procs:
            stop(p)


def test_sync_outcomes_per_peer_process_and_store_metrics(tmp_path: Path, dirbs,
                                                           redis_url: str) -> None:
    stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime())
    dirbs.publish("blacklist", stamp, [[STOLEN, "20200101", "stolen"]])
    assert sync_once(dirbs.root, redis_url).returncode == 0
    assert sync_once(dirbs.root, redis_url).returncode == 0  # nothing new: noop
    proc, port, mport = serve(tmp_path, "node", "--store", redis_url, "--workers", "2",
                              "--max-register-age", "86400")
    try:
        wait_until(lambda: http_get(mport, "/readyz")[0] == 200, "ready", 60, proc)
        got = wait_until(lambda: (lambda g: g if ("eir_sync_runs_total", (("result", "full"),))
                                  in g else None)(scrape(mport)), "sync metrics", 60, proc)
        # both --once runs, though no sync process is left to scrape
        assert got[("eir_sync_runs_total", (("result", "full"),))] == 1
        assert got[("eir_sync_runs_total", (("result", "noop"),))] == 1
        assert got[("eir_sync_last_run_failed", ())] == 0
        assert time.time() - got[("eir_sync_last_success_timestamp_seconds", ())] < 300
        assert got[("eir_ready", ())] == 1.0
        assert got[("eir_build_info", (("build", build_kind()), ("python", got_python(got)),
                                       ("store", "redis"), ("version", version())))] == 1
        for worker in ("0", "1", "parent"):
            assert got[("eir_process_resident_memory_bytes", (("worker", worker),))] > 1e6
            assert got[("eir_process_open_fds", (("worker", worker),))] > 0
            assert ("eir_process_cpu_seconds_total", (("worker", worker),)) in got

        clients = [S13Client(port) for _ in range(2)]
        for c in clients:
            assert c.status(STOLEN) == 1 and c.status(CLEAN) == 0 and c.status(CLEAN) == 0
        got = scrape(mport)
        peer = (("origin_host", "mme1.epc.test"),)
        assert got[("eir_diameter_peer_requests_total", peer)] == 6
        assert got[("eir_diameter_peer_connections", (*peer, ("state", "r_open")))] == 2
        # uncached lookups went to Redis: one listed, one not (per worker that saw them)
        assert got[("eir_store_lookups_total", (("result", "hit"), ("tier", "redis")))] >= 1
        assert got[("eir_store_lookups_total", (("result", "miss"), ("tier", "redis")))] >= 1
        for c in clients:
            c.close()
        wait_until(lambda: ("eir_diameter_peer_connections", (*peer, ("state", "r_open")))
                   not in scrape(mport), "connections gone", 30, proc)
        assert scrape(mport)[("eir_diameter_peer_requests_total", peer)] == 6  # kept

        # the operator view
        status, body = http_get(mport, "/status")
        assert status == 200
        st = json.loads(body)
        assert st["ready"]["ok"] is True and st["health"]["ok"] is True
        assert st["register"]["version"] == int(stamp.replace("_", ""))
        assert 0 <= st["register"]["age_s"] < 300 and st["register"]["rows"]["blacklist"] == 1
        assert st["store"]["redis_up"] is True
        assert [w["worker"] for w in st["workers"]] == [0, 1]
        assert all(w["up"] and w["pid"] for w in st["workers"])
        assert st["peers"] == [{"origin_host": "mme1.epc.test", "connections": {},
                                "requests": 6, "requests_per_s": 0.0}]
        assert st["sync"]["last_run_failed"] is False
        r = subprocess.run([*EIR, "status", "--url", f"http://127.0.0.1:{mport}"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "ready" in r.stdout and "mme1.epc.test" in r.stdout and "register" in r.stdout
        r = subprocess.run([*EIR, "status", "--url", f"http://127.0.0.1:{free_port()}"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 3 and "Traceback" not in r.stderr
    finally:
        stop(proc)


def got_python(got: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> str:
    [labels] = [dict(k[1]) for k in got if k[0] == "eir_build_info"]
    return labels["python"]


def version() -> str:
    from eir_server import __version__

    return __version__


def test_sync_metric_names_in_the_docs_exist() -> None:
    """docs/sync.md lists what `sync --metrics-port` exposes: every name must be real."""
    import re

    from prometheus_client import REGISTRY, generate_latest

    import eir_server.sync.progress  # noqa: F401 - registers the sync metrics

    exposed = set(re.findall(r"^# TYPE (\S+)", generate_latest(REGISTRY).decode(), re.M))
    exposed |= {n + "_total" for n in exposed}
    text = (Path(__file__).resolve().parents[2] / "docs/sync.md").read_text()
    [row] = [line for line in text.splitlines() if line.startswith("| `--metrics-port")]
    own = row.split("A `--once` run")[0]
    names = set(re.findall(r"`(eir_sync_[a-z_]+)", own))
    assert names and names <= exposed, names - exposed

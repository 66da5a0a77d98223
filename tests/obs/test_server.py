from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from eir_server.obs.health import make_readiness
from eir_server.obs.metrics import Metrics
from eir_server.obs.server import (
    MetricsAggregator,
    start_metrics_server,
    worker_socket_path,
)

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker_proc.py")


async def http(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await reader.read()  # the server closes after one response
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, body


async def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    return await http(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body.decode())
        for s in fam.samples
    }


ECR_OK = ("eir_requests_total", (("command", "ECR"), ("interface", "s13"), ("result", "2001")))


@pytest.fixture
async def single() -> AsyncIterator[tuple[Metrics, int, list[tuple[bool, str]]]]:
    m = Metrics()
    state = [(True, "ready")]
    server = await start_metrics_server(m, "127.0.0.1", 0, readiness=lambda: state[0])
    port = server.sockets[0].getsockname()[1]
    yield m, port, state
    server.close()
    await server.wait_closed()


async def test_metrics_endpoint_serves_current_counts(single) -> None:
    m, port, _ = single
    m.requests[("s13", "ECR", "2001")] += 5
    status, headers, body = await get(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert int(headers["content-length"]) == len(body)
    assert samples(body)[ECR_OK] == 5
    m.requests[("s13", "ECR", "2001")] += 1  # counted after the first scrape: seen by the next
    _, _, body = await get(port, "/metrics?x=1")
    assert samples(body)[ECR_OK] == 6


async def test_health_and_readiness(single) -> None:
    _, port, state = single
    assert (await get(port, "/healthz"))[:1] == (200,)
    status, _, body = await get(port, "/readyz")
    assert (status, body) == (200, b"ready\n")
    state[0] = (False, "register not loaded")
    status, _, body = await get(port, "/readyz")
    assert (status, body) == (503, b"register not loaded\n")


async def test_http_errors(single) -> None:
    _, port, _ = single
    assert (await get(port, "/nope"))[0] == 404
    status, headers, _ = await http(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert (await http(port, b"garbage\r\n\r\n"))[0] == 400
    status, headers, body = await http(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


async def test_stdlib_client_can_scrape(single) -> None:
    m, port, _ = single
    m.requests[("s13", "ECR", "2001")] += 2

    def fetch() -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return r.read()

    assert samples(await asyncio.to_thread(fetch))[ECR_OK] == 2


async def test_oversized_request_head_is_dropped_and_server_keeps_serving(single) -> None:
    _, port, _ = single
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /" + b"a" * 40_000 + b" HTTP/1.1\r\n\r\n")
    await writer.drain()
    assert await reader.read() == b""
    writer.close()
    assert (await get(port, "/healthz"))[0] == 200


# --- node aggregation over real worker processes ------------------------------------------


class Workers:
    def __init__(self, runtime_dir: str) -> None:
        self.runtime_dir = runtime_dir
        self.procs: dict[int, asyncio.subprocess.Process] = {}

    async def start(self, index: int, requests: int, ready: bool = True) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(WORKER), worker_socket_path(self.runtime_dir, index),
            str(requests), "1" if ready else "0",
            stdout=asyncio.subprocess.PIPE, env=env,
        )
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"listening\n"
        self.procs[index] = proc

    async def kill(self, index: int) -> None:
        proc = self.procs.pop(index)
        proc.kill()
        await proc.wait()


@pytest.fixture
async def workers() -> AsyncIterator[Workers]:
    with tempfile.TemporaryDirectory(prefix="eirm-") as d:
        w = Workers(d)
        yield w
        for i in list(w.procs):
            await w.kill(i)


async def test_one_scrape_returns_node_totals_across_processes(workers: Workers) -> None:
    await workers.start(0, requests=3)
    await workers.start(1, requests=4)
    agg = MetricsAggregator([worker_socket_path(workers.runtime_dir, i) for i in range(2)])
    server = await start_metrics_server(agg, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        status, _, body = await get(port, "/metrics")
        got = samples(body)
        assert status == 200
        assert got[ECR_OK] == 7
        assert got[("eir_request_duration_seconds_count", (("interface", "s13"),))] == 7
        assert got[("eir_requests_in_flight", ())] == 2
        assert got[("eir_register_version", ())] == 13  # min across workers
        assert got[("eir_metrics_workers", (("state", "reporting"),))] == 2
        assert (await get(port, "/readyz"))[0] == 200

        # worker 1 dies: its counters stay in the totals, the node is not ready
        await workers.kill(1)
        status, _, body = await get(port, "/readyz")
        assert status == 503 and b"worker 1: not answering" in body
        got = samples((await get(port, "/metrics"))[2])
        assert got[ECR_OK] == 7
        assert got[("eir_requests_in_flight", ())] == 1
        assert got[("eir_metrics_workers", (("state", "reporting"),))] == 1

        # it is replaced by a new process starting from zero: totals keep going up
        await workers.start(1, requests=2)
        got = samples((await get(port, "/metrics"))[2])
        assert got[ECR_OK] == 3 + 4 + 2
        assert got[("eir_metrics_workers", (("state", "reporting"),))] == 2
        assert (await get(port, "/readyz"))[0] == 200
    finally:
        server.close()
        await server.wait_closed()


async def test_node_not_ready_while_any_worker_is_not(workers: Workers) -> None:
    await workers.start(0, requests=1, ready=True)
    await workers.start(1, requests=1, ready=False)
    agg = MetricsAggregator([worker_socket_path(workers.runtime_dir, i) for i in range(2)])
    ok, reason = await agg.readiness()
    assert not ok and reason == "worker 1: register not loaded"


def test_make_readiness_reasons() -> None:
    now = [10_000.0]
    state = {"listening": True, "store": True, "loaded": 9_000.0}

    def ready(fallback: bool = False, max_age: float | None = 3600) -> tuple[bool, str]:
        return make_readiness(
            listening=lambda: state["listening"],
            store_reachable=lambda: state["store"],
            fallback_allowed=fallback,
            register_timestamp=lambda: state["loaded"],
            max_register_age=max_age,
            clock=lambda: now[0],
        )()

    assert ready() == (True, "ready")
    now[0] = 9_000.0 + 3601
    assert ready() == (False, "register is 3601 s old (max 3600 s)")
    assert ready(max_age=0) == (True, "ready")  # 0 disables the age check
    now[0] = 9_500.0
    state["store"] = False
    assert ready() == (False, "store unreachable and fallback not allowed")
    assert ready(fallback=True) == (True, "ready")
    state["loaded"] = None
    assert ready(fallback=True) == (False, "register not loaded")
    state["listening"] = False
    assert ready(fallback=True) == (False, "diameter listener not serving")



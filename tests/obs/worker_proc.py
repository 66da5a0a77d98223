"""A stand-in worker process: counts `requests` ECRs, serves its snapshot, waits to be killed.

Run as: python worker_proc.py SOCKET_PATH REQUESTS READY(0|1)
"""

from __future__ import annotations

import asyncio
import sys

from eir_server.obs.metrics import Metrics
from eir_server.obs.server import start_worker_snapshot_server


async def main(path: str, requests: int, ready: bool) -> None:
    m = Metrics()
    for _ in range(requests):
        m.requests[("s13", "ECR", "2001")] += 1
        m.latency_s13.observe(0.0002)
    m.set_gauge_callback("in_flight", lambda: 1)
    m.set_gauge_callback("register", lambda: {"version": 10 + requests, "last_sync": 1000.0})
    reason = "ready" if ready else "register not loaded"
    server = await start_worker_snapshot_server(m, path, readiness=lambda: (ready, reason))
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"))

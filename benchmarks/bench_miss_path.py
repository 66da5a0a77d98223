"""Store cost of an uncached lookup, worker CPU per lookup (process time, so other load on the
machine inflates it less than wall time): the Redis round-trip path (coalesced fetches, N in
flight) against the memory-mapped register snapshot (`snapshot_dir`), alternating A/B.

    .venv/bin/python benchmarks/bench_miss_path.py --imeis 1000000 [--url redis://...]
    .venv/bin/python benchmarks/bench_miss_path.py --cluster --paths redis

Without --url it starts its own redis-server (with --cluster a 3-master Redis Cluster) and
syncs the generated register of bench_sync_load.py into it. With a Cluster URL it measures the
Cluster pipeline path. `--client` picks the lookup client for A/B runs in one process.

Machine-independent count (instructions, the slope between two lookup counts; the fixed cost
of starting and importing cancels out):

    valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python \\
        benchmarks/bench_miss_path.py --url URL --paths redis --rounds 1 --inflight 256 \\
        --lookups 20000     # then 60000; (I refs(60k) - I refs(20k)) / 40000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_sync_load import make_zip, start_redis, wait_ping  # noqa: E402

from eir_server.store import MISSING, open_store  # noqa: E402


async def redis_path(url: str, imeis: list[str], inflight: int, **opts: object
                     ) -> tuple[float, float]:
    """(CPU per lookup, wall per lookup). The IMEIs are distinct and the cache has room for
    all of them (as a serving worker's 1M-entry cache has): every fetch is a miss, and no
    eviction or cache clearing is counted against the lookup path."""
    s = open_store(url, **opts)
    await s.start()
    try:
        # Connections up, with IMEIs the measured run does not ask for.
        await asyncio.gather(*(s.fetch(f"{99999999999999 - j}") for j in range(inflight)))
        cpu, wall = time.process_time(), time.perf_counter()
        for lo in range(0, len(imeis), inflight):
            await asyncio.gather(*(s.fetch(i) for i in imeis[lo:lo + inflight]))
        n = len(imeis)
        return (time.process_time() - cpu) / n, (time.perf_counter() - wall) / n
    finally:
        await s.close()


async def snapshot_path(url: str, imeis: list[str], snapdir: str) -> tuple[float, float]:
    s = open_store(url, snapshot_dir=snapdir)
    await s.start()
    try:
        while s._state.snap is None:  # built once, then mapped by every run
            await asyncio.sleep(0.1)
        get = s.get_nowait
        cpu, wall = time.process_time(), time.perf_counter()
        for i in imeis:
            if get(i) is MISSING:
                await s.fetch(i)
        n = len(imeis)
        return (time.process_time() - cpu) / n, (time.perf_counter() - wall) / n
    finally:
        await s.close()


@contextlib.contextmanager
def local_cluster(tmp: Path) -> Iterator[str]:
    """A 3-master Redis Cluster on free local ports (no replicas)."""
    import socket

    import redis

    def free() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    procs, ports = [], []
    try:
        for i in range(3):
            port, bus = free(), free()
            d = tmp / f"n{i}"
            d.mkdir(parents=True)
            procs.append(subprocess.Popen(
                [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port),
                 "--cluster-enabled", "yes", "--cluster-port", str(bus),
                 "--cluster-config-file", str(d / "nodes.conf"), "--save", "",
                 "--appendonly", "no", "--dir", str(d)], stdout=subprocess.DEVNULL))
            ports.append((port, bus))
        clients = [redis.Redis(port=p) for p, _ in ports]
        for c in clients:
            wait_ping(c)
        step = 16384 // 3
        for i, c in enumerate(clients):
            c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * step,
                              16383 if i == 2 else (i + 1) * step - 1)
        for p, bus in ports[1:]:
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", p, bus)
        deadline = time.monotonic() + 20
        for c in clients:
            while b"cluster_state:ok" not in c.execute_command("CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    raise RuntimeError("cluster did not converge")
                time.sleep(0.05)
        time.sleep(0.5)
        yield "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p, _ in ports)
    finally:
        for pr in procs:
            pr.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--imeis", type=int, default=1_000_000, help="register size")
    ap.add_argument("--lookups", type=int, default=100_000)
    ap.add_argument("--url", help="a Redis already holding a register (default: start one)")
    ap.add_argument("--cluster", action="store_true", help="start a 3-master Redis Cluster")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--inflight", default="256,32", help="lookups in flight, comma separated")
    ap.add_argument("--paths", default="redis,snapshot", help="redis, snapshot or both")
    ap.add_argument("--client", default="",
                    help="lookup clients to alternate, comma separated (lean, redis-py); "
                         "default: the store's default")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "eir-bench"))
    a = ap.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    paths = a.paths.split(",")
    inflights = [int(x) for x in a.inflight.split(",")]
    clients = a.client.split(",") if a.client else [""]
    with contextlib.ExitStack() as stack:
        url = a.url
        if url is None:
            src = make_zip(Path(a.workdir), a.imeis, 1)
            tmp = Path(tempfile.mkdtemp(prefix="eir-bench-miss-"))
            stack.callback(shutil.rmtree, tmp, True)
            if a.cluster:
                url = stack.enter_context(local_cluster(tmp))
            else:
                proc, port = start_redis(tmp)
                stack.callback(proc.kill)
                url = f"redis://127.0.0.1:{port}/0"
            subprocess.run([sys.executable, "-m", "eir_server.cli", "sync", "--source",
                            str(src), "--store", url, "--once", "--progress", "never"],
                           check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        rnd = random.Random(5)
        lo = 35209900000000
        imeis = [str(lo + i) for i in rnd.sample(range(5 * a.imeis), a.lookups)]
        snapdir = tempfile.mkdtemp(prefix="eir-snap-")
        stack.callback(shutil.rmtree, snapdir, True)
        rows = []
        for r in range(a.rounds):
            if "redis" in paths:
                for inflight in inflights:
                    for client in clients:
                        opts = {"lookup_client": client} if client else {}
                        cpu, wall = asyncio.run(redis_path(url, imeis, inflight, **opts))
                        what = f"redis{' ' + client if client else ''}, {inflight} in flight"
                        rows.append((r, what, cpu, wall))
                        print(f"round {r}  {what:<30} {cpu * 1e6:6.2f} µs CPU, "
                              f"{wall * 1e6:6.2f} µs wall per uncached lookup", flush=True)
            if "snapshot" in paths:
                cpu, wall = asyncio.run(snapshot_path(url, imeis, snapdir))
                rows.append((r, "snapshot", cpu, wall))
                print(f"round {r}  {'snapshot':<30} {cpu * 1e6:6.2f} µs CPU, "
                      f"{wall * 1e6:6.2f} µs wall per uncached lookup", flush=True)
        print("\nranges over rounds (µs CPU per uncached lookup):")
        for what in dict.fromkeys(w for _, w, _, _ in rows):
            xs = [c * 1e6 for _, w, c, _ in rows if w == what]
            print(f"  {what:<30} {min(xs):6.2f} - {max(xs):6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

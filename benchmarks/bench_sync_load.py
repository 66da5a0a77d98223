"""Full-load rate and Redis memory of the register, on a private redis-server.

    .venv/bin/python benchmarks/bench_sync_load.py --imeis 1000000
    .venv/bin/python benchmarks/bench_sync_load.py --imeis 10000000 --delta 50000
    .venv/bin/python benchmarks/bench_sync_load.py --imeis 10000000 --command

--command times the whole `eir-server sync --once` process instead (start-up, planning, load,
switch, grace, clean-up: what an operator waits for), with its CPU from the kernel's accounting.

Generates a DIRBS-like blacklist zip (cached in --workdir), starts redis-server on a free port,
runs one full sync (and optionally a delta), and prints rows/s, bytes of Redis memory per listed
IMEI (INFO memory used_memory delta), peak RSS of this process, and the same memory figure for
the naive one-key-per-IMEI layout when --naive is given.
"""

from __future__ import annotations

import argparse
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eir_server.store.urls import parse_store_url  # noqa: E402
from eir_server.sync.engine import SyncOptions, run_once  # noqa: E402
from eir_server.sync.progress import Progress  # noqa: E402
from eir_server.sync.redis_db import RegisterDB  # noqa: E402
from eir_server.sync.source import DirSource  # noqa: E402

REASONS = ["stolen", "lost", "stolen|reported_by_owner", "counterfeit", "duplicate|stolen"]


def gen_rows(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    tacs = [rnd.randrange(10_000_000, 99_999_999) for _ in range(3000)]
    weights = [1 / (i + 1) for i in range(len(tacs))]  # a few popular models, a long tail
    seen: set[int] = set()
    out = []
    tac_pick = rnd.choices(tacs, weights, k=n * 2)
    j = 0
    while len(out) < n:
        imei = tac_pick[j] * 1_000_000 + rnd.randrange(1_000_000)
        j += 1
        if imei in seen:
            continue
        seen.add(imei)
        d = 20180101 + rnd.randrange(6) * 10000 + rnd.randrange(12) * 100 + rnd.randrange(28)
        out.append(f"{imei}{rnd.randrange(10)},{d},{rnd.choice(REASONS)}")
    return out


def make_zip(workdir: Path, n: int, seed: int) -> Path:
    src = workdir / f"src-{n}-{seed}"
    z = src / "20240101_000000_blacklist.zip"
    if z.exists():
        for stale in src.glob("2024010[2-9]_*"):  # earlier --delta runs
            stale.unlink()
        return src
    src.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    rows = gen_rows(n, seed)
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr(
            "20240101_000000_blacklist.csv", "imei,block_date,reasons\n" + "\n".join(rows) + "\n"
        )
        # An (empty) delta member gives the run its DIRBS run id (1), so run 2 can chain on it.
        zf.writestr("20240101_000000_blacklist_delta_0_1_blocked.csv", "imei,block_date,reasons\n")
    print(
        f"generated {n:,} rows in {time.perf_counter() - t:.1f}s -> {z} ({z.stat().st_size / 1e6:.0f} MB)"
    )
    return src


def add_delta(src: Path, n: int, seed: int) -> None:
    rnd = random.Random(seed + 1)
    with zipfile.ZipFile(src / "20240101_000000_blacklist.zip") as zf:
        base_rows = zf.read("20240101_000000_blacklist.csv").decode().splitlines()[1:]
    removed = rnd.sample(base_rows, n // 2)
    added = [f"{rnd.randrange(10**13, 10**14)}0,20240102,stolen" for _ in range(n - n // 2)]
    removed_imeis = {r.split(",")[0] for r in removed}
    full = [r for r in base_rows if r.split(",")[0] not in removed_imeis] + added
    ts = "20240102_000000"
    with zipfile.ZipFile(
        src / f"{ts}_blacklist.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=1
    ) as zf:
        hdr = "imei,block_date,reasons\n"
        zf.writestr(f"{ts}_blacklist.csv", hdr + "\n".join(full) + "\n")
        zf.writestr(f"{ts}_blacklist_delta_1_2_blocked.csv", hdr + "\n".join(added) + "\n")
        zf.writestr(f"{ts}_blacklist_delta_1_2_unblocked.csv", hdr + "\n".join(removed) + "\n")


def start_redis(tmp: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen(
        [
            shutil.which("redis-server") or "/usr/bin/redis-server",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
    )
    wait_ping(redis.Redis(port=port))
    return p, port


def wait_ping(c: redis.Redis) -> None:
    """Until a just-started redis-server answers (up to ~4 s)."""
    for _ in range(200):
        try:
            c.ping()
            return
        except redis.ConnectionError:
            time.sleep(0.02)


def cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def cpu_redis(c: redis.Redis) -> float:
    info = c.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def used(c: redis.Redis) -> int:
    return int(c.info("memory")["used_memory"])


def naive_bytes(c: redis.Redis, src: Path, limit: int) -> float:
    """Memory of SET eir:<imei14> <date,reasons> per IMEI, on up to `limit` rows."""
    c.flushall()
    base = used(c)
    with zipfile.ZipFile(src / "20240101_000000_blacklist.zip") as zf:
        rows = zf.read("20240101_000000_blacklist.csv").decode().splitlines()[1 : limit + 1]
    pipe = c.pipeline(transaction=False)
    for i, r in enumerate(rows):
        imei, rest = r.split(",", 1)
        pipe.set("eir:" + imei[:14], rest)
        if i % 10000 == 9999:
            pipe.execute()
    pipe.execute()
    return (used(c) - base) / len(rows)


def whole_command(src: Path, url: str, c: redis.Redis) -> None:
    """`eir-server sync --once` as a child process: wall, its CPU (user+sys), Redis CPU."""
    exe = Path(sys.executable).with_name("eir-server")
    cmd = [str(exe), "sync", "--source", str(src), "--store", url, "--once", "--progress", "never"]
    rcpu0 = cpu_redis(c)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime
    rcpu = cpu_redis(c) - rcpu0
    ver = c.get("eir:cur")
    n = int(c.hget(b"eir:" + ver + b":m", "count") or 0) if ver else 0
    rows = [
        ("exit code", p.returncode),
        ("listed IMEIs", f"{n:,}"),
        ("whole command s", f"{dt:.2f}"),
        ("sync process CPU s (µs/row)", f"{cpu:.2f} ({cpu / max(n, 1) * 1e6:.2f})"),
        ("redis CPU s (µs/row)", f"{rcpu:.2f} ({rcpu / max(n, 1) * 1e6:.2f})"),
        ("sync peak RSS MB", f"{ru1.ru_maxrss / 1024:.0f}"),
    ]
    w = max(len(k) for k, _ in rows)
    print(f"\n{'metric':<{w}}  value")
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--imeis", type=int, default=1_000_000)
    ap.add_argument("--delta", type=int, default=0, help="rows in a follow-up delta run")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--naive", type=int, default=0, help="also measure one-key-per-IMEI on N rows")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "eir-bench"))
    ap.add_argument("--bucket-size", type=int, default=None)
    ap.add_argument("--progress", default="auto")
    ap.add_argument(
        "--command", action="store_true", help="time the whole `eir-server sync --once` process"
    )
    a = ap.parse_args()
    work = Path(a.workdir)
    src = make_zip(work, a.imeis, a.seed)
    tmp = Path(tempfile.mkdtemp(prefix="eir-bench-redis-"))
    proc, port = start_redis(tmp)
    try:
        c = redis.Redis(port=port)
        base = used(c)
        url = f"redis://127.0.0.1:{port}/0"
        if a.command:
            whole_command(src, url, c)
            return
        db = RegisterDB(parse_store_url(url))
        opts = SyncOptions(grace=0, bucket_size=a.bucket_size, progress=Progress(a.progress))
        cpu0, rcpu0 = cpu_self(), cpu_redis(c)
        t = time.perf_counter()
        r = run_once(DirSource(src), db, opts)
        dt = time.perf_counter() - t
        cpu, rcpu = cpu_self() - cpu0, cpu_redis(c) - rcpu0
        mem = used(c) - base
        rows = [
            ("full load rows", f"{r.rows:,}"),
            ("listed IMEIs", f"{r.imeis:,}"),
            ("full load time s", f"{dt:.2f}"),
            ("full load rows/s", f"{r.rows / dt:,.0f}"),
            # CPU of this process (all threads) and of redis-server: wall well above the larger
            # of the two means the load was starved by other work on the machine.
            ("sync CPU s (µs/row)", f"{cpu:.2f} ({cpu / max(r.rows, 1) * 1e6:.2f})"),
            ("redis CPU s (µs/row)", f"{rcpu:.2f} ({rcpu / max(r.rows, 1) * 1e6:.2f})"),
            ("redis bytes / IMEI", f"{mem / r.imeis:.2f}"),
            ("buckets (keys)", c.dbsize()),
            (
                "sync peak RSS MB",
                f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}",
            ),
        ]
        enc = c.object("encoding", next(c.scan_iter(f"eir:{r.version}:b:*", count=100)))
        rows.append(("bucket encoding", enc.decode() if enc else "-"))
        if a.delta:
            add_delta(src, a.delta, a.seed)
            t = time.perf_counter()
            r2 = run_once(DirSource(src), db, opts)
            dt2 = time.perf_counter() - t
            rows += [
                ("delta mode", r2.mode),
                ("delta rows", f"{r2.rows:,}"),
                ("delta time s", f"{dt2:.2f}"),
                ("IMEIs after delta", f"{r2.imeis:,}"),
                ("redis bytes / IMEI after", f"{(used(c) - base) / r2.imeis:.2f}"),
            ]
        if a.naive:
            rows.append(("naive SET per IMEI bytes", f"{naive_bytes(c, src, a.naive):.2f}"))
        w = max(len(k) for k, _ in rows)
        print(f"\n{'metric':<{w}}  value")
        for k, v in rows:
            print(f"{k:<{w}}  {v}")
        db.close()
    finally:
        proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

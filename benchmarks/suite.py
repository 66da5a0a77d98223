"""The benchmark suite: every figure an operator asks for, in one JSON file and one table.

    make bench                                   # full profile, all suites, README updated
    make bench COMPILED=1                        # the same on the mypyc build (build/compiled)
    .venv/bin/python -m benchmarks.suite --profile quick               # ~10 min on 2 cores
    .venv/bin/python -m benchmarks.suite --suite ecr --suite otp       # some suites only
    .venv/bin/python -m benchmarks.suite --compare OLD.json [NEW.json] # change per figure

Suites (each also alone with --suite NAME): codec, policy, ecr (end to end through
`eir-server load` at 1 and 2 workers, closed and open loop, embedded store and Redis with cache
hits and misses), otp (the Erlang/OTP diameter EIR side by side with ours, same core, same
client), n5g (N5g-eir with h2load; skipped with the reason when not available), register (full
load rows/s and Redis bytes per IMEI), during_load (ECR p99 while a full register load runs),
storm (open loop far above capacity: answers, 3004s, timeouts, then recovery).

Writes OUT.json (machine, profile, build, figures with their units, targets and which direction
is better), OUT.md (the table) and one PNG per suite next to them. A suite that cannot run (tool
missing) is recorded as skipped with its reason; one that fails is recorded with the error and
the others still run. Benchmarks never run in the test suite; tests/test_bench.py runs the
`smoke` profile on tiny inputs to prove every suite starts and writes a well-formed report.

The build measured ("mypyc" or "python") is the one of the tree this file is in: the suites run
in-process import it, and so does every eir-server process started (serve, sync, load), which
is checked before and per server. Any other build stops the run before the results file is
written, as its figures would be filed under the wrong build; --expect-build also stops a run
of a build other than the one meant (`make bench COMPILED=1` means mypyc).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BIN = Path(sys.executable).parent
EXE = str(BIN / "eir-server")
HOST = "127.0.0.1"
RESULTS = ROOT / "benchmarks" / "results"
# For every EXE run: the venv's eir-server script would import the editable install's tree (the
# repository), not this one when this is a copy such as build/compiled; PYTHONPATH comes first.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}


# ---------------------------------------------------------------------------------------------
# Profiles: what each suite does at each size.


@dataclass(frozen=True)
class Profile:
    name: str
    seconds: float  # measured seconds per load run
    warmup: float
    codec_reps: int
    policy_n: int
    open_rate: int  # open-loop ECR/s for the latency figures
    miss_imeis: int  # distinct IMEIs for the cache-miss runs (more than one run sends)
    ecr_matrix: tuple[tuple[str, int, str], ...]  # (store, workers, loop)
    register_sizes: tuple[int, ...]
    during_rows: int
    during_rate: int
    storm_rate: int
    storm_seconds: float


# redis-snapshot-miss: the Redis store with the node's register snapshot (`snapshot_dir`), the
# other answer to a miss than a round trip; one worker is enough to compare the two.
# cluster-snapshot-miss: the same, the register in a 3-master Redis Cluster. closed8: 4 x 8 in
# flight (32), where closed is 4 x 64 (256): fewer requests per turn of the loop.
FULL_MATRIX = tuple((s, w, m) for s in ("memory", "redis-hit", "redis-miss") for w in (1, 2)
                    for m in ("closed", "open")) + tuple(
    ("redis-snapshot-miss", 1, m) for m in ("closed", "closed8", "open")) + (
    ("redis-miss", 1, "closed8"),
    ("cluster-snapshot-miss", 1, "closed"), ("cluster-snapshot-miss", 1, "closed8"))
PROFILES = {
    "smoke": Profile("smoke", 0.6, 0.2, 300, 2_000, 500, 20_000,
                     (("memory", 1, "closed"), ("redis-miss", 1, "open")), (2_000,), 5_000,
                     300, 3_000, 0.6),
    "quick": Profile("quick", 4.0, 1.0, 20_000, 100_000, 5_000, 300_000, FULL_MATRIX,
                     (1_000_000,), 1_000_000, 5_000, 60_000, 4.0),
    "full": Profile("full", 10.0, 2.0, 100_000, 200_000, 5_000, 1_000_000, FULL_MATRIX,
                    (1_000_000, 10_000_000), 10_000_000, 5_000, 100_000, 8.0),
}

# The targets the README shows next to the figures (what "good enough" means for each).
TARGETS: dict[str, tuple[float, str]] = {
    "ecr.memory.w1.closed.answers_per_s": (50_000, "≥"),
    "ecr.memory.w1.open.p99_ms": (10.0, "≤"),
    "ecr.redis-miss.w1.open.p99_ms": (10.0, "≤"),
    "ecr.redis-snapshot-miss.w1.closed.server_cpu_us": (10.0, "≤"),
    "ecr.redis-snapshot-miss.w1.closed8.server_cpu_us": (15.0, "≤"),
    "ecr.cluster-snapshot-miss.w1.closed.server_cpu_us": (10.0, "≤"),
    "ecr.cluster-snapshot-miss.w1.closed8.server_cpu_us": (15.0, "≤"),
    "codec.ecr_in_eca_out_us": (10.0, "≤"),
    "policy.decide_common_us": (2.0, "≤"),
    "register.rows_per_s_1M": (200_000, "≥"),
    "register.redis_bytes_per_imei_10M": (32.0, "≤"),
    "during_load.p99_during_ms": (50.0, "≤"),
    "storm.recovery_s": (5.0, "≤"),
}


class Skip(Exception):
    """A suite that cannot run here (missing tool); the reason goes in the report."""


class BuildMismatch(Exception):
    """A process of the run is not the build being measured: the whole run stops, as its figures
    would be recorded under the wrong build."""


# The build every process of the run must be (set by run()); None outside a run (bench_tail).
EXPECTED_BUILD: str | None = None


class Figures:
    def __init__(self, suite: str) -> None:
        self.suite = suite
        self.items: dict[str, dict[str, Any]] = {}

    def add(self, name: str, value: float | int | None, unit: str, better: str,
            label: str) -> None:
        key = f"{self.suite}.{name}"
        f: dict[str, Any] = {"value": None if value is None else round(float(value), 4),
                             "unit": unit, "better": better, "label": label}
        if key in TARGETS:
            f["target"], f["target_op"] = TARGETS[key]
        self.items[key] = f


@dataclass
class Ctx:
    profile: Profile
    out_dir: Path
    work: Path
    plots: list[str]
    notes: list[str]


# ---------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((HOST, port), 0.3).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listening on {port}") from None
            time.sleep(0.1)


def _tree_stats(pid: int) -> dict[int, list[str]]:
    """/proc/PID/stat fields (after the command name) of a process and all its descendants."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(d.name)] = f
            children.setdefault(int(f[1]), []).append(int(d.name))
    tree: dict[int, list[str]] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            tree[p] = stats[p]
        todo += children.get(p, [])
    return tree


def tree_cpu(pid: int) -> float:
    """utime+stime (s) of a process and all its descendants (the serve workers)."""
    return sum((int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
               for f in _tree_stats(pid).values())


def process_build(pid: int) -> str:
    """The build a running eir-server (with its workers) has loaded: "mypyc" when it mapped
    this tree's compiled modules, "python" when it mapped no compiled eir_server module. What
    the process did, not what its command would print: a worker could differ from its parent."""
    from importlib.machinery import EXTENSION_SUFFIXES
    ours = str(ROOT / "eir_server") + os.sep
    mapped: set[str] = set()
    for p in _tree_stats(pid):
        try:
            maps = Path(f"/proc/{p}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            fields = line.split(maxsplit=5)  # the sixth, the file, is absent for anonymous maps
            path = fields[5].strip() if len(fields) == 6 else ""
            if "/eir_server/" in path and path.endswith(tuple(EXTENSION_SUFFIXES)):
                mapped.add(path)
    foreign = sorted(m for m in mapped if not m.startswith(ours))
    if foreign:
        raise BuildMismatch(f"process {pid} runs compiled modules of another tree: {foreign[0]}")
    return "mypyc" if mapped else "python"


def cli_build() -> tuple[str, str]:
    """The build the suite's eir-server command (sync, load, serve) reports, and its line."""
    p = subprocess.run([EXE, "--version"], capture_output=True, text=True, timeout=60, env=ENV)
    line = p.stdout.strip()
    if p.returncode != 0 or not line.endswith(")"):
        raise BuildMismatch(f"{EXE} --version: exit {p.returncode}: {(line + p.stderr)[-500:]}")
    return line.rsplit("(", 1)[1].rstrip(")"), line


class Server:
    """`eir-server serve` on a free port, optionally pinned with taskset; stopped again with
    BuildMismatch unless it runs the build `expect` (default: the run's)."""

    def __init__(self, *args: str, cpu: int | None = None, expect: str | None = None) -> None:
        self.port = free_port()
        cmd = [EXE, "serve", "--diameter-listen", f"{HOST}:{self.port}", "--metrics-listen", "",
               "--log-level", "warning", *args]
        if cpu is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", str(cpu), *cmd]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, env=ENV)
        try:
            wait_port(self.port, self.proc)
            self.build = process_build(self.proc.pid)
            expect = expect or EXPECTED_BUILD
            if expect is not None and self.build != expect:
                raise BuildMismatch(f"measuring the {expect} build, but the server "
                                    f"{' '.join(cmd)} runs {self.build}")
        except (RuntimeError, BuildMismatch):
            self.stop()
            raise

    def cpu(self) -> float:
        return tree_cpu(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Redis:
    def __init__(self, work: Path) -> None:
        from benchmarks.bench_sync_load import start_redis
        self.dir = Path(tempfile.mkdtemp(prefix="redis-", dir=work))
        self.proc, self.port = start_redis(self.dir)
        self.url = f"redis://{HOST}:{self.port}/0"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def sync(url: str, src: Path, *extra: str) -> float:
    t = time.perf_counter()
    p = subprocess.run([EXE, "sync", "--source", str(src), "--store", url, "--once",
                        "--progress", "never", "--grace", "0", *extra], capture_output=True,
                       text=True, timeout=3600, env=ENV)
    if p.returncode != 0:
        raise RuntimeError(f"eir-server sync exit {p.returncode}: {p.stderr[-2000:]}")
    return time.perf_counter() - t


def load(ctx: Ctx, port: int, *args: str, seconds: float | None = None,
         warmup: float | None = None, cpu: int | None = None,
         check: bool = True) -> dict[str, Any]:
    """One `eir-server load` run (a separate process, as an operator runs it); its report."""
    out = Path(tempfile.mkstemp(suffix=".json", dir=ctx.work)[1])
    cmd = [EXE, "load", "--target", f"{HOST}:{port}", "--progress", "off", "--json", str(out),
           "--duration", str(seconds or ctx.profile.seconds),
           "--warmup", str(ctx.profile.warmup if warmup is None else warmup), *args]
    if cpu is not None:
        cmd += ["--pin", str(cpu)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=ENV)
    try:
        r: dict[str, Any] = json.loads(out.read_text())
    except (OSError, ValueError):
        raise RuntimeError(f"eir-server load wrote no report (exit {p.returncode}): "
                           f"{p.stdout[-1000:]}{p.stderr[-1000:]}") from None
    if check and p.returncode not in (0, 4):
        raise RuntimeError(f"eir-server load exit {p.returncode}: {r.get('exit_reason')}")
    return r


# ---------------------------------------------------------------------------------------------
# Suites


def suite_codec(ctx: Ctx, f: Figures) -> None:
    from benchmarks.bench_ecr_path import measure as ecr_path
    from eir_server.diameter.codec import decode, validate
    from eir_server.diameter.dictionary import load_dictionary
    from eir_server.load.imeis import parse_range
    from eir_server.load.s13 import AnswerChecker, EcrTemplates, Identity, cer, entry_block

    d = load_dictionary()
    n = ctx.profile.codec_reps
    me = Identity("mme0.bench", "bench", "localdomain")
    tpl = EcrTemplates(me, 0, [entry_block(e) for e in parse_range("range:35209900000000:64")])
    ecr = tpl.request(1, 1, 1)
    grammar = d.compiled.request(16777252, 324)

    def per(fn: Callable[[], object]) -> float:
        fn()
        t = time.process_time()
        for _ in range(n):
            fn()
        return (time.process_time() - t) / n * 1e6

    f.add("ecr_in_eca_out_us", ecr_path(64, max(n * 4, 6_400))["per_ecr_us"], "µs", "lower",
          "ECR in → ECA out, core only (fast path, policy, duplicate cache, device "
          "signals), batches of 64 cycling 100,000 devices")
    f.add("decode_ecr_us", per(lambda: decode(ecr, d)), "µs", "lower",
          "general decoder: ECR")
    f.add("decode_validate_ecr_us", per(lambda: validate(decode(ecr, d), grammar)), "µs",
          "lower", "general decoder + grammar validation: ECR")
    c = cer(me)
    f.add("decode_cer_us", per(lambda: decode(c, d)), "µs", "lower", "general decoder: CER")
    f.add("encode_ecr_template_us", per(lambda: tpl.request(1, 7, 7)), "µs", "lower",
          "load generator: ECR from its template")
    from benchmarks.bench_ecr_path import eca_for
    eca = eca_for(ecr)
    chk = AnswerChecker(d)
    f.add("check_eca_new_body_us", per(lambda: chk.classify(eca)), "µs", "lower",
          "load generator: strict check of an ECA body not seen before")


def suite_policy(ctx: Ctx, f: Figures) -> None:
    from benchmarks.bench_policy import measure
    n = ctx.profile.policy_n
    r = measure(n, min(2_000, n), 3, n_tacs=200_000 if n >= 100_000 else 5_000)
    for key, label in (("14-digit IMEI, no record (common case)", "decide_common_us"),
                       ("15-digit IMEI (Luhn checked), no record", "decide_luhn_us"),
                       ("national blacklist record", "decide_blacklisted_us"),
                       ("blacklisted + exception pair", "decide_pair_us")):
        hot, cold = r[key]
        f.add(label, hot / 1000, "µs", "lower", f"policy decision: {key} (hot)")
        f.add(label.replace("_us", "_cold_us"), cold / 1000, "µs", "lower",
              f"policy decision: {key} (cold caches)")


def _register(ctx: Ctx, rows: int) -> Path:
    from benchmarks.bench_sync_load import make_zip
    return Path(make_zip(ctx.work / "registers", rows, 1))


def _ecr_row(ctx: Ctx, f: Figures, server: Server, name: str, label: str, workers: int,
             loop_args: list[str], imeis: str, curves: dict[str, Any]) -> None:
    cpu0 = server.cpu()
    r = load(ctx, server.port, "--connections", "4", "--imeis", imeis, *loop_args,
             cpu=1 if workers == 1 else None)
    cpu = server.cpu() - cpu0
    lat = r["latency_ms"]
    # the server's CPU covers the warm-up too: so must the answers it is divided by
    n = max(r["answers"] + r["warmup_answers"], 1)
    f.add(f"{name}.answers_per_s", r["throughput_per_s"], "/s", "higher", f"{label}: answers/s")
    for p in ("p50", "p99", "p99.9"):
        f.add(f"{name}.{p}_ms", lat[p], "ms", "lower", f"{label}: latency {p}")
    f.add(f"{name}.server_cpu_us", cpu / n * 1e6, "µs", "lower",
          f"{label}: server CPU per answer (all processes)")
    f.add(f"{name}.generator_cpu_us", r["generator"]["cpu_us_per_request"], "µs", "lower",
          f"{label}: generator CPU per request")
    f.add(f"{name}.errors", r["timeouts"] + r["malformed"] + r["mismatches"]
          + sum(v for k, v in r["results"].items() if k != "Result-Code 2001"), "", "lower",
          f"{label}: timeouts + malformed + mismatches + non-2001")
    curves[name] = r


def _await_snapshot(snapdir: Path, server: Server, timeout: float = 120.0) -> None:
    """Until the worker's register snapshot is built (the file appears) and mapped: before
    that, misses make Redis round trips, which the redis-miss row measures."""
    deadline = time.monotonic() + timeout
    while not any(snapdir.glob("*.snap")):
        if time.monotonic() > deadline or server.proc.poll() is not None:
            raise RuntimeError(f"no register snapshot in {snapdir} after {timeout:.0f} s")
        time.sleep(0.2)
    time.sleep(2.0)  # the builder renamed it into place: the worker maps it when told


def suite_ecr(ctx: Ctx, f: Figures) -> None:
    p = ctx.profile
    curves: dict[str, Any] = {}
    redis = None
    cluster: contextlib.ExitStack | None = None
    cluster_url = ""
    try:
        for store, workers, mode in p.ecr_matrix:
            args = ["--workers", str(workers)]
            imeis = "range:35209900000000:2000"
            snapdir = None
            if store.startswith("cluster"):
                if cluster is None:
                    from benchmarks.bench_miss_path import local_cluster
                    cluster = contextlib.ExitStack()
                    cluster_url = cluster.enter_context(local_cluster(
                        Path(tempfile.mkdtemp(prefix="cluster-", dir=ctx.work))))
                    sync(cluster_url, _register(ctx, 20_000))
                url = cluster_url
            elif store != "memory":
                if redis is None:
                    redis = Redis(ctx.work)
                    sync(redis.url, _register(ctx, 20_000))
                url = redis.url
            if store != "memory":
                if store.endswith("snapshot-miss"):
                    snapdir = Path(tempfile.mkdtemp(prefix="snap-", dir=ctx.work))
                    args += ["--store", f"{url}?snapshot_dir={snapdir}"]
                else:
                    args += ["--store", url]
                if store.endswith("-miss"):  # each request a new IMEI: none is in a cache
                    imeis = f"range:35210000000000:{p.miss_imeis}"
            inflight = {"closed": 64, "closed8": 8}.get(mode)
            loop_args = (["--inflight", str(inflight)] if inflight
                         else ["--rate", str(p.open_rate)])
            label = (f"ECR {store}, {workers} worker{'s' if workers > 1 else ''}, "
                     + (f"open loop at {p.open_rate}/s" if inflight is None else
                        f"closed loop, 4 x {inflight} in flight"))
            server = Server(*args, cpu=0 if workers == 1 else None)
            try:
                if snapdir is not None:
                    _await_snapshot(snapdir, server)
                _ecr_row(ctx, f, server, f"{store}.w{workers}.{mode}", label, workers,
                         loop_args, imeis, curves)
            finally:
                server.stop()
    finally:
        if redis is not None:
            redis.stop()
        if cluster is not None:
            cluster.close()
    plot_percentiles(ctx, "ecr", curves, "ECR end to end: latency percentile curves")


def suite_otp(ctx: Ctx, f: Figures) -> None:
    for tool in ("erl", "erlc", "diameterc"):
        if shutil.which(tool) is None:
            raise Skip(f"{tool} not found (apt-get install erlang-base erlang-diameter "
                       "erlang-dev)")
    from benchmarks import bench_otp_baseline as otp
    ebin = Path(tempfile.mkdtemp(prefix="otp-", dir=ctx.work))
    otp.compile_otp(ebin)
    # Alternated otp, ours, ours, otp: this VM's speed drifts by tens of percent within
    # minutes, and one run each, back to back, put that drift into the ratio. In this order a
    # linear drift weighs both servers alike; each adjacent pair also gives its own ratio, and
    # the worse pair is reported beside the totals (the goal is per run, not on average).
    order = ("otp", "ours", "ours", "otp")
    done: dict[str, list[tuple[dict[str, Any], float, int]]] = {"otp": [], "ours": []}
    for name in order:
        if name == "otp":
            srv: Any = otp.OtpServer(ebin, HOST, free_port(), 0, "1:1", [], True)
            pid = srv.pid
        else:
            srv = Server(cpu=0)
            pid = srv.proc.pid
        try:
            cpu0 = tree_cpu(pid)
            r = load(ctx, srv.port, "--connections", "4", "--inflight", "64", cpu=1)
            cpu = tree_cpu(pid) - cpu0
        finally:
            srv.stop()
        answered = r["answers"] + r["warmup_answers"]  # the CPU covers the warm-up too
        done[name].append((r, cpu, answered))
    curves: dict[str, Any] = {}
    per_answer: dict[str, float] = {}
    rate: dict[str, float] = {}
    for name, label in (("otp", "Erlang/OTP diameter EIR (fixed answer)"),
                        ("ours", "eir-server")):
        rs = done[name]
        rate[name] = sum(r["throughput_per_s"] for r, _, _ in rs) / len(rs)
        per_answer[name] = sum(c for _, c, _ in rs) / max(sum(a for _, _, a in rs), 1)
        curves[name] = rs[0][0]
        f.add(f"{name}.answers_per_s", rate[name], "/s", "higher",
              f"{label}, one core, 4 x 64 in flight: answers/s (mean of {len(rs)} runs)")
        f.add(f"{name}.p99_ms", max(r["latency_ms"]["p99"] for r, _, _ in rs), "ms", "lower",
              f"{label}: latency p99 (worse run)")
        f.add(f"{name}.server_cpu_us", per_answer[name] * 1e6, "µs", "lower",
              f"{label}: server CPU per answer")
        f.add(f"{name}.generator_cpu_us",
              sum(r["generator"]["cpu_us_per_request"] for r, _, _ in rs) / len(rs), "µs",
              "lower", f"{label} run: generator CPU per request")
    f.add("ratio", rate["ours"] / max(rate["otp"], 1e-9), "×", "higher",
          "eir-server answers/s ÷ OTP answers/s")
    # Per core proper: answers/s can be capped by the generator; CPU per answer is what each
    # server spends.
    f.add("cpu_ratio", per_answer["otp"] / max(per_answer["ours"], 1e-12), "×", "higher",
          "OTP server CPU per answer ÷ eir-server's")
    pairs = zip(done["otp"], done["ours"], strict=True)  # (1st otp, 1st ours), (2nd, 2nd)
    f.add("cpu_ratio_min", min((oc / max(oa, 1)) / max(uc / max(ua, 1), 1e-12)
                               for (_, oc, oa), (_, uc, ua) in pairs), "×", "higher",
          "OTP server CPU per answer ÷ eir-server's, the worse of two adjacent pairs")
    shutil.rmtree(ebin, ignore_errors=True)
    plot_percentiles(ctx, "otp", curves, "eir-server vs Erlang/OTP diameter, same core")


def _n5g_flag() -> str | None:
    help_text = subprocess.run([EXE, "serve", "--help"], capture_output=True, text=True,
                               env=ENV).stdout
    for flag in ("--n5g-listen", "--http-listen", "--n5g-eir-listen", "--sbi-listen"):
        if flag in help_text:
            return flag
    return None


def suite_n5g(ctx: Ctx, f: Figures) -> None:
    h2load = shutil.which("h2load")
    if h2load is None:
        raise Skip("h2load not found (apt-get install nghttp2-client)")
    flag = _n5g_flag()
    if flag is None:
        raise Skip("this build of eir-server has no N5g-eir (HTTP/2) listener")
    port = free_port()
    server = Server(flag, f"{HOST}:{port}", cpu=0)
    try:
        wait_port(port, None)
        url = (f"http://{HOST}:{port}/n5g-eir-eic/v1/equipment-status"
               "?pei=imei-352099001761481")
        cmd = ["taskset", "-c", "1", h2load, "-D", str(max(1, round(ctx.profile.seconds))),
               "-c", "4", "-m", "64", "-t", "1", url]
        cpu0 = server.cpu()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        cpu = server.cpu() - cpu0
    finally:
        server.stop()
    out = p.stdout
    import re
    m = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    st = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    req = re.search(r"time for request:\s+([\d.]+)(\w+)\s+([\d.]+)(\w+)\s+([\d.]+)(\w+)", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, "
                     r"(\d+) failed", out)
    if m is None or done is None:
        raise RuntimeError(f"h2load output not understood (exit {p.returncode}):\n{out[-1500:]}")

    def ms(v: str, unit: str) -> float:
        return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}.get(unit, 1.0)

    f.add("requests_per_s", float(m.group(1)), "/s", "higher",
          "N5g-eir GET equipment-status, h2load 4 x 64 streams: requests/s")
    if req:
        f.add("mean_ms", ms(req.group(5), req.group(6)), "ms", "lower", "N5g-eir: mean latency")
        f.add("max_ms", ms(req.group(3), req.group(4)), "ms", "lower", "N5g-eir: max latency")
    f.add("failed", int(done.group(3)) + (int(st.group(4)) + int(st.group(3)) if st else 0), "",
          "lower", "N5g-eir: failed + 4xx + 5xx")
    f.add("server_cpu_us", cpu / max(int(done.group(2)), 1) * 1e6, "µs", "lower",
          "N5g-eir: server CPU per request")


def suite_register(ctx: Ctx, f: Figures) -> None:
    import redis as redis_lib

    from benchmarks.bench_sync_load import used
    for rows in ctx.profile.register_sizes:
        src = _register(ctx, rows)
        r = Redis(ctx.work)
        try:
            c = redis_lib.Redis(port=r.port)
            base = used(c)
            dt = sync(r.url, src)
            mem = used(c) - base
        finally:
            r.stop()
        tag = f"{rows // 1_000_000}M" if rows >= 1_000_000 else f"{rows // 1000}k"
        f.add(f"rows_per_s_{tag}", rows / dt, "/s", "higher",
              f"register full load, {rows:,} blacklist rows: rows/s (eir-server sync, wall)")
        f.add(f"redis_bytes_per_imei_{tag}", mem / rows, "B", "lower",
              f"Redis memory per listed IMEI at {rows:,}")


def suite_during_load(ctx: Ctx, f: Figures) -> None:
    """Open-loop ECRs from Redis (cached, fetched, and changing verdicts) while `eir-server
    sync --force-full` loads a large register on the same machine; the load generator runs
    until the sync is over plus a tail, then is stopped with SIGINT (it still reports)."""
    p = ctx.profile
    redis = Redis(ctx.work)
    server = None
    gen = None
    try:
        sync(redis.url, _register(ctx, 2_000))
        big = _register(ctx, p.during_rows)
        server = Server("--store", redis.url)
        out = ctx.work / "during.json"
        cmd = [EXE, "load", "--target", f"{HOST}:{server.port}", "--progress", "on",
               "--json", str(out), "--rate", str(p.during_rate), "--connections", "2",
               "--warmup", "0", "--duration", "3600", "--imeis",
               "range:35210000000000:200000", "--max-timeouts", "1"]
        gen = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
        started = threading.Event()

        def watch() -> None:  # the first progress line: the run's first second is over
            assert gen is not None and gen.stderr is not None
            while chunk := gen.stderr.read1(4096):  # type: ignore[attr-defined]
                if b"answers/s" in chunk:
                    started.set()

        threading.Thread(target=watch, daemon=True).start()
        if not started.wait(120):
            raise RuntimeError("eir-server load did not start")
        time.sleep(p.seconds)  # the "before" period
        s0 = time.time()
        dt = sync(redis.url, big, "--force-full")
        s1 = time.time()
        time.sleep(p.seconds)
        gen.send_signal(signal.SIGINT)
        gen.wait(120)
        r = json.loads(out.read_text())
    finally:
        if gen is not None and gen.poll() is None:
            gen.kill()
            gen.wait(10)
        if server is not None:
            server.stop()
        redis.stop()
    tl = r["timeline"]
    s0, s1 = s0 - r["t0_unix"], s1 - r["t0_unix"]
    before = [s["p99_ms"] for s in tl if s["t"] + 1 <= s0 and s["answers"]]
    during = [s for s in tl if s["t"] < s1 and s["t"] + 1 > s0]
    label = f"ECR at {p.during_rate}/s while `eir-server sync` loads {p.during_rows:,} rows"
    f.add("p99_before_ms", max(before) if before else None, "ms", "lower",
          f"{label}: worst per-second p99 before")
    f.add("p99_during_ms", max((s["p99_ms"] for s in during), default=None), "ms", "lower",
          f"{label}: worst per-second p99 during the load")
    f.add("max_during_ms", max((s["max_ms"] for s in during), default=None), "ms", "lower",
          f"{label}: max during")
    f.add("sync_s", dt, "s", "lower", f"{label}: load time")
    f.add("errors", r["timeouts"] + r["malformed"] + sum(
        v for k, v in r["results"].items() if k != "Result-Code 2001"), "", "lower",
        f"{label}: timeouts + malformed + non-2001")
    plot_timeline(ctx, "during_load", r, [(s0, s1, "sync")], label)


def suite_storm(ctx: Ctx, f: Figures) -> None:
    """Open loop far above capacity through the Redis miss path, then a normal rate: what the
    EIR answers (2001 or 3004 TOO_BUSY), what times out, and how long until p99 is back."""
    p = ctx.profile
    redis = Redis(ctx.work)
    server = None
    try:
        sync(redis.url, _register(ctx, 2_000))
        server = Server("--store", redis.url, "--max-in-flight", "2000", cpu=0)
        storm = load(ctx, server.port, "--rate", str(p.storm_rate), "--connections", "4",
                     "--timeout", "1", "--max-timeouts", "1", "--imeis",
                     f"range:35210000000000:{min(p.miss_imeis, 2_000_000)}",
                     seconds=p.storm_seconds, warmup=0, cpu=1)
        after = load(ctx, server.port, "--rate", str(p.open_rate // 2 or 100), "--connections",
                     "4", "--timeout", "1", "--max-timeouts", "1", "--imeis",
                     "range:35220000000000:100000", seconds=max(p.storm_seconds, 2.0),
                     warmup=0, cpu=1)
    finally:
        if server is not None:
            server.stop()
        redis.stop()
    res = storm["results"]
    total = storm["requests"] or 1
    f.add("offered_per_s", p.storm_rate, "/s", "", "storm: offered ECR/s (open loop)")
    f.add("answered_per_s", storm["throughput_per_s"], "/s", "higher", "storm: answers/s")
    f.add("ok_share", res.get("Result-Code 2001", 0) / total, "", "higher",
          "storm: share of requests answered 2001")
    f.add("busy_3004_share", res.get("Result-Code 3004", 0) / total, "", "",
          "storm: share answered 3004 DIAMETER_TOO_BUSY")
    f.add("timeout_share", storm["timeouts"] / total, "", "lower",
          "storm: share timed out (> 1 s)")
    f.add("malformed", storm["malformed"], "", "lower", "storm: malformed answers")
    rec = None
    for s in after["timeline"]:
        if s["answers"] and s["p99_ms"] < 10 and not s["timeouts"]:
            rec = s["t"]
            break
    f.add("recovery_s", rec, "s", "lower",
          "after the storm: seconds until a second with p99 < 10 ms and no timeout")
    f.add("after_p99_ms", after["latency_ms"]["p99"], "ms", "lower",
          f"after the storm, {p.open_rate // 2}/s: p99")
    plot_timeline(ctx, "storm", storm, [], f"storm at {p.storm_rate}/s offered")


SUITES: dict[str, Callable[[Ctx, Figures], None]] = {
    "codec": suite_codec, "policy": suite_policy, "ecr": suite_ecr, "otp": suite_otp,
    "n5g": suite_n5g, "register": suite_register, "during_load": suite_during_load,
    "storm": suite_storm,
}


# ---------------------------------------------------------------------------------------------
# Plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_percentiles(ctx: Ctx, suite: str, runs: dict[str, Any], title: str) -> None:
    """Latency by percentile (HDR-style: x = 1/(1-p)) for each run of a suite."""
    from eir_server.load.hist import Histogram
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    ps = [50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99]
    for name, r in runs.items():
        h = Histogram.from_pairs(r["latency_histogram_us"])
        if h.total:
            ax.plot([1 / (1 - p / 100) for p in ps], [h.percentile(p) / 1000 for p in ps],
                    marker=".", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([1 / (1 - p / 100) for p in ps])
    ax.set_xticklabels([f"{p:g}" for p in ps], fontsize=7)
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency ms")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = ctx.out_dir / f"{suite}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    ctx.plots.append(path.name)


def plot_timeline(ctx: Ctx, suite: str, r: dict[str, Any], spans: list[tuple[float, float, str]],
                  title: str) -> None:
    from eir_server.load.report import plot
    path = ctx.out_dir / f"{suite}.png"
    plot(r, path, title, spans)
    ctx.plots.append(path.name)


# ---------------------------------------------------------------------------------------------
# Machine, report, compare


def _cmd_version(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None


def machine() -> dict[str, Any]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    try:
        import uvloop
        uv = uvloop.__version__
    except ImportError:
        uv = None
    redis_v = _cmd_version(["redis-server", "--version"])
    otp_v = _cmd_version(["erl", "-noshell", "-eval",
                          "io:format(\"~s\", [erlang:system_info(otp_release)]), halt()."])
    from benchmarks.bench_otp_baseline import busy_cpus
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "uvloop": uv, "redis": (redis_v or "").split(" v=")[-1].split()[0] or None,
            "erlang_otp": otp_v or None, "kernel": platform.release(),
            "busy_cpus_before": round(busy_cpus(1.0), 2),
            "loadavg_before": [round(x, 2) for x in os.getloadavg()]}


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit in ("/s",) or abs(v) >= 1000:
        return f"{v:,.0f}{' /s' if unit == '/s' else ''}" if unit == "/s" else f"{v:,.0f} {unit}"
    if unit == "" and v < 1 and v != int(v):
        return f"{v:.3f}"
    if unit == "":
        return f"{v:,.0f}"
    return f"{v:.3g} {unit}" if abs(v) < 10 else f"{v:.1f} {unit}"


def target_text(fig: dict[str, Any]) -> str:
    if "target" not in fig:
        return ""
    return f"{fig['target_op']} {fmt(fig['target'], fig['unit'])}"


HEADLINE_SUFFIXES = (".answers_per_s", ".p99_ms", ".server_cpu_us", "ratio", "requests_per_s",
                     "p99_during_ms", "p99_before_ms", "answered_per_s", "busy_3004_share",
                     "timeout_share", "recovery_s", "sync_s")


def headline(key: str) -> bool:
    """The figures the README shows (latest.md has them all)."""
    name = key.split(".", 1)[1]
    return (key in TARGETS or key.endswith(HEADLINE_SUFFIXES) or name.startswith(
        ("rows_per_s", "redis_bytes_per_imei")))


BUILD_TEXT = {"mypyc": "compiled (mypyc) build", "python": "pure-Python build"}


def build_text(res: dict[str, Any]) -> str:
    b = res.get("build")
    return BUILD_TEXT.get(b, f"{b} build") if b else "build not recorded"


def markdown(res: dict[str, Any], only: Callable[[str], bool] | None = None) -> str:
    m = res["machine"]
    lines = [
        f"Profile `{res['profile']}`, {build_text(res)}, {res['finished']}, "
        f"{res['elapsed_s'] / 60:.1f} min. "
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, uvloop {m['uvloop']}, "
        f"Redis {m['redis']}, Erlang/OTP {m['erlang_otp']}; busy before the run: "
        f"{m['busy_cpus_before']} CPUs.",
    ]
    if res.get("provisional"):
        lines.append("")
        lines.append(f"**Provisional:** {res['provisional']}")
    lines += ["", "| suite | figure | value | target |", "|---|---|---|---|"]
    for name, s in res["suites"].items():
        if s["status"] != "ok":
            lines.append(f"| {name} | {s['status']}: {s.get('reason', '')} | | |")
            continue
        for key, fig in s["figures"].items():
            if only is not None and not only(key):
                continue
            lines.append(f"| {name} | {fig['label']} | {fmt(fig['value'], fig['unit'])} | "
                         f"{target_text(fig)} |")
    return "\n".join(lines) + "\n"


def compare(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The change per figure present in both runs; better/worse by the figure's direction."""
    def flat(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {k: v for s in r["suites"].values() for k, v in s.get("figures", {}).items()}

    a, b = flat(old), flat(new)
    rows = []
    if old.get("build") != new.get("build"):  # the compiled build changes most figures alone
        rows.append(f"different builds: old {build_text(old)}, new {build_text(new)}")
    rows.append(f"{'figure':<52}{'old':>14}{'new':>14}{'change':>10}")
    for k in [k for k in b if k in a]:
        va, vb = a[k]["value"], b[k]["value"]
        if va is None or vb is None:
            change = ""
        elif va == 0:
            change = "" if vb == 0 else "new"
        else:
            pct = (vb - va) / abs(va) * 100
            better = b[k].get("better")
            tag = ""
            if better and abs(pct) >= 1:
                tag = " better" if (pct > 0) == (better == "higher") else " worse"
            change = f"{pct:+.1f} %{tag}"
        rows.append(f"{k:<52}{fmt(va, a[k]['unit']):>14}{fmt(vb, b[k]['unit']):>14}  {change}")
    gone = sorted(a.keys() - b.keys())
    if gone:
        rows.append(f"only in the old run: {', '.join(gone)}")
    return "\n".join(rows)


README_BEGIN = "<!-- bench:begin (generated by `make bench` from benchmarks/results/latest.json) -->"
README_END = "<!-- bench:end -->"


def readme_section(res: dict[str, Any], rel_dir: str = "benchmarks/results") -> str:
    body = markdown(res, headline)
    plots = "".join(f"![{p}]({rel_dir}/{p})\n" for p in res.get("plots", []))
    return (f"{README_BEGIN}\n{body}\nEvery figure: [{rel_dir}/latest.md]({rel_dir}/latest.md)."
            f"\n\n{plots}{README_END}")


# Directory (beside the recorded results) of a run that may not replace them: partial, failed,
# or without --readme.
UNRECORDED = "unrecorded"


def readme_results(readme: Path) -> Path:
    """The results file a README's table shows (its links are relative to the README)."""
    return readme.parent / "benchmarks" / "results" / "latest.json"


def update_readme(res: dict[str, Any], readme: Path) -> None:
    text = readme.read_text()
    a, b = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    readme.write_text(text[:a] + readme_section(res) + text[b:])


def check_build(expect: str | None) -> tuple[str, str]:
    """The build this run measures, and the version line of its eir-server command: the
    in-process suites (codec, policy) and every process started must be the same build, and
    the one expected if given."""
    from eir_server import build_kind
    here = build_kind()
    cli, line = cli_build()
    if expect is not None and here != expect:
        raise BuildMismatch(f"measuring the {expect} build, but {ROOT} imports the {here} build"
                            + (" (make bench COMPILED=1 builds it)" if expect == "mypyc" else ""))
    if cli != here:
        raise BuildMismatch(f"the suite runs the {here} build but `{EXE} --version` (PYTHONPATH="
                            f"{ENV['PYTHONPATH']}) prints {line!r}")
    return here, line


def run(names: list[str], profile: Profile, out: Path, provisional: str | None,
        expect_build: str | None = None) -> dict[str, Any]:
    global EXPECTED_BUILD
    build, version = check_build(expect_build)
    EXPECTED_BUILD = build
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    res: dict[str, Any] = {"tool": "benchmarks/suite.py", "profile": profile.name,
                           "build": build, "eir_server_version": version,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "machine": machine(), "provisional": provisional, "suites": {},
                           "plots": []}
    with tempfile.TemporaryDirectory(prefix="eir-bench-") as tmp:
        work = Path(tmp)
        (work / "registers").mkdir()
        regcache = Path(tempfile.gettempdir()) / "eir-bench"  # generated registers are kept
        if profile.name != "smoke":
            (work / "registers").rmdir()
            (work / "registers").symlink_to(regcache, target_is_directory=True)
            regcache.mkdir(exist_ok=True)
        for name in names:
            ctx = Ctx(profile, out.parent, work, [], [])
            f = Figures(name)
            t = time.monotonic()
            print(f"== {name}", file=sys.stderr, flush=True)
            entry: dict[str, Any]
            try:
                SUITES[name](ctx, f)
                entry = {"status": "ok"}
            except Skip as e:
                entry = {"status": "skipped", "reason": str(e)}
            except BuildMismatch:
                raise
            except Exception as e:  # noqa: BLE001 - one suite's failure is reported, not fatal
                traceback.print_exc()
                entry = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:500]}
            entry["seconds"] = round(time.monotonic() - t, 1)
            entry["figures"] = f.items
            entry["plots"] = ctx.plots
            res["suites"][name] = entry
            res["plots"] += ctx.plots
            print(f"   {entry['status']} in {entry['seconds']} s "
                  f"{entry.get('reason', '')}", file=sys.stderr, flush=True)
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return res


def write_results(res: dict[str, Any], out: Path) -> None:
    out.write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    out.with_suffix(".md").write_text(markdown(res))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", action="append", choices=list(SUITES),
                    help="run this suite (repeatable; default: all)")
    ap.add_argument("--profile", choices=list(PROFILES), default="quick")
    ap.add_argument("--quick", dest="profile", action="store_const", const="quick",
                    help="same as --profile quick (~10 min on 2 cores)")
    ap.add_argument("--full", dest="profile", action="store_const", const="full",
                    help="same as --profile full")
    ap.add_argument("--out", default=str(RESULTS / "latest.json"),
                    help="results file; the .md table and PNGs go next to it")
    ap.add_argument("--provisional", default=None, metavar="NOTE",
                    help="mark the results provisional, with why (shown in the table)")
    ap.add_argument("--readme", nargs="?", const=str(ROOT / "README.md"), metavar="README",
                    help="rewrite the README performance table from the results (default: this "
                    "tree's; another when the suite runs from a copy such as build/compiled)")
    ap.add_argument("--expect-build", choices=sorted(BUILD_TEXT),
                    help="stop, measuring nothing, unless this is the build that runs")
    ap.add_argument("--compare", nargs="+", metavar="JSON",
                    help="OLD.json [NEW.json]: print the change per figure (NEW default: --out) "
                    "and run nothing")
    a = ap.parse_args(argv)
    if a.compare:
        old = json.loads(Path(a.compare[0]).read_text())
        new = json.loads(Path(a.compare[1] if len(a.compare) > 1 else a.out).read_text())
        print(compare(old, new))
        return 0
    out = Path(a.out)
    readme = Path(a.readme) if a.readme else ROOT / "README.md"
    # The README's table shows readme_results (a test checks they agree): a run writes there
    # only once it is known to rewrite the table too (whole, nothing failed, --readme), so it
    # runs in UNRECORDED beside it and its files are moved in at the end.
    staged = out
    if out.resolve() == readme_results(readme).resolve():
        staged = out.parent / UNRECORDED / out.name
        if staged.parent.exists():
            shutil.rmtree(staged.parent)
    try:
        res = run(a.suite or list(SUITES), PROFILES[a.profile], staged, a.provisional,
                  a.expect_build)
    except BuildMismatch as e:
        print(f"benchmarks.suite: wrong build, no results written: {e}", file=sys.stderr)
        return 2
    write_results(res, staged)
    print(markdown(res))
    failed = [n for n, s in res["suites"].items() if s["status"] == "failed"]
    partial = bool(a.suite) and set(a.suite) != set(SUITES)
    if staged != out:
        if a.readme and not failed and not partial:
            for name in [*res["plots"], staged.name, staged.with_suffix(".md").name]:
                (staged.parent / name).replace(out.parent / name)
            staged.parent.rmdir()
        else:
            print(f"results in {staged}, not {out}: the README's table shows that file and "
                  "this run does not replace it", file=sys.stderr)
            out = staged
    if a.readme:
        if failed:  # the recorded table stays the last whole run's
            print(f"not updating the README: {', '.join(failed)} failed", file=sys.stderr)
        elif partial:
            print("not updating the README from a partial run", file=sys.stderr)
        elif out.resolve() != readme_results(readme).resolve():
            print(f"not updating the README: it shows {readme_results(readme)}",
                  file=sys.stderr)
        else:
            update_readme(res, readme)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

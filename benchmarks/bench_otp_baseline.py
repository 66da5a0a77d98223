"""The Erlang/OTP `diameter` baseline for the S13 load: same client, OTP server, same core.

Compiles the S13 dictionary of the interop tests (tests/interop/erlang/s13.dia) and the
fixed-answer OTP EIR (benchmarks/otp_eir/otp_eir_s13.erl) with diameterc + erlc into a temporary
directory, starts it with one scheduler pinned to one core (`taskset -c 0 erl +S 1:1`), checks
that its ECA is well-formed (decoded and validated with our codec: Result-Code 2001,
Equipment-Status WHITELISTED, Session-Id and hop-by-hop echoed), then drives it with
`eir-server load` (closed loop, pinned to the other core) and reports answers/s, latency and
the server's CPU per answer (utime+stime of the beam process, all threads, from /proc).
The benchmark suite (`python -m benchmarks.suite --suite otp`) runs the same comparison.
With --ours, `eir-server serve` is measured the same way right after each OTP run.

    .venv/bin/python benchmarks/bench_otp_baseline.py --connections 1 4 --seconds 8 --ours
    .venv/bin/python benchmarks/bench_otp_baseline.py --schedulers 2:2   # two schedulers, one core

The OTP server does much less than ours per request: no policy, no store lookup, no duplicate
cache, no metrics or device signals; it answers 2001/WHITELISTED to every ECR OTP decoded
without errors. What it does do is OTP's own work: decode into a record, a process per request,
encode, traffic counters, one gen_tcp send per answer. Needs erlang-base, erlang-diameter and
erlang-dev (diameterc, erlc, the diameter include files). Not a test.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import json  # noqa: E402

from eir_server.diameter.codec import FLAG_P, FLAG_R, U32, decode, validate  # noqa: E402
from eir_server.diameter.dictionary import Dictionary, load_dictionary  # noqa: E402
from eir_server.load.imeis import ImeiEntry  # noqa: E402
from eir_server.load.s13 import EcrTemplates, Identity, cer, entry_block  # noqa: E402

DIA = ROOT / "tests" / "interop" / "erlang" / "s13.dia"
DICT_MODULE = "eir_interop_s13"  # @name in s13.dia
OTP_SRC = ROOT / "benchmarks" / "otp_eir" / "otp_eir_s13.erl"
OTP_MODULE = "otp_eir_s13"
OTP_ORIGIN_HOST = "eir.otp.test"
S13, TGPP = 16777252, 10415
ERLANG_PACKAGES = "erlang-base erlang-diameter erlang-dev"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    server: str
    connections: int
    in_flight: int
    answers: int
    elapsed: float
    latency_ms: dict  # the load report's latency_ms
    cpu: float  # server utime+stime over the run, seconds
    threads: int

    def row(self) -> str:
        p = [self.latency_ms[q] for q in ("p50", "p99", "p99.9")]
        return (f"{self.server:<18}{self.connections:>2} x {self.in_flight:<5}"
                f"{self.answers / self.elapsed:>11,.0f}{p[0]:>9.2f}{p[1]:>9.2f}{p[2]:>9.2f}"
                f"{self.cpu / max(self.answers, 1) * 1e6:>10.2f}"
                f"{self.cpu / self.elapsed * 100:>7.0f} %{self.threads:>5}")


HEADER = (f"{'server':<18}{'conns x fly':<12}{'answers/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'p99.9 ms':>9}{'µs CPU/ans':>11}{'CPU':>8}{'thr':>5}")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        sys.exit(f"{name} not found: install {ERLANG_PACKAGES}")
    return path


def compile_otp(out: Path) -> None:
    """diameterc + erlc: the S13 dictionary, then the server (which includes its .hrl)."""
    steps = [
        [tool("diameterc"), "-o", str(out), str(DIA)],
        [tool("erlc"), "-o", str(out), str(out / f"{DICT_MODULE}.erl")],
        [tool("erlc"), "-I", str(out), "-o", str(out), str(OTP_SRC)],
    ]
    for cmd in steps:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{p.stdout}{p.stderr}")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def pinned(cpu: int | None, cmd: list[str]) -> list[str]:
    """`taskset -c CPU cmd`: every thread the server starts inherits the affinity (pinning only
    the pid afterwards would leave BEAM's scheduler threads unpinned)."""
    return cmd if cpu is None else [tool("taskset"), "-c", str(cpu), *cmd]


def beam_pid(pid: int) -> int:
    """The process whose CPU we measure. taskset, erl (sh) and erlexec all exec, so it is
    normally `pid` itself; otherwise the first beam* descendant."""
    todo = [pid]
    while todo:
        p = todo.pop(0)
        try:
            if Path(f"/proc/{p}/comm").read_text().startswith("beam"):
                return p
            for t in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (t / "children").read_text().split()]
        except OSError:
            continue
    return pid


class OtpServer:
    def __init__(self, ebin: Path, host: str, port: int, cpu: int | None, schedulers: str,
                 erl_args: list[str], nodelay: bool) -> None:
        self.port = port
        self.out_path = ebin / f"otp-{port}.out"
        self.err_path = ebin / f"otp-{port}.err"
        self._out = open(self.out_path, "wb")  # noqa: SIM115 - closed in stop()
        self._err = open(self.err_path, "wb")  # noqa: SIM115
        cmd = pinned(cpu, [tool("erl"), "-noshell", "+S", schedulers, *erl_args, "-pa",
                           str(ebin), "-run", OTP_MODULE, "main", host, str(port),
                           "nodelay" if nodelay else "no_nodelay"])
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self._out,
                                     stderr=self._err)
        self._wait_line("listening", 30)
        self.pid = beam_pid(self.proc.pid)

    def _wait_line(self, prefix: str, timeout: float, after: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.out_path.read_text(errors="replace").splitlines()[after:]
            for line in lines:
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit(f"OTP server: no {prefix!r} line (exit {self.proc.returncode}):\n"
                         f"{self.out_path.read_text()}{self.err_path.read_text()}")
            time.sleep(0.05)

    def stats(self) -> tuple[int, int, int]:
        """OTP's own counters: ECRs received, ECAs sent with 2001, ECAs with another code."""
        seen = len(self.out_path.read_text().splitlines())
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"stats\n")
        self.proc.stdin.flush()
        _, ecr_in, ok, other = self._wait_line("stats ", 10, seen).split()
        return int(ecr_in), int(ok), int(other)

    def reports(self) -> list[str]:
        """Logger reports OTP wrote (callback crashes, encode/decode failures, restarts)."""
        text = self.err_path.read_text(errors="replace")
        return [m for m in ("ERROR REPORT", "CRASH REPORT", "SUPERVISOR REPORT")
                if m in text]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"stop\n")
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()
        self._err.close()


class OurServer:
    def __init__(self, host: str, port: int, cpu: int | None, server_args: list[str]) -> None:
        self.port = port
        self.cmd = pinned(cpu, [str(ROOT / ".venv/bin/eir-server"), "serve",
                                "--diameter-listen", f"{host}:{port}", "--metrics-listen", "",
                                "--log-level", "warning", *server_args])
        self.proc = subprocess.Popen(self.cmd)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((host, port), 0.2).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    sys.exit(f"eir-server did not listen (exit {self.proc.returncode})")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)


def recv_message(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < 4 or len(data) < (U32.unpack_from(data, 0)[0] & 0xFFFFFF):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} bytes")
        data += chunk
    return data


@functools.cache
def _dictionary() -> Dictionary:
    # One Dictionary for the whole run: compiling its tables is not free.
    return load_dictionary()


def check_answer(host: str, port: int, realm: str, origin_host: str | None) -> str:
    """CER/CEA, then one ECR of the load's shape; the ECA must decode and validate with our
    codec and dictionary and say 2001 / WHITELISTED. Returns a one-line description."""
    dictionary = _dictionary()
    answer = dictionary.compiled.answer(S13, 324)
    assert answer is not None
    me = Identity("mme99.bench", "bench", realm)
    with socket.create_connection((host, port), 5) as sock:
        sock.sendall(cer(me))
        cea = decode(recv_message(sock), dictionary)
        rc = cea.find(268)
        if cea.code != 257 or rc is None or cea.u32(rc) != 2001:
            sys.exit(f"CEA not 2001: code {cea.code}, Result-Code {rc and cea.u32(rc)}")
        req = EcrTemplates(me, 99, [entry_block(ImeiEntry("352099001761481"))]).request(
            0, 0x5A5A, 4242)
        sock.sendall(req)
        data = recv_message(sock)
    msg = decode(data, dictionary)
    validate(msg, answer)
    want_sid = decode(req, dictionary).find(263)
    sid, rc, status, host_avp = msg.find(263), msg.find(268), msg.find(1445, TGPP), msg.find(264)
    problems = [p.message for p in msg.problems]
    if msg.code != 324 or msg.application_id != S13 or msg.flags & FLAG_R:
        problems.append(f"header: code {msg.code} app {msg.application_id} flags {msg.flags:#x}")
    if not msg.flags & FLAG_P:
        problems.append("P bit not echoed")
    if msg.hop_by_hop != 0x5A5A or msg.end_to_end != 4242:
        problems.append("hop-by-hop / end-to-end not echoed")
    if rc is None or msg.u32(rc) != 2001:
        problems.append(f"Result-Code {rc and msg.u32(rc)}")
    if status is None or msg.u32(status) != 0:
        problems.append(f"Equipment-Status {status and msg.u32(status)}")
    if sid is None or want_sid is None or msg.value(sid) != decode(req, dictionary).value(want_sid):
        problems.append("Session-Id not echoed")
    if origin_host is not None and (host_avp is None or msg.text(host_avp) != origin_host):
        problems.append(f"Origin-Host {host_avp and msg.text(host_avp)}")
    if problems:
        sys.exit(f"bad ECA from {host}:{port}: {problems}\n{data.hex()}")
    return (f"ECA ok: {len(data)} bytes, Result-Code 2001, Equipment-Status WHITELISTED, "
            f"Origin-Host {msg.text(host_avp) if host_avp else '?'}, "
            f"{len(msg.avps)} AVPs, valid against our S13 grammar")


def measure(name: str, pid: int, host: str, port: int, args: argparse.Namespace,
            conns: int) -> Run:
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    cpu0 = cpu_seconds(pid)
    cmd = [str(Path(sys.executable).parent / "eir-server"), "load", "--target",
           f"{host}:{port}", "--connections", str(conns), "--inflight",
           str(args.batch * args.depth), "--duration", str(args.seconds), "--warmup", "1",
           "--destination-realm", args.realm, "--progress", "off", "--json", str(out)]
    if args.client_cpu >= 0:
        cmd += ["--pin", str(args.client_cpu)]
    subprocess.run(cmd, stdout=subprocess.DEVNULL, timeout=args.seconds + 120)
    cpu1 = cpu_seconds(pid)
    threads = len(os.listdir(f"/proc/{pid}/task"))
    r = json.loads(out.read_text())
    out.unlink()
    # Server CPU includes the warm-up second; the answers counted here do too.
    n = r["answers"] + r["warmup_answers"]
    return Run(name, conns, args.batch * args.depth, n, r["duration_s"] + 1.0,
               r["latency_ms"], cpu1 - cpu0, threads)


def emit(line: str) -> None:
    print(line, flush=True)


def busy_cpus(seconds: float = 1.0) -> float:
    """CPUs' worth of non-idle time on the machine over `seconds` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(f), f[3] + f[4]  # total, idle + iowait

    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return (1 - (i1 - i0) / max(t1 - t0, 1)) * (os.cpu_count() or 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, nargs="+", default=[4])
    ap.add_argument("--batch", type=int, default=32, help="ECRs per write")
    ap.add_argument("--depth", type=int, default=2, help="batches in flight per connection")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--repeat", type=int, default=1, help="runs per server and connection count")
    ap.add_argument("--server-cpu", type=int, default=0, help="-1: do not pin the server")
    ap.add_argument("--client-cpu", type=int, default=1, help="-1: do not pin the client")
    ap.add_argument("--schedulers", default="1:1", help="erl +S (default 1:1: one scheduler)")
    ap.add_argument("--erl-args", default="", help="extra emulator flags, e.g. '+sbwt none'")
    ap.add_argument("--no-nodelay", action="store_true",
                    help="leave Nagle on in OTP's sockets (gen_tcp's default; our server, "
                         "like asyncio/uvloop, sets TCP_NODELAY)")
    ap.add_argument("--ours", action="store_true",
                    help="also run `eir-server serve` with the same settings after each OTP run")
    ap.add_argument("--server-args", default="", help="extra `eir-server serve` arguments")
    ap.add_argument("--realm", default="localdomain")
    args = ap.parse_args()
    host = "127.0.0.1"
    server_cpu = None if args.server_cpu < 0 else args.server_cpu
    busy = busy_cpus()
    emit(f"cpus {os.cpu_count()}, busy before the runs: {busy:.2f} CPUs"
         + ("  (WARNING: something else is running; numbers will be low)" if busy > 0.1 else ""))
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="otp_eir_") as tmp:
        ebin = Path(tmp)
        compile_otp(ebin)
        for conns in args.connections:
            for _ in range(args.repeat):
                otp = OtpServer(ebin, host, free_port(host), server_cpu, args.schedulers,
                                args.erl_args.split(), not args.no_nodelay)
                try:
                    if not runs:
                        emit(f"OTP: {' '.join(otp.cmd)}  (beam pid {otp.pid})")
                    emit(f"OTP {check_answer(host, otp.port, args.realm, OTP_ORIGIN_HOST)}")
                    before = otp.stats()
                    run = measure(f"OTP +S {args.schedulers}", otp.pid, host, otp.port, args,
                                  conns)
                    ecr_in, ok, other = (a - b for a, b in zip(otp.stats(), before,
                                                               strict=True))
                    reports = otp.reports()
                finally:
                    otp.stop()
                emit(f"OTP counters: {ecr_in} ECR in, {ok} ECA 2001 out, {other} other; "
                     f"client read {run.answers} answers"
                     + (f"; OTP logged {reports}" if reports else ""))
                if other or reports or ok != ecr_in or ok < run.answers:
                    emit("WARNING: OTP did not answer every ECR with 2001")
                runs.append(run)
                emit(HEADER)
                emit(run.row())
                if args.ours:
                    ours = OurServer(host, free_port(host), server_cpu, args.server_args.split())
                    try:
                        if len(runs) == 1:
                            emit(f"ours: {' '.join(ours.cmd)}")
                        emit(f"ours {check_answer(host, ours.port, args.realm, None)}")
                        run = measure("eir-server", ours.pid, host, ours.port, args, conns)
                    finally:
                        ours.stop()
                    runs.append(run)
                    emit(run.row())
    emit("")
    emit(f"batch {args.batch} x depth {args.depth} per connection, {args.seconds:g} s per run, "
         f"server on CPU {args.server_cpu}, client on CPU {args.client_cpu}")
    emit(HEADER)
    for run in runs:
        emit(run.row())
    return 0


if __name__ == "__main__":
    sys.exit(main())

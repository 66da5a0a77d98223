"""Soak: mixed ECR load against `eir-server serve` on Redis while Redis is SIGKILLed and
restarted (with its append-only file, or every other time empty, so that sync must re-feed it)
and `eir-server sync --interval` is SIGKILLed mid-run, again and again.

Asserts (exit 1 otherwise):
- 0 unanswered: every ECR gets an ECA (answers later than 5 s are reported, not failed);
- every verdict is either what a register version current in Redis within the second before
  the request (up to the answer) says, or the fallback (GREYLISTED: the register here never
  greylists) or 3004 (our own overload), and the client's count of both equals the server's
  `eir_store_fallback_verdicts_total`;
- after the chaos stops and sync catches up, the register Redis serves has the same digest as
  a clean `eir-server sync --once` of the same source into a fresh Redis, and as expected.

    .venv/bin/python benchmarks/soak_store_faults.py --minutes 30
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eir_server.diameter.codec import (  # noqa: E402
    FLAG_P,
    FLAG_R,
    grouped_avp,
    message,
    str_avp,
    u32_avp,
)
from eir_server.load.s13 import Identity, cer  # noqa: E402

U32 = struct.Struct("!I")
AVP_HEAD = struct.Struct("!II")


def ecr_template(conn: int, n: int, imei: str, realm: str) -> bytes:
    return message(FLAG_R | FLAG_P, 324, 16777252, 0, 0, [
        str_avp(263, f"mme{conn}.soak;{n};1"), u32_avp(277, 1), str_avp(264, f"mme{conn}.soak"),
        str_avp(296, "soak"), str_avp(283, realm),
        grouped_avp(1401, [str_avp(1402, imei, 10415), str_avp(1403, "01", 10415)], 10415),
        str_avp(1, "00101" + imei[4:14]),
    ])  # fmt: skip


def answer_status(msg: bytes) -> tuple[int, int]:
    """(Result-Code or Experimental-Result-Code, Equipment-Status or -1) of an ECA."""
    pos, end = 20, len(msg)
    code, status = 0, -1
    while pos + 8 <= end:
        c, fl = AVP_HEAD.unpack_from(msg, pos)
        length = fl & 0xFFFFFF
        hlen = 12 if fl >> 24 & 0x80 else 8
        if length < hlen:
            break
        if c == 268:
            code = U32.unpack_from(msg, pos + hlen)[0]
        elif c == 297:  # Experimental-Result: its code is inside
            code = code or answer_status(b"\0" * 20 + msg[pos + hlen:pos + length])[0]
        elif c == 298:
            code = U32.unpack_from(msg, pos + hlen)[0]
        elif c == 1445:
            status = U32.unpack_from(msg, pos + hlen)[0]
        pos += (length + 3) & ~3
    return code, status

EXE = ROOT / ".venv/bin/eir-server"
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
HEADER = "imei,block_date,reasons\n"
TRACKER_SLACK = 0.3
LATE = 5.0  # seconds: an answer later than this is reported (an MME would have given up)
TAC = 35209900_000000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Register:
    """Versions 1..J of a blacklist over `n` IMEIs: ~10% listed, each version toggles `churn`
    IMEIs; published as DIRBS zips (full list + delta members chaining run ids)."""

    def __init__(self, root: Path, n: int, churn: int) -> None:
        self.root, self.n, self.churn = root, n, churn
        root.mkdir(parents=True, exist_ok=True)
        self.sets: dict[int, frozenset[int]] = {}
        self.rnd = random.Random(1)

    def imei(self, i: int) -> str:
        return f"{TAC + i:014d}"

    def publish(self) -> int:
        j = len(self.sets) + 1
        prev = self.sets.get(j - 1)
        if prev is None:
            cur = frozenset(i for i in range(self.n) if self.rnd.random() < 0.1)
        else:
            s = set(prev)
            for _ in range(self.churn):
                s ^= {self.rnd.randrange(self.n)}
            cur = frozenset(s)
        ts = time.strftime("%Y%m%d_%H%M%S", time.gmtime(1767225600 + j * 60))
        path = self.root / f"{ts}_blacklist.zip"
        tmp = path.with_suffix(".tmp")

        def rows(ids: frozenset[int] | set[int]) -> str:
            return HEADER + "".join(f"{self.imei(i)},20200101,stolen\n" for i in sorted(ids))

        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            zf.writestr(f"{ts}_blacklist.csv", rows(cur))
            base = j - 1 if prev is not None else 0
            zf.writestr(f"{ts}_blacklist_delta_{base}_{j}_blocked.csv",
                        rows(cur - (prev or frozenset())))
            zf.writestr(f"{ts}_blacklist_delta_{base}_{j}_unblocked.csv",
                        rows((prev or frozenset()) - cur))
        tmp.rename(path)  # sync never sees half a zip
        self.sets[j] = cur
        return j


class RedisProc:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        # AOF (fsync every second): a SIGKILLed Redis comes back with (nearly) what it had.
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        c = redis.Redis(port=self.port, socket_timeout=1)
        for _ in range(500):
            try:
                if c.ping():
                    break
            except redis.RedisError:
                time.sleep(0.02)
        c.close()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class Tracker(threading.Thread):
    """Which register version (blacklist run id) Redis serves, sampled every 20 ms. A version
    counts from its `created` stamp (sync makes it before switching to it; sampling sees the
    switch late) until the next version was *seen* (the previous one is served until then)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.changes: list[tuple[float, float, int]] = []  # (counts from, seen, run id)
        self.stop = False

    def run(self) -> None:
        c = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        while not self.stop:
            try:
                cur = c.get("eir:cur")
                lists, created = (c.hmget(f"eir:{cur.decode()}:m", "lists", "created")
                                  if cur else (None, None))
                run = int(json.loads(lists)["blacklist"]["run_id"]) if lists else 0
                if not self.changes or self.changes[-1][2] != run:
                    seen = time.monotonic()
                    start = seen
                    if created:
                        start = min(seen, float(created) - time.time() + time.monotonic())
                    self.changes.append((start, seen, run))
            except (redis.RedisError, KeyError, ValueError, TypeError):
                pass
            time.sleep(0.02)

    def between(self, t1: float, t2: float) -> set[int]:
        """Runs served at some time in [t1, t2]. Run 0 (Redis restarted empty) is no register:
        "not listed" from it would be a wrong verdict; what the worker cached from the run
        before stays valid."""
        out = set()
        ch = self.changes
        for n, (start, _, _run) in enumerate(ch):
            end = ch[n + 1][1] if n + 1 < len(ch) else float("inf")
            if start <= t2 and end >= t1:
                k = n
                while k > 0 and ch[k][2] == 0:
                    k -= 1
                out.add(ch[k][2])
        return out - {0}


def metric(mport: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read()
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def digest(url: str, reg: Register) -> str:
    """sha256 over the listed/not-listed bit of every IMEI, read through a RedisStore."""
    from eir_server.store import open_store

    s = open_store(url, cache_size=10)
    await s.start()
    try:
        h = hashlib.sha256()
        for lo in range(0, reg.n, 256):
            got = await asyncio.gather(*(s.fetch(reg.imei(i))
                                         for i in range(lo, min(reg.n, lo + 256))))
            h.update(bytes(g is not None for g in got))
        return h.hexdigest()
    finally:
        await s.close()


def expected_digest(reg: Register, j: int) -> str:
    listed = reg.sets[j]
    h = hashlib.sha256()
    for lo in range(0, reg.n, 256):
        h.update(bytes(i in listed for i in range(lo, min(reg.n, lo + 256))))
    return h.hexdigest()


class Client(asyncio.Protocol):
    def __init__(self, soak: Soak) -> None:
        self.soak = soak
        self.buf = b""
        self.ready = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        transport.write(cer(Identity("mme0.bench", "bench", "localdomain")))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        pos = 0
        while len(buf) - pos >= 20:
            length = int.from_bytes(buf[pos + 1:pos + 4], "big")
            if len(buf) - pos < length:
                break
            code = int.from_bytes(buf[pos + 5:pos + 8], "big")
            if code == 324:
                self.soak.answer(int.from_bytes(buf[pos + 12:pos + 16], "big"),
                                 buf[pos:pos + length])
            elif code == 257 and not self.ready.done():
                self.ready.set_result(None)
            pos += length
        self.buf = buf[pos:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.soak.closing:
            self.soak.problems.append(f"diameter connection lost: {exc!r}")


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.reg = Register(work / "register", args.imeis, args.churn)
        self.redis = RedisProc(work / "redis")
        self.sent: dict[int, tuple[int, float]] = {}  # hbh -> (imei index, sent at)
        self.hbh = 0
        self.answered = self.fallback = self.errors = self.busy = self.late = 0
        self.max_latency = 0.0
        self.wrong: list[str] = []
        self.problems: list[str] = []
        self.events: list[str] = []
        self.tracker: Tracker | None = None
        self.closing = False
        self.verdicts: list[tuple[int, int, float, float]] = []
        self.t_start = 0.0

    def answer(self, hbh: int, msg: bytes) -> None:
        sent = self.sent.pop(hbh, None)
        if sent is None:
            self.problems.append(f"answer for unknown hop-by-hop {hbh}")
            return
        i, t0 = sent
        now = time.monotonic()
        self.answered += 1
        self.max_latency = max(self.max_latency, now - t0)
        if now - t0 > LATE:
            self.late += 1
        code, status = answer_status(msg)
        if code == 3004:  # our own overload (or max-in-flight): counted by the server too
            self.busy += 1
            return
        if code != 2001:
            self.errors += 1
            self.wrong.append(f"imei {i}: result code {code}")
            return
        if status == 2:
            self.fallback += 1
            return
        self.verdicts.append((i, status, t0, now))

    def check_verdicts(self) -> None:
        """Each verdict against the versions Redis served from 1 s before the request to the
        answer (+ TRACKER_SLACK: the tracker samples, it sees a switch a little late)."""
        assert self.tracker is not None
        for i, status, t0, now in self.verdicts:
            runs = self.tracker.between(t0 - 1.0, now + TRACKER_SLACK)
            if not any((i in self.reg.sets.get(r, frozenset())) == (status == 1) for r in runs):
                self.wrong.append(f"imei {i}: status {status} sent {t0 - self.t_start:.2f} "
                                  f"answered {now - self.t_start:.2f}, versions {sorted(runs)}")

    def spawn_sync(self) -> subprocess.Popen[bytes]:
        log = open(self.work / "sync.log", "ab")  # noqa: SIM115 - owned by the child
        return subprocess.Popen(
            [str(EXE), "sync", "--source", str(self.reg.root), "--store", self.redis.url,
             "--interval", "1", "--grace", "1", "--progress", "never"],
            stdout=log, stderr=subprocess.STDOUT)

    async def load(self, conn: Client, until: float) -> None:
        rate, rnd = self.args.rate, random.Random(2)
        tick = 0.01
        per_tick = rate * tick
        carry = 0.0
        nxt = time.monotonic()
        while time.monotonic() < until:
            carry += per_tick
            n, carry = int(carry), carry - int(carry)
            out = []
            now = time.monotonic()
            for _ in range(n):
                self.hbh = (self.hbh + 1) & 0xFFFFFFFF
                i = rnd.randrange(self.reg.n)
                msg = bytearray(ecr_template(0, self.hbh, self.reg.imei(i), "localdomain"))
                msg[12:16] = self.hbh.to_bytes(4, "big")
                msg[16:20] = self.hbh.to_bytes(4, "big")
                self.sent[self.hbh] = (i, now)
                out.append(bytes(msg))
            conn.t.write(b"".join(out))  # type: ignore[attr-defined]
            nxt += tick
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))

    async def chaos(self, until: float, sync: list[subprocess.Popen[bytes]]) -> None:
        rnd = random.Random(3)
        every = self.args.kill_every
        round_ = 0
        next_publish = time.monotonic() + self.args.publish_every
        next_kill = time.monotonic() + every
        while time.monotonic() < until:
            now = time.monotonic()
            if now >= next_publish:
                j = self.reg.publish()
                self.events.append(f"{now:.1f} published version {j}")
                next_publish = now + self.args.publish_every
            if now >= next_kill:
                round_ += 1
                if round_ % 2:
                    down = rnd.uniform(1, 8)
                    self.redis.kill()
                    empty = round_ % 4 == 3  # every other restart loses everything
                    if empty:
                        shutil.rmtree(self.redis.dir)
                        self.redis.dir.mkdir()
                    self.events.append(f"{now:.1f} redis SIGKILL, down {down:.1f} s"
                                       + (", restarts empty" if empty else ""))
                    await asyncio.sleep(down)
                    await asyncio.to_thread(self.redis.start)
                    self.events.append(f"{time.monotonic():.1f} redis accepting")
                else:
                    j = self.reg.publish()  # give the sync something to be in the middle of
                    await asyncio.sleep(rnd.uniform(0.0, 1.5))
                    sync[0].kill()
                    sync[0].wait()
                    self.events.append(f"{time.monotonic():.1f} sync SIGKILL after "
                                       f"publishing {j}")
                    await asyncio.sleep(1.0)
                    sync[0] = self.spawn_sync()
                next_kill = time.monotonic() + every
            await asyncio.sleep(0.1)

    async def run(self) -> dict[str, object]:
        args = self.args
        self.reg.publish()
        self.redis.start()
        subprocess.run([str(EXE), "sync", "--source", str(self.reg.root), "--store",
                        self.redis.url, "--once", "--progress", "never"], check=True,
                       stdout=subprocess.DEVNULL)
        self.tracker = Tracker(self.redis.port)
        self.tracker.start()
        port, mport = free_port(), free_port()
        serve_log = open(self.work / "serve.log", "wb")  # noqa: SIM115
        serve = subprocess.Popen(
            [str(EXE), "serve", "--store", f"{self.redis.url}?cache_size={args.cache_size}",
             "--diameter-listen", f"127.0.0.1:{port}", "--metrics-listen",
             f"127.0.0.1:{mport}", "--store-fallback", "greylisted", "--device-signals",
             "off", "--log-format", "json"], stdout=serve_log, stderr=subprocess.STDOUT)
        sync = [self.spawn_sync()]
        loop = asyncio.get_running_loop()
        try:
            for _ in range(300):
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    await asyncio.sleep(0.1)
            _, conn = await loop.create_connection(lambda: Client(self), "127.0.0.1", port)
            await asyncio.wait_for(conn.ready, 10)
            self.t_start = t_start = time.monotonic()
            until = t_start + args.minutes * 60
            await asyncio.gather(self.load(conn, until), self.chaos(until, sync))
            final = len(self.reg.sets)
            # Calm: sync catches up with the last version, every answer arrives.
            deadline = time.monotonic() + 180
            while self.tracker.changes[-1][2] != final and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            caught_up = self.tracker.changes[-1][2] == final
            await self.load(conn, time.monotonic() + 5)  # verdicts after the calm, too
            for _ in range(300):
                if not self.sent:
                    break
                await asyncio.sleep(0.1)
            server_fallbacks = metric(mport, "eir_store_fallback_verdicts_total")
            server_episodes = metric(mport, "eir_store_fallback_episodes_total")
            self.closing = True
            conn.t.close()
            soak_digest = await digest(self.redis.url, self.reg)
        finally:
            sync[0].kill()
            serve.send_signal(signal.SIGTERM)
            serve.wait(30)
            self.tracker.stop = True
        clean = RedisProc(self.work / "clean")
        clean.start()
        try:
            subprocess.run([str(EXE), "sync", "--source", str(self.reg.root), "--store",
                            clean.url, "--once", "--progress", "never"], check=True,
                           stdout=subprocess.DEVNULL)
            clean_digest = await digest(clean.url, self.reg)
        finally:
            clean.kill()
            self.redis.kill()
        self.check_verdicts()
        unanswered = len(self.sent)
        result = {
            "minutes": args.minutes,
            "rate": args.rate,
            "answered": self.answered,
            "unanswered": unanswered,
            "wrong_verdicts": len(self.wrong),
            "answered_later_than_5s": self.late,
            "max_latency_s": round(self.max_latency, 3),
            "too_busy_3004_client": self.busy,
            "fallback_verdicts_client": self.fallback,
            "fallback_verdicts_server": server_fallbacks,
            "fallback_episodes_server": server_episodes,
            "redis_kills": sum("redis SIGKILL" in e for e in self.events),
            "sync_kills": sum("sync SIGKILL" in e for e in self.events),
            "versions_published": len(self.reg.sets),
            "caught_up": caught_up,
            "digest_equal_clean_load": soak_digest == clean_digest,
            "digest_equal_expected": soak_digest == expected_digest(self.reg, final),
            "problems": self.problems[:10],
            "wrong_examples": self.wrong[:10],
        }
        if self.wrong:
            result["events"] = [f"{float(e.split()[0]) - self.t_start:.2f} "
                                + e.split(" ", 1)[1] for e in self.events]
            result["versions"] = [(round(t - self.t_start, 2), round(seen - self.t_start, 2), r)
                                  for t, seen, r in self.tracker.changes]
        result["ok"] = (unanswered == 0 and not self.wrong and not self.problems
                        and self.fallback + self.busy == server_fallbacks and caught_up
                        and bool(result["digest_equal_clean_load"])
                        and bool(result["digest_equal_expected"]))
        return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--rate", type=int, default=1000, help="ECR/s")
    ap.add_argument("--imeis", type=int, default=100_000, help="IMEIs the load draws from")
    ap.add_argument("--churn", type=int, default=500, help="IMEIs toggled per version")
    ap.add_argument("--cache-size", type=int, default=10_000,
                    help="serve cache entries (small: most lookups go to Redis)")
    ap.add_argument("--kill-every", type=float, default=60,
                    help="seconds between kills, alternating Redis and sync")
    ap.add_argument("--publish-every", type=float, default=20)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="eir-soak-"))
    try:
        result = asyncio.run(Soak(args, work).run())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory: {work}", file=sys.stderr)
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("EIR_LOG_LEVEL", "warning")
    sys.exit(main())

"""The sync side of the Redis register: versions, bulk writes, the switch, GC, run records.

Blocking redis-py: sync is a batch job, and bulk loads are written as raw RESP through a
connection taken from the client's pool (redis-py's per-command packing would cap the load far
below 500k rows/s). Replies are read one chunk behind the writes so Redis and Python overlap.
"""

from __future__ import annotations

import json
import os
import queue
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from eir_server.store import layout
from eir_server.store.codec import Listing, decode_listing
from eir_server.store.urls import RedisTarget, sync_client

from . import listpack

_CAS_SWITCH = """
local cur = redis.call('GET', KEYS[1])
if (cur or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_REFRESH_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_TAKE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
LOCK_TTL_MS = 10_000  # a sync that stops refreshing (killed, host gone) loses the lock after this
LOCK_BEAT_S = 2.0  # refresh period while running


def _start_ticks(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot), or None if unknown: tells a live
    owner from a recycled pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2 :].split()[19].decode()
    except (OSError, ValueError, IndexError):
        return None


def _pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def lock_owner() -> dict[str, Any]:
    """Who holds the lock: host, pid namespace, pid and start time, plus a random id."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pidns": _pid_ns(),
        "pid": pid,
        "start": _start_ticks(pid),
        "id": uuid.uuid4().hex,
        "since": round(time.time(), 3),
    }


def owner_gone(owner: dict[str, Any]) -> bool:
    """Whether the process named by a lock owner is certainly gone: only decidable on the same
    host and pid namespace (elsewhere the lock's short TTL frees it)."""
    if owner.get("host") != socket.gethostname() or owner.get("pidns", "") != _pid_ns():
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    start = _start_ticks(pid)
    return start is not None and owner.get("start") is not None and start != owner["start"]


class StoreBusy(Exception):
    """Another sync holds the lock."""


class SwitchConflict(Exception):
    """The current version changed under us (another writer): nothing was switched."""


def bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def pack(*args: bytes | str | int) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = b"%d" % a
        parts.append(bulk(a))
    return b"".join(parts)


class _Target:
    """One connection's pipelined writes (synchronous: send a chunk, read the previous one's)."""

    __slots__ = ("client", "conn", "buf", "cmds", "size", "outstanding")

    def __init__(self, client: Any) -> None:
        self.client = client
        self.conn = client.connection_pool.get_connection()
        self.buf: list[bytes] = []
        self.cmds = 0
        self.size = 0
        self.outstanding = 0


_INT_REPLY = re.compile(rb":(-?\d+)\r\n")
_ERR_REPLY = re.compile(rb"(?:^|\n)-([^\r]*)\r\n")
_FLUSH = object()


class _ThreadedTarget(_Target):
    """Plain-socket fast path: a thread sends chunks and counts integer replies off the socket.

    Socket I/O releases the GIL, so Redis parses chunk k while Python builds chunk k+1, and the
    replies are counted with two C-level scans per block instead of one parser call per reply.
    Only for commands with integer replies (HSET, UNLINK, DEL).
    """

    __slots__ = ("sock", "queue", "thread", "sent", "received", "sum", "error", "done", "pending")

    # Chunks (~1 MB each) queued for the socket thread. One flush round of a 10M-row load is
    # ~60 MB of HSETs; with room for all of it the loader goes back to parsing while Redis
    # works through the round (with 8, the loader waited ~5 s of a 22 s load on the queue).
    QUEUE_CHUNKS = 96

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.sock: socket.socket = self.conn._sock
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=self.QUEUE_CHUNKS)
        self.sent = self.received = self.sum = 0
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.pending = b""
        self.thread = threading.Thread(target=self._run, name="eir-sync-writer", daemon=True)
        self.thread.start()

    def _consume(self, data: bytes) -> None:
        data = self.pending + data
        cut = data.rfind(b"\r\n") + 2
        if cut <= 1:
            self.pending = data
            return
        part, self.pending = data[:cut], data[cut:]
        self.received += part.count(b"\r\n")
        if b"-" in part and self.error is None:
            m = _ERR_REPLY.search(part)
            if m:
                self.error = ResponseError(m.group(1).decode(errors="replace"))
        self.sum += sum(map(int, _INT_REPLY.findall(part)))

    def _drain(self, block: bool) -> None:
        while self.received < self.sent:
            try:
                data = self.sock.recv(1 << 16, 0 if block else socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                raise ConnectionError("redis closed the connection during a bulk write")
            self._consume(data)

    def _run(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    return
                if item is _FLUSH:
                    self._drain(block=True)
                    self.done.set()
                    continue
                blob, n = item
                self.sock.sendall(blob)
                self.sent += n
                self._drain(block=False)
        except BaseException as e:  # noqa: BLE001 - handed to the producer at flush
            self.error = e
            self.done.set()
            while self.queue.get() is not None:  # unblock a producer waiting on a full queue
                pass


class BulkWriter:
    """Pipelined raw writes; `total` sums integer replies (HSET: fields created)."""

    CHUNK_BYTES = 1 << 20

    def __init__(self, client: Any, cluster: bool) -> None:
        self._client = client
        self._cluster = cluster
        self._targets: dict[Any, _Target] = {}
        self.total = 0

    def _target(self, key: str) -> _Target:
        if not self._cluster:
            t = self._targets.get(None)
            if t is None:
                t = _Target(self._client)
                if type(t.conn._sock) is socket.socket:  # plain TCP/unix: threaded fast path
                    t.client.connection_pool.release(t.conn)
                    t = _ThreadedTarget(self._client)
                self._targets[None] = t
            return t
        node = self._client.get_node_from_key(key)
        t = self._targets.get(node.name)
        if t is None:
            t = self._targets[node.name] = _Target(node.redis_connection)
        return t

    def raw(self, key: str, command: bytes) -> None:
        t = self._target(key)
        t.buf.append(command)
        t.cmds += 1
        t.size += len(command)
        if t.size >= self.CHUNK_BYTES:
            self._send(t)

    def raw_parts(self, key: str, head: bytes, body: bytes) -> None:
        """One command given as two pieces (saves copying a large body into a new object)."""
        t = self._target(key)
        t.buf.append(head)
        t.buf.append(body)
        t.cmds += 1
        t.size += len(head) + len(body)
        if t.size >= self.CHUNK_BYTES:
            self._send(t)

    def hset_frags(self, key: str, frags: list[bytes]) -> None:
        """HSET key with pre-encoded RESP field/value pairs (2 bulk strings per element)."""
        self.raw(
            key,
            b"*%d\r\n$4\r\nHSET\r\n" % (2 + 2 * len(frags)) + bulk(key.encode()) + b"".join(frags),
        )

    def hset(self, key: str, mapping: dict[bytes | str, bytes | str]) -> None:
        args: list[bytes | str | int] = ["HSET", key]
        for k, v in mapping.items():
            args += [k, v]
        self.raw(key, pack(*args))

    def _read(self, t: _Target) -> None:
        err: Exception | None = None
        for _ in range(t.outstanding):
            try:
                r = t.conn.read_response()
            except ResponseError as e:  # keep reading so the connection stays in sync
                err = err or e
                continue
            if isinstance(r, int):
                self.total += r
        t.outstanding = 0
        if err is not None:
            raise err

    def _send(self, t: _Target) -> None:
        if not t.buf:
            return
        data = b"".join(t.buf)
        t.buf.clear()
        cmds, t.cmds, t.size = t.cmds, 0, 0
        if isinstance(t, _ThreadedTarget):
            if t.error is not None:
                raise t.error
            t.queue.put((data, cmds))
            return
        t.conn.send_packed_command([data])
        self._read(t)  # replies of the previous chunk (sent before this one)
        t.outstanding = cmds
        # The chunk just sent is read on the next send or flush: Redis works while we build.

    def flush(self) -> int:
        for t in self._targets.values():
            if t.buf:
                self._send(t)
            if isinstance(t, _ThreadedTarget):
                t.done.clear()
                t.queue.put(_FLUSH)
                t.done.wait()
                if t.error is not None:
                    raise t.error
                self.total += t.sum
                t.sum = 0
            else:
                self._read(t)
        return self.total

    def close(self) -> None:
        for t in self._targets.values():
            clean = True
            if isinstance(t, _ThreadedTarget):
                t.queue.put(None)
                t.thread.join(30)
                clean = t.error is None and t.received == t.sent and not t.pending
            if not clean:  # replies may still be in flight: never hand this socket to anyone
                t.conn.disconnect()
            try:
                t.client.connection_pool.release(t.conn)
            except Exception:  # noqa: BLE001
                t.conn.disconnect()
        self._targets.clear()


@dataclass(slots=True)
class Current:
    version: str | None
    meta: dict[str, str]

    @property
    def lists(self) -> dict[str, dict[str, Any]]:
        return json.loads(self.meta["lists"]) if self.meta.get("lists") else {}

    @property
    def buckets(self) -> layout.Buckets | None:
        base = self.meta.get("base")
        if not base:
            return None
        return layout.Buckets(self.meta["ns"], base, int(self.meta["k"]))


class RegisterDB:
    def __init__(self, target: RedisTarget, namespace: str = "eir", timeout: float = 60.0) -> None:
        self.target = target
        self.ns = namespace
        self.client = sync_client(target, timeout)
        self.cluster = target.mode == "cluster"
        self._cas = self.client.register_script(_CAS_SWITCH)
        self._release = self.client.register_script(_RELEASE_LOCK)
        self._refresh = self.client.register_script(_REFRESH_LOCK)
        self._take = self.client.register_script(_TAKE_LOCK)
        self._lock_token: str | None = None
        self._beat_stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.lock_lost = False

    def close(self) -> None:
        self.client.close()

    # -- lock ----------------------------------------------------------------------------------
    def acquire_lock(self, ttl_ms: int = LOCK_TTL_MS, beat_s: float = LOCK_BEAT_S) -> None:
        """Take N:lock (value: the owner, see lock_owner) with a short TTL that a heartbeat
        thread refreshes while this sync runs. A lock whose owner process is gone (same host,
        SIGKILLed or crashed) is taken over at once; any other frees itself within the TTL."""
        key = layout.lock_key(self.ns)
        token = json.dumps(lock_owner(), sort_keys=True)
        if not self.client.set(key, token, nx=True, px=ttl_ms):
            held = self.client.get(key)
            try:
                owner = json.loads(held) if held else {}
            except ValueError:
                owner = {}
            if not (isinstance(owner, dict) and owner_gone(owner)):
                who = f"pid {owner.get('pid')} on {owner.get('host')}" if owner else "another sync"
                raise StoreBusy(f"{who} holds {key}")
            if not self._take(keys=[key], args=[held, token, ttl_ms]):
                raise StoreBusy(f"another sync took {key} first")
            import structlog

            structlog.get_logger("eir.sync").warning(
                "took over the lock of a sync that is gone", owner=owner
            )
        self._lock_token = token
        self._lock_ttl = ttl_ms
        self.lock_lost = False
        self._beat_stop.clear()
        self._beat = threading.Thread(
            target=self._heartbeat, args=(token, beat_s), name="eir-sync-lock", daemon=True
        )
        self._beat.start()

    def _heartbeat(self, token: str, period: float) -> None:
        key = layout.lock_key(self.ns)
        while not self._beat_stop.wait(period):
            try:
                if not self._refresh(keys=[key], args=[token, self._lock_ttl]):
                    self.lock_lost = True  # expired (we were stalled) and maybe taken
                    return
            except Exception:  # noqa: BLE001 - Redis trouble: the run itself will notice
                continue

    def refresh_lock(self) -> None:
        if self._lock_token is not None:
            self._refresh(keys=[layout.lock_key(self.ns)], args=[self._lock_token, self._lock_ttl])

    def release_lock(self) -> None:
        self._beat_stop.set()
        if self._beat is not None:
            self._beat.join(5)
            self._beat = None
        if self._lock_token is not None:
            try:
                self._release(keys=[layout.lock_key(self.ns)], args=[self._lock_token])
            except Exception:  # noqa: BLE001 - Redis gone: the short TTL frees it anyway
                pass
            finally:
                self._lock_token = None

    # -- versions ------------------------------------------------------------------------------
    def current(self) -> Current:
        cur = self.client.get(layout.cur_key(self.ns))
        if cur is None:
            return Current(None, {})
        ver = cur.decode()
        meta = {
            k.decode(): v.decode()
            for k, v in self.client.hgetall(layout.meta_key(self.ns, ver)).items()
        }
        meta["ns"] = self.ns
        return Current(ver, meta)

    def new_version(self, k: int, full: bool) -> str:
        """Reserve a version id and register it before any of its keys exist (for GC)."""
        ver = str(self.client.incr(layout.seq_key(self.ns)))
        info = {"k": k if full else 0, "full": full, "started": time.time()}
        self.client.hset(layout.versions_key(self.ns), ver, json.dumps(info))
        return ver

    def writer(self) -> BulkWriter:
        return BulkWriter(self.client, self.cluster)

    def missing_buckets(self, b: layout.Buckets) -> int | None:
        """How many bucket keys of full load `b` are missing from Redis; None when that load
        has no markers (written before them: an empty bucket had no key, so none can be told
        lost). One Redis counts them with multi-key EXISTS; a Cluster, a key at a time."""
        if self.client.hget(layout.meta_key(self.ns, b.base), "markers") != b"1":
            return None
        n, k = 10**b.k, b.k
        prefix = layout.bucket_key(self.ns, b.base, 0, k)[:-k]
        head = f"${len(prefix) + k}\r\n{prefix}"  # every key's bulk string but its suffix
        w = self.writer()
        try:
            if self.cluster:  # a multi-key command must stay in one slot: a key at a time
                for i in range(n):
                    w.raw(f"{prefix}{i:0{k}d}", f"*2\r\n$6\r\nEXISTS\r\n{head}{i:0{k}d}\r\n"
                          .encode())
            else:  # 1,000 keys per EXISTS (a 10M register, k = 5: ~0.15 s for the 100k keys)
                for start in range(0, n, 1000):
                    end = min(n, start + 1000)
                    w.raw(prefix, (f"*{end - start + 1}\r\n$6\r\nEXISTS\r\n" + "".join(
                        [f"{head}{i:0{k}d}\r\n" for i in range(start, end)])).encode())
            have = w.flush()
        finally:
            w.close()
        return n - have

    def restore_works(self, key: str) -> bool:
        """Whether the server takes the listpack RESTORE payloads a full load builds (Redis >=
        7.0, RESTORE allowed): one is restored at `key` (a key GC deletes), read back, deleted."""
        field, value = b"1000000000", b"1"
        try:
            self.client.restore(key, 0, listpack.payload([(field, value)]))
            try:
                return bool(self.client.hget(key, field) == value)
            finally:
                self.client.delete(key)
        except ResponseError:  # DUMP payload version (Redis < 7), NOPERM, unknown command
            return False

    def hash_limits(self) -> int:
        """hash-max-listpack-entries of the server (128 if CONFIG is not allowed)."""
        try:
            nodes = self.client.get_primaries() if self.cluster else [None]
            vals = []
            for n in nodes:
                cfg = (
                    self.client.config_get("hash-max-listpack-entries", target_nodes=n)
                    if n is not None
                    else self.client.config_get("hash-max-listpack-entries")
                )
                vals.append(int(next(iter(cfg.values()))))
            return min(vals)
        except Exception:  # noqa: BLE001 - managed Redis often forbids CONFIG
            return 128

    def read_hash(self, key: str) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        for k, v in self.client.hscan_iter(key, count=10000):
            out[k] = v
        return out

    def read_listings(
        self,
        cur: Current,
        imeis: Iterable[str],
        overlay: dict[bytes, bytes],
        table: dict[int, bytes],
    ) -> dict[str, Listing]:
        """Current merged listing of each IMEI (overlay first, then the full load's buckets)."""
        out: dict[str, Listing] = {}
        need: list[str] = []
        for i in imeis:
            v = overlay.get(i.encode())
            if v is not None:
                out[i] = _listing(v, table)
            else:
                need.append(i)
        b = cur.buckets
        if b is None:
            for i in need:
                out[i] = Listing()
            return out
        for start in range(0, len(need), 10000):
            part = need[start : start + 10000]
            pipe = self.client.pipeline(transaction=False)
            for i in part:
                k, f = b.locate(i)
                pipe.hget(k, f)
            for i, v in zip(part, pipe.execute(), strict=True):
                out[i] = _listing(v, table)
        return out

    def switch(self, expected: str | None, new: str) -> None:
        if self.lock_lost:
            raise SwitchConflict(f"{layout.lock_key(self.ns)} expired under this run")
        ok = self._cas(keys=[layout.cur_key(self.ns)], args=[expected or "", new])
        if not ok:
            raise SwitchConflict(f"{layout.cur_key(self.ns)} is no longer {expected!r}")

    def record_run(self, run: dict[str, Any], keep: int = 100) -> None:
        key = layout.runs_key(self.ns)
        self.client.lpush(key, json.dumps(run, sort_keys=True))
        self.client.ltrim(key, 0, keep - 1)
        # run counts by result, never trimmed: `serve` exports them as eir_sync_runs_total
        self.client.hincrby(layout.run_counts_key(self.ns), layout.run_result(run), 1)

    def runs(self, n: int = 10) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.client.lrange(layout.runs_key(self.ns), 0, n - 1)]

    # -- GSMA TAC file -------------------------------------------------------------------------
    def tac_current(self) -> dict[str, str]:
        return {
            k.decode(): v.decode() for k, v in self.client.hgetall(layout.tac_key(self.ns)).items()
        }

    def put_tac(self, sha256: str, text: bytes, info: dict[str, Any]) -> None:
        """Store a TAC file's text under its hash (registered first, for GC); not served yet."""
        self.client.hset(layout.tacs_key(self.ns), sha256, json.dumps(info, sort_keys=True))
        self.client.set(layout.tac_data_key(self.ns, sha256), text)

    def switch_tac(self, sha256: str, info: dict[str, Any]) -> None:
        """Serve the stored TAC text `sha256`: one HSET, so readers see all fields or none."""
        self.client.hset(
            layout.tac_key(self.ns),
            mapping={"sha256": sha256, **{k: str(v) for k, v in info.items()}},
        )

    def gc_tac(self) -> list[str]:
        """Delete stored TAC texts other than the served one."""
        cur = self.client.hget(layout.tac_key(self.ns), "sha256")
        keep = cur.decode() if cur else None
        deleted = []
        for sha_b in self.client.hkeys(layout.tacs_key(self.ns)):
            sha = sha_b.decode()
            if sha != keep:
                self.client.delete(layout.tac_data_key(self.ns, sha))
                self.client.hdel(layout.tacs_key(self.ns), sha)
                deleted.append(sha)
        return deleted

    def gc(self) -> list[str]:
        """Delete every version that is neither current nor the full load current builds on."""
        cur = self.current()
        keep = {cur.version, cur.meta.get("base")} - {None, ""}
        deleted = []
        for ver_b, info_b in self.client.hgetall(layout.versions_key(self.ns)).items():
            ver = ver_b.decode()
            if ver in keep:
                continue
            info = json.loads(info_b)
            keys = [
                layout.meta_key(self.ns, ver),
                layout.table_key(self.ns, ver),
                layout.overlay_key(self.ns, ver),
            ]
            if info.get("full"):
                k = int(info["k"])
                keys += [layout.bucket_key(self.ns, ver, i, k) for i in range(10**k)]
            self._unlink(keys)
            self.client.hdel(layout.versions_key(self.ns), ver)
            deleted.append(ver)
        return deleted

    def _unlink(self, keys: list[str]) -> None:
        if self.cluster:
            for start in range(0, len(keys), 5000):
                pipe = self.client.pipeline()
                for k in keys[start : start + 5000]:
                    pipe.unlink(k)
                pipe.execute()
            return
        w = self.writer()
        try:
            for start in range(0, len(keys), 1000):
                w.raw("", pack("UNLINK", *keys[start : start + 1000]))
            w.flush()
        finally:
            w.close()


def _listing(v: bytes | None, table: dict[int, bytes]) -> Listing:
    if not v:
        return Listing()
    if v[0] < 0x3A:
        return decode_listing(table[int(v)])
    return decode_listing(v)

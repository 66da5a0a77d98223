"""Store URL parsing and redis-py client construction (async for serving, sync for sync).

URL forms:
  memory://                                         embedded store (also: no URL at all)
  redis://[[user]:pass@]host[:6379][/db][?opts]     one Redis server (rediss:// for TLS)
  unix:///path/to/redis.sock[?db=N&opts]            one Redis server over a Unix socket
  redis+sentinel://[[user]:pass@]h1[:26379][,h2[:26379]...]/service[/db][?opts]
                                                    master of `service` found via Sentinel
                                                    (rediss+sentinel:// for TLS to the master)
  redis+cluster://[[user]:pass@]h1[:6379][,h2[:6379]...][?opts]
                                                    Redis Cluster seed nodes (rediss+cluster://)
Store options may be given in the query string (namespace=eir&cache_size=...); keyword
arguments to `open_store` override them. Other query parameters go to redis-py (redis:// only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

# Store options that may appear in a URL query, with the type to convert them to.
STORE_OPTIONS: dict[str, type] = {
    "namespace": str,
    "cache_size": int,
    "poll_interval": float,
    "timeout": float,
    "batch_max": int,
    "max_inflight": int,
    "backoff_min": float,
    "backoff_max": float,
    "sentinel_password": str,
    "snapshot_dir": str,
    "lookup_client": str,
}


@dataclass(frozen=True, slots=True)
class RedisTarget:
    mode: str  # "single" | "sentinel" | "cluster"
    url: str  # for "single": the URL handed to redis-py's from_url (store options removed)
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    options: dict[str, Any] = field(default_factory=dict)


def _nodes(netloc_hosts: str, default_port: int) -> tuple[tuple[str, int], ...]:
    out = []
    for part in netloc_hosts.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("["):  # [ipv6]:port
            host, _, rest = part[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else default_port
        else:
            host, _, p = part.rpartition(":") if ":" in part else (part, "", "")
            port = int(p) if p else default_port
        out.append((host, port))
    if not out:
        raise ValueError("store URL names no host")
    return tuple(out)


def parse_store_url(url: str) -> RedisTarget:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    options = {k: STORE_OPTIONS[k](query.pop(k)) for k in list(query) if k in STORE_OPTIONS}
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, sep, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if sep else None
    if scheme in ("redis", "rediss", "unix"):
        # Not urlunsplit: it drops the empty host of unix:///path ("unix:/path"), which
        # redis-py then refuses.
        q = urlencode(query)
        clean = f"{parts.scheme}://{parts.netloc}{parts.path}" + (f"?{q}" if q else "")
        return RedisTarget("single", clean, options=options, ssl=scheme == "rediss")
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("redis+sentinel:// URL needs /service_name")
        return RedisTarget(
            "sentinel",
            url,
            nodes=_nodes(hosts, 26379),
            service=path[0],
            db=int(path[1]) if len(path) > 1 else 0,
            username=username,
            password=password,
            ssl=scheme.startswith("rediss"),
            options=options,
        )
    if scheme in ("redis+cluster", "rediss+cluster"):
        return RedisTarget(
            "cluster",
            url,
            nodes=_nodes(hosts, 6379),
            username=username,
            password=password,
            ssl=scheme.startswith("rediss"),
            options=options,
        )
    raise ValueError(f"unsupported store URL scheme {parts.scheme!r}")


def _common(timeout: float | None) -> dict[str, Any]:
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout}


def _sentinel_master(sentinel_cls: type, target: RedisTarget, timeout: float | None,
                     **kw: Any) -> Any:
    """Client for the master of `target.service` (redis.sentinel or redis.asyncio.sentinel).

    Every new connection asks the Sentinels for the master's address, taking the first one that
    reports it neither s_down nor o_down: after a failover, commands on connections to the old
    master fail and the connections replacing them reach the promoted replica
    (tests/store/test_sentinel_failover.py)."""
    skw = _common(timeout)
    if target.options.get("sentinel_password"):
        skw["password"] = target.options["sentinel_password"]
    sentinel = sentinel_cls(list(target.nodes), sentinel_kwargs=skw, **_common(timeout))
    return sentinel.master_for(
        target.service,
        db=target.db,
        username=target.username,
        password=target.password,
        ssl=target.ssl,
        **kw,
    )


def async_client(target: RedisTarget, timeout: float) -> Any:
    """redis.asyncio client without redis-py's own retries and socket timeouts: the store
    bounds every round trip itself by responsive loop time (a wall-clock socket timeout would
    blame Redis for our own busy loop) and has its own backoff. `timeout` is kept for callers."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    no_retry = Retry(NoBackoff(), 0)
    if target.mode == "single":
        return Redis.from_url(target.url, retry=no_retry, **_common(None))
    if target.mode == "sentinel":
        from redis.asyncio.sentinel import Sentinel

        return _sentinel_master(Sentinel, target, None, retry=no_retry)
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    node: Callable[[str, int], Any] = ClusterNode  # untyped in redis-py
    return RedisCluster(
        startup_nodes=[node(h, p) for h, p in target.nodes],
        username=target.username,
        password=target.password,
        ssl=target.ssl,
        retry=no_retry,
        **_common(None),
    )


def sync_client(target: RedisTarget, timeout: float = 30.0) -> Any:
    """Blocking client for the sync command (bulk writes; generous timeouts)."""
    import redis
    from redis.cluster import ClusterNode, RedisCluster

    if target.mode == "single":
        return redis.Redis.from_url(target.url, **_common(timeout))
    if target.mode == "sentinel":
        from redis.sentinel import Sentinel

        return _sentinel_master(Sentinel, target, timeout)
    node: Callable[[str, int], Any] = ClusterNode  # untyped in redis-py
    return RedisCluster(
        startup_nodes=[node(h, p) for h, p in target.nodes],
        username=target.username,
        password=target.password,
        ssl=target.ssl,
        **_common(timeout),
    )

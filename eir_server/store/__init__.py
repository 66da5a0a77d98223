"""Register store: where the interfaces get what the national register says about an IMEI.

Two backends behind one protocol (`RecordStore`): the embedded `MemoryStore` (default, single
node) and `RedisStore` (shared by many nodes, fed by `eir-server sync`). See docs/store.md.
"""

from __future__ import annotations

from typing import Any

from .base import (
    MISSING,
    BucketLost,
    RecordStore,
    StoreOverloaded,
    StoreStats,
    StoreUnavailable,
)
from .memory import MemoryStore
from .redis_store import RedisStore
from .urls import STORE_OPTIONS, parse_store_url


def open_store(url: str | None, register_dir: str | None = None, **options: Any) -> RecordStore:
    """Build (not start) the store for `url`; call `await store.start()` before use.

    None or "memory://" -> MemoryStore, loading `register_dir` (DIRBS zips/CSVs) at start
    (options max_bad_share, and snapshot_dir: the directory of the node's shared register
    snapshot, register_snapshot.resolve_dir; None loads it into this process).
    redis://, rediss://, unix://, redis+sentinel://, redis+cluster:// -> RedisStore; options
    (namespace, cache_size, poll_interval, timeout, batch_max, max_inflight, backoff_min,
    backoff_max) come from the URL query and are overridden by keyword arguments.
    """
    if url is None or url.strip() in ("", "memory://", "memory:"):
        return MemoryStore(
            register_dir,
            **{k: v for k, v in options.items() if k in ("max_bad_share", "snapshot_dir")},
        )
    if register_dir is not None:
        raise ValueError("--register loads the embedded store; with Redis use `eir-server sync`")
    target = parse_store_url(url)
    opts = {**target.options, **options}
    opts.pop("sentinel_password", None)
    unknown = set(opts) - set(STORE_OPTIONS) - {"max_bad_share"}
    if unknown:
        raise ValueError(f"unknown store options: {sorted(unknown)}")
    opts.pop("max_bad_share", None)
    return RedisStore(target, **opts)


__all__ = [
    "MISSING",
    "MemoryStore",
    "RecordStore",
    "RedisStore",
    "StoreOverloaded",
    "StoreStats",
    "StoreUnavailable",
    "BucketLost",
    "open_store",
    "parse_store_url",
]

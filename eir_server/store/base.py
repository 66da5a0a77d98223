"""The store contract shared by the embedded and the Redis backends."""

from __future__ import annotations

import asyncio
from typing import Final, Protocol, runtime_checkable

from eir_server.policy.types import ImeiRecord


class _Missing:
    """Sentinel type: "not in the in-process cache, call fetch()"."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing
"""`get_nowait` returns this (the class itself, so `is MISSING` and `type[MISSING]` both work)."""


class StoreUnavailable(Exception):
    """The backend cannot answer now; the caller applies its fallback verdict."""


class BucketLost(StoreUnavailable):
    """The IMEI's bucket of the register is missing from Redis (see layout.MARKER_FIELD): the
    store logs that once per version; the caller applies its fallback without an episode of
    its own per lookup (the rest of the register still answers)."""


class StoreOverloaded(StoreUnavailable):
    """Our own process was too busy to read the answer in time; the store is not to blame (the
    caller answers "too busy" rather than a fallback verdict)."""


class StoreStats:
    """Plain int counters, read by the metrics exporter on scrape (no locking needed)."""

    cache_hits: int
    cache_misses: int
    redis_hits: int  # fetched from Redis: listed
    redis_misses: int  # fetched from Redis: not listed
    fetches: int
    fetch_batches: int
    fetch_keys: int
    redis_errors: int
    unavailable_fetches: int
    version_changes: int
    cache_evictions: int
    snapshot_hits: int  # answered from the register snapshot: listed
    snapshot_misses: int  # answered from the register snapshot: not listed
    redis_up: int

    # The names once: declared above (so mypy knows them), the slots and the exported fields.
    FIELDS: Final = tuple(__annotations__)
    __slots__ = FIELDS

    def __init__(self) -> None:
        for name in self.FIELDS:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.FIELDS}

    def __repr__(self) -> str:
        return f"StoreStats({self.as_dict()})"


@runtime_checkable
class RecordStore(Protocol):
    """Where the S13/N5g-eir handlers get the register record for a 14-digit IMEI.

    Hot path: `r = store.get_nowait(imei14)`; when `r is MISSING`, `await store.fetch(imei14)`.
    """

    name: str
    ready: bool
    stats: StoreStats

    @property
    def version(self) -> str | None: ...

    def get_nowait(self, imei14: str) -> ImeiRecord | None | type[_Missing]: ...

    def fetch(self, imei14: str) -> asyncio.Future[ImeiRecord | None]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

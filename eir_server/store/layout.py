"""Redis key layout of the register (one place, used by the reader and by sync).

Keys, with N the namespace (default "eir") and V a version id (decimal, from INCR N:seq):
  N:cur          string: the version being served; switching it is the one atomic step
  N:seq          counter for version ids
  N:versions     hash V -> JSON {nb, full}: every version ever started (so a crashed run's
                 leftovers can be found and deleted without SCAN)
  N:V:m          hash: meta (base, nb, flen, lists JSON, counts, created)
  N:V:r          hash: record table id -> encoded blacklist-only listing (shared values)
  N:V:d          hash: overlay imei14 -> value or "" (tombstone); deltas since the full load
  N:V:b:<i>      hash, i in [0, nb): bucket of a full load; field = (imei // nb) as flen
                 big-endian bytes, value = record id (decimal) or an encoded listing

Bucketing by `imei % nb` spreads IMEIs evenly whatever the TAC mix, keeps every bucket small
enough for Redis's listpack encoding, and the quotient needs only 4-5 bytes as a field.
"""

from __future__ import annotations

from dataclasses import dataclass

IMEI14_MAX = 10**14 - 1


def field_len(nb: int) -> int:
    return max(1, ((IMEI14_MAX // nb).bit_length() + 7) // 8)


def cur_key(ns: str) -> str:
    return f"{ns}:cur"


def seq_key(ns: str) -> str:
    return f"{ns}:seq"


def versions_key(ns: str) -> str:
    return f"{ns}:versions"


def runs_key(ns: str) -> str:
    return f"{ns}:runs"


def lock_key(ns: str) -> str:
    return f"{ns}:lock"


def meta_key(ns: str, ver: str) -> str:
    return f"{ns}:{ver}:m"


def table_key(ns: str, ver: str) -> str:
    return f"{ns}:{ver}:r"


def overlay_key(ns: str, ver: str) -> str:
    return f"{ns}:{ver}:d"


def bucket_key(ns: str, ver: str, i: int) -> str:
    return f"{ns}:{ver}:b:{i}"


@dataclass(frozen=True, slots=True)
class Buckets:
    """Where a full load's buckets live and how to address an IMEI in them."""

    ns: str
    base: str
    nb: int
    flen: int

    def locate(self, imei14: str) -> tuple[str, bytes]:
        q, b = divmod(int(imei14), self.nb)
        return f"{self.ns}:{self.base}:b:{b}", q.to_bytes(self.flen, "big")

"""Redis key layout of the register (one place, used by the reader and by sync).

Keys, with N the namespace (default "eir") and V a version id (decimal, from INCR N:seq):
  N:cur          string: the version being served; switching it is the one atomic step
  N:seq          counter for version ids
  N:tac          hash: the GSMA TAC file served (sha256, file, rows, bad, loaded); switched
                 on its own, after the lists of the same run
  N:tac:<sha256> string: that TAC file's text; N:tacs registers every stored one for GC
  N:runs         list: JSON record of the newest 100 sync runs; N:runs:count hash result -> n
  N:versions     hash V -> JSON {k, full}: every version ever started (so a crashed run's
                 leftovers can be found and deleted without SCAN)
  N:V:m          hash: meta (base, k, lists JSON, counts, created)
  N:V:r          hash: record table id -> encoded blacklist-only listing (shared values)
  N:V:d          hash: overlay imei14 -> value or "" (tombstone); deltas since the full load
  N:V:b:<s>      hash, s = the last k digits of the 14-digit IMEI (10**k buckets); field =
                 the first 14-k digits: for k >= 5 as the decimal "1"+digits, for k <= 4 packed
                 two digits per byte (BCD, "1"-padded to an even count); value = record id
                 (decimal) or an encoded listing

A full load whose meta has `markers` = 1 has every one of its 10**k bucket keys: a bucket no
IMEI fell into holds only MARKER_FIELD. A bucket key missing from Redis is then a bucket lost
(a Cluster primary back without its data, a failed reshard), which a lookup tells from an IMEI
that is not listed; without markers both read as nil.

Why: the low serial digits spread IMEIs evenly whatever the TAC mix, so with k chosen from the
list size every bucket stays small enough for Redis's compact listpack encoding; the field is a
decimal Redis stores as a 4-byte integer for k >= 5 (the leading "1" keeps a TAC's leading zero
from turning it into a string); with k <= 4 the 10+ digits would need an 8-byte integer, so they
are BCD-packed into 5 bytes instead. Slices and unhexlify only: neither the 10M-row load nor the
reader converts an IMEI to an int.
"""

from __future__ import annotations

from binascii import unhexlify
from dataclasses import dataclass

IMEI14_MAX = 10**14 - 1
# No IMEI's field is empty (decimal "1"+digits, or BCD bytes): the marker cannot collide.
MARKER_FIELD = b""


def digits_for(rows: int, per_bucket: int) -> int:
    """Smallest k (1..6) such that 10**k buckets hold at most `per_bucket` rows on average."""
    k = 1
    while k < 6 and rows / 10**k > per_bucket:
        k += 1
    return k


def cur_key(ns: str) -> str:
    return f"{ns}:cur"


def seq_key(ns: str) -> str:
    return f"{ns}:seq"


def versions_key(ns: str) -> str:
    return f"{ns}:versions"


def runs_key(ns: str) -> str:
    return f"{ns}:runs"


def run_counts_key(ns: str) -> str:
    """hash result -> number of sync runs recorded (N:runs keeps only the newest 100)."""
    return f"{ns}:runs:count"


def run_result(run: dict[str, object]) -> str:
    """A recorded sync run's result: full | delta | noop, or refused (a list refused, the
    others applied) | failed."""
    if run.get("refused"):
        return "refused"
    if run.get("error") or run.get("mode") == "failed":
        return "failed"
    return str(run.get("mode") or "failed")


def lock_key(ns: str) -> str:
    return f"{ns}:lock"


def tac_key(ns: str) -> str:
    """Hash: the GSMA TAC file being served: sha256, file, rows, bad, loaded."""
    return f"{ns}:tac"


def tac_data_key(ns: str, sha256: str) -> str:
    """String: the TAC file's text (decompressed when published as a zip), by content hash."""
    return f"{ns}:tac:{sha256}"


def tacs_key(ns: str) -> str:
    """Hash sha256 -> JSON info of every TAC text stored (GC finds leftovers without SCAN)."""
    return f"{ns}:tacs"


def meta_key(ns: str, ver: str) -> str:
    return f"{ns}:{ver}:m"


def table_key(ns: str, ver: str) -> str:
    return f"{ns}:{ver}:r"


def overlay_key(ns: str, ver: str) -> str:
    return f"{ns}:{ver}:d"


def bucket_key(ns: str, ver: str, i: int, k: int) -> str:
    return f"{ns}:{ver}:b:{i:0{k}d}"


@dataclass(frozen=True, slots=True)
class Buckets:
    """Where a full load's buckets live and how to address an IMEI in them."""

    ns: str
    base: str
    k: int

    def locate(self, imei14: str) -> tuple[str, str | bytes]:
        cut = 14 - self.k
        return f"{self.ns}:{self.base}:b:{imei14[cut:]}", field_of(imei14[:cut])


def field_of(prefix: str) -> str | bytes:
    """Hash field for the first 14-k digits of an IMEI (see the module docstring)."""
    if len(prefix) <= 9:
        return "1" + prefix
    return unhexlify(prefix if len(prefix) % 2 == 0 else "1" + prefix)

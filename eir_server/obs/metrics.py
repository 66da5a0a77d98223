"""Process-local metrics: plain ints on the hot path, Prometheus families on scrape only.

The hot path bumps attributes of one `Metrics` object per worker process directly::

    m.requests[("s13", "ECR", "2001")] += 1
    m.verdicts[(verdict.status, verdict.rule)] += 1     # status: EquipmentStatus | None | str
    m.latency_s13.observe(dt)                           # seconds

Nothing here touches prometheus_client until a scrape: `Metrics.snapshot()` copies the counters
into a `Snapshot` (plain, JSON-serialisable, mergeable across workers), and `SnapshotCollector`
turns a snapshot into metric families. `SPECS` below is the single list of exposed names; the
docs, the Grafana dashboard and the alert rules are tested against it.
"""

from __future__ import annotations

import contextlib
import os
import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from eir_server.policy.types import EquipmentStatus

# 50 µs .. 1 s: an answer from the local cache takes tens of µs, a Redis round trip ~100 µs-1 ms,
# anything near 1 s is already a timeout at the MME.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0,
)  # fmt: skip

# Per-peer series: at most this many Origin-Hosts per worker, the rest as "_other". A node has
# tens of MMEs/DRAs; the bound keeps a misconfigured or hostile network from exploding series.
MAX_PEER_LABELS = 64
OTHER_PEER = "_other"

Kind = Literal["counter", "gauge", "histogram"]
Merge = Literal["sum", "min", "max"]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One exposed family. `merge` says how a node-wide value is built from the workers' values."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    merge: Merge = "sum"
    source: str = "counter"  # "counter": a Metrics attribute; else the gauge-callback name


SPECS: tuple[MetricSpec, ...] = (
    # --- traffic -------------------------------------------------------------------------
    MetricSpec(
        "eir_requests_total",
        "counter",
        "Requests answered, by interface (s13, n5g_eir), command and result "
        "(Diameter Result-Code / Experimental-Result-Code, or HTTP status).",
        ("interface", "command", "result"),
    ),
    MetricSpec(
        "eir_verdicts_total",
        "counter",
        "Equipment verdicts by status (whitelisted, greylisted, blacklisted, unknown) "
        "and deciding policy rule.",
        ("status", "rule"),
    ),
    MetricSpec(
        "eir_request_duration_seconds",
        "histogram",
        "Time from a request's last byte read to its answer being queued for sending.",
        ("interface",),
    ),
    MetricSpec(
        "eir_requests_in_flight",
        "gauge",
        "Requests received and not yet answered.",
        (),
        "sum",
        "in_flight",
    ),
    MetricSpec(
        "eir_request_queue_depth",
        "gauge",
        "Requests waiting for a store lookup batch.",
        (),
        "sum",
        "queue_depth",
    ),
    MetricSpec(
        "eir_requests_shed_total",
        "counter",
        "Requests refused for overload instead of being processed (S13: 3004 "
        "DIAMETER_TOO_BUSY), by interface and reason (in_flight: too many waiting for the "
        "store; others as the overload controls name them).",
        ("interface", "reason"),
    ),
    # --- Diameter peers ------------------------------------------------------------------
    MetricSpec(
        "eir_diameter_peers",
        "gauge",
        "Diameter peer connections by RFC 6733 state (lower case, e.g. r_open).",
        ("state",),
        "sum",
        "peers",
    ),
    MetricSpec(
        "eir_diameter_peer_connections",
        "gauge",
        "Diameter connections per peer Origin-Host (after CER) and RFC 6733 state. At most "
        f"{MAX_PEER_LABELS} Origin-Hosts per worker; the rest are counted as origin_host=\"_other\".",
        ("origin_host", "state"),
        "sum",
        "peer_table",
    ),
    MetricSpec(
        "eir_diameter_peer_requests_total",
        "counter",
        "Requests received per peer Origin-Host (same bound as eir_diameter_peer_connections).",
        ("origin_host",),
        "sum",
        "peer_table",
    ),
    MetricSpec(
        "eir_diameter_cer_total",
        "counter",
        "Capabilities-Exchange-Requests handled, by outcome.",
        ("outcome",),
    ),
    MetricSpec(
        "eir_diameter_connections_accepted_total",
        "counter",
        "Diameter transport connections accepted (TCP and TLS).",
    ),
    MetricSpec(
        "eir_diameter_framing_errors_total",
        "counter",
        "Connections closed because their byte stream could not be framed (bad version, "
        "Message-Length below 20 or above the maximum).",
    ),
    MetricSpec(
        "eir_http_protocol_errors_total",
        "counter",
        "N5g-eir connection and stream errors by kind: h2_<RFC 9113 error code> for HTTP/2 "
        "(h2_stream_error for streams reset), http1_bad_request for unparsable HTTP/1.1, "
        "tls_handshake_failed, connection_refused (limits), first_request_timeout.",
        ("error",),
    ),
    MetricSpec(
        "eir_diameter_watchdog_failures_total",
        "counter",
        "RFC 3539 watchdog expiries (peer went SUSPECT or DOWN).",
    ),
    MetricSpec(
        "eir_diameter_dpr_total",
        "counter",
        "Disconnect-Peer-Requests by direction (received, sent) and Disconnect-Cause.",
        ("direction", "cause"),
    ),
    MetricSpec(
        "eir_overload_delay_seconds",
        "gauge",
        "The worker's queueing-delay estimate: the largest of loop lag, bytes waiting in the "
        "kernel over the read rate, and the age of the oldest request waiting for the store.",
        (),
        "max",
        "overload",
    ),
    MetricSpec(
        "eir_overload_reduction_percent",
        "gauge",
        "The traffic reduction asked of DOIC peers (RFC 7683 OC-Reduction-Percentage); 0 "
        "when not overloaded.",
        (),
        "max",
        "overload",
    ),
    MetricSpec(
        "eir_overload_shedding",
        "gauge",
        "1 while the worker sheds load (per worker; summed: workers shedding).",
        (),
        "sum",
        "overload",
    ),
    MetricSpec(
        "eir_diameter_layout_cache_entries",
        "gauge",
        "Message shapes cached by the Diameter fast path (bounded per request command).",
        (),
        "sum",
        "layouts",
    ),
    MetricSpec(
        "eir_diameter_layout_cache_evictions_total",
        "counter",
        "Cached message shapes evicted to make room for new ones (a steady rate means peers "
        "send more distinct shapes than the cache holds: those requests take the slower "
        "validate-in-one-pass path).",
        (),
        "sum",
        "layouts",
    ),
    MetricSpec(
        "eir_diameter_protocol_errors_total",
        "counter",
        "Answers carrying a protocol/permanent error, by Result-Code sent.",
        ("result_code",),
    ),
    # --- store -----------------------------------------------------------------------------
    MetricSpec(
        "eir_store_lookups_total",
        "counter",
        "Equipment lookups by store tier (cache, redis) and result (hit, miss).",
        ("tier", "result"),
        "sum",
        "store",
    ),
    MetricSpec(
        "eir_store_redis_errors_total",
        "counter",
        "Redis commands that failed or timed out.",
        (),
        "sum",
        "store",
    ),
    MetricSpec(
        "eir_store_fallback_verdicts_total",
        "counter",
        "Verdicts given by the configured fallback because the store was unreachable.",
        (),
        "sum",
        "store",
    ),
    MetricSpec(
        "eir_store_fetches_total",
        "counter",
        "Lookups that missed the local cache and were fetched from the backend.",
        (),
        "sum",
        "store",
    ),
    MetricSpec(
        "eir_store_fetch_batches_total",
        "counter",
        "Backend round trips (batched MGETs) made for those fetches.",
        (),
        "sum",
        "store",
    ),
    MetricSpec(
        "eir_store_cache_evictions_total",
        "counter",
        "Entries evicted from the local cache.",
        (),
        "sum",
        "store",
    ),
    MetricSpec(
        "eir_store_redis_up",
        "gauge",
        "1 while Redis answers (lowest across workers); the embedded store reports 1.",
        (),
        "min",
        "store",
    ),
    MetricSpec(
        "eir_store_fallback_episodes_total",
        "counter",
        "Episodes of fallback answers (each starts with the first fallback after verdicts "
        "from the store and ends with the next verdict from the store).",
        (),
        "sum",
        "store",
    ),
    MetricSpec(
        "eir_store_fallback_active",
        "gauge",
        "1 while the store is unreachable and answers come from the fallback.",
        (),
        "max",
        "store",
    ),
    # --- national register -----------------------------------------------------------------
    MetricSpec(
        "eir_register_version",
        "gauge",
        "Register served, as its date YYYYMMDDHHMMSS (same on both stores; lowest across "
        "workers). Absent while no register is served.",
        (),
        "min",
        "register",
    ),
    MetricSpec(
        "eir_register_info",
        "gauge",
        "1 for each store version served by a worker (Redis: the version counter; embedded: "
        "the run timestamp).",
        ("version",),
        "max",
        "register",
    ),
    MetricSpec(
        "eir_register_timestamp_seconds",
        "gauge",
        "The register's own date: run timestamp of the newest list file served, unix seconds "
        "(oldest across workers). Its age is what --max-register-age limits.",
        (),
        "min",
        "register",
    ),
    MetricSpec(
        "eir_register_last_sync_timestamp_seconds",
        "gauge",
        "Unix time this node's register data last changed: the version switch by "
        "`eir-server sync` (Redis) or the load at start/SIGHUP (embedded); oldest across workers.",
        (),
        "min",
        "register",
    ),
    MetricSpec(
        "eir_register_sync_rows",
        "gauge",
        "Rows applied or rejected by the last successful sync, per list "
        "(blacklist, notification, exception...).",
        ("list", "outcome"),
        "max",
        "register",
    ),
    # --- audit and device signals --------------------------------------------------------
    MetricSpec(
        "eir_audit_records_total",
        "counter",
        "Audit observations by outcome: queued (sampled, taken for writing), dropped (buffer "
        "full), written, write_failed.",
        ("outcome",),
    ),
    MetricSpec(
        "eir_device_signals_total",
        "counter",
        "Device-change/clone signals: imei_multi_imsi, imsi_imei_change.",
        ("kind",),
    ),
    MetricSpec(
        "eir_device_signals_tracked",
        "gauge",
        "IMEIs and IMSIs the device signals remember (kind imei, imsi; per worker at most "
        "--device-signal-max-devices each, summed over workers).",
        ("kind",),
        "sum",
        "device_signals",
    ),
    # --- register sync (the run records `eir-server sync` keeps in Redis) -------------------
    MetricSpec(
        "eir_sync_runs_total",
        "counter",
        "`eir-server sync` runs recorded in Redis by result (full, delta, noop, refused, "
        "failed), whichever process ran them (--once runs included).",
        ("result",),
        "max",
        "sync",
    ),
    MetricSpec(
        "eir_sync_last_run_timestamp_seconds",
        "gauge",
        "End of the newest recorded sync run, unix seconds.",
        (),
        "max",
        "sync",
    ),
    MetricSpec(
        "eir_sync_last_success_timestamp_seconds",
        "gauge",
        "End of the newest recorded sync run that succeeded (full, delta or noop).",
        (),
        "max",
        "sync",
    ),
    MetricSpec(
        "eir_sync_last_run_failed",
        "gauge",
        "1 when the newest recorded sync run failed or refused a list, else 0.",
        (),
        "max",
        "sync",
    ),
    MetricSpec(
        "eir_sync_last_run_duration_seconds",
        "gauge",
        "Duration of the newest recorded sync run.",
        (),
        "max",
        "sync",
    ),
    # --- process -----------------------------------------------------------------------------
    MetricSpec(
        "eir_ready",
        "gauge",
        "1 while /readyz answers 200 (every worker ready), else 0.",
        (),
        "min",
        "server",
    ),
    MetricSpec(
        "eir_build_info",
        "gauge",
        "1, labelled with the eir-server version, the Python version, the store kind and the "
        "build (mypyc: the request path compiled; python).",
        ("version", "python", "store", "build"),
        "max",
        "process",
    ),
    MetricSpec(
        "eir_process_cpu_seconds_total",
        "counter",
        "CPU time (user + system) per process: worker index, or parent.",
        ("worker",),
        "sum",
        "process",
    ),
    MetricSpec(
        "eir_process_resident_memory_bytes",
        "gauge",
        "Resident memory per process.",
        ("worker",),
        "sum",
        "process",
    ),
    MetricSpec(
        "eir_process_open_fds",
        "gauge",
        "Open file descriptors per process.",
        ("worker",),
        "sum",
        "process",
    ),
    MetricSpec(
        "eir_process_max_fds",
        "gauge",
        "File descriptor limit per process.",
        ("worker",),
        "sum",
        "process",
    ),
    # --- aggregation -----------------------------------------------------------------------
    MetricSpec(
        "eir_metrics_workers",
        "gauge",
        "Worker processes by scrape state (expected, reporting).",
        ("state",),
        "sum",
        "aggregator",
    ),
)

SPEC_BY_NAME: dict[str, MetricSpec] = {s.name: s for s in SPECS}

GAUGE_CALLBACKS: frozenset[str] = frozenset(
    s.source for s in SPECS if s.source not in ("counter", "aggregator", "server", "process")
)


def exposed_sample_names() -> frozenset[str]:
    """Every series name a scrape can contain (histogram _bucket/_sum/_count included)."""
    names: set[str] = set()
    for s in SPECS:
        if s.kind == "histogram":
            names.update(s.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(s.name)
    return frozenset(names)


class LatencyHistogram:
    """Fixed-bucket histogram; `observe` is one bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self) -> None:
        # Fixed bounds: every worker's histogram must line up bucket by bucket to be merged.
        self.bounds = LATENCY_BUCKETS
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # last slot: above the highest bound (+Inf)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus `le`).
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def observe_many(self, seconds: float, n: int) -> None:
        """`n` observations of the same value (answers written by one flush)."""
        self.counts[bisect_left(self.bounds, seconds)] += n
        self.sum += seconds * n


Labels = tuple[str, ...]


@dataclass(slots=True)
class Snapshot:
    """A copy of one process's (or a merged node's) values, safe to hand across processes.

    samples: counter and gauge families -> {label values: value}
    histograms: family -> {label values: (per-bucket counts incl. +Inf slot, sum)}
    """

    samples: dict[str, dict[Labels, float]] = field(default_factory=dict)
    histograms: dict[str, dict[Labels, tuple[list[int], float]]] = field(default_factory=dict)
    ready: tuple[bool, str] | None = None
    incarnation: str = ""

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "s": {n: [[list(k), v] for k, v in d.items()] for n, d in self.samples.items()},
            "h": {
                n: [[list(k), c, s] for k, (c, s) in d.items()] for n, d in self.histograms.items()
            },
            "r": list(self.ready) if self.ready is not None else None,
            "i": self.incarnation,
        }

    @classmethod
    def from_json_obj(cls, obj: Mapping[str, Any]) -> Snapshot:
        r = obj.get("r")
        return cls(
            samples={n: {tuple(k): float(v) for k, v in rows} for n, rows in obj["s"].items()},
            histograms={
                n: {tuple(k): ([int(x) for x in c], float(s)) for k, c, s in rows}
                for n, rows in obj["h"].items()
            },
            ready=(bool(r[0]), str(r[1])) if r is not None else None,
            incarnation=str(obj.get("i", "")),
        )


def merge_snapshots(snaps: Iterable[Snapshot], *, counters_only: bool = False) -> Snapshot:
    """Node totals: counters and histograms add up, gauges follow their spec's `merge`."""
    out = Snapshot()
    for snap in snaps:
        for name, rows in snap.samples.items():
            spec = SPEC_BY_NAME.get(name)
            if spec is None or (counters_only and spec.kind != "counter"):
                continue
            dst = out.samples.setdefault(name, {})
            for k, v in rows.items():
                old = dst.get(k)
                if old is None:
                    dst[k] = v
                elif spec.merge == "sum":
                    dst[k] = old + v
                elif spec.merge == "min":
                    dst[k] = min(old, v)
                else:
                    dst[k] = max(old, v)
        for name, hrows in snap.histograms.items():
            hdst = out.histograms.setdefault(name, {})
            for k, (counts, total) in hrows.items():
                if k in hdst:
                    old_counts, old_sum = hdst[k]
                    hdst[k] = (
                        [a + b for a, b in zip(old_counts, counts, strict=True)],
                        old_sum + total,
                    )
                else:
                    hdst[k] = (list(counts), total)
    return out


def _status_label(status: object) -> str:
    if status is None:
        return "unknown"
    if isinstance(status, EquipmentStatus):
        return status.name.lower()
    return str(status)


def _peer_state_label(state: object) -> str:
    return str(state).lower().replace("-", "_").replace("/", "_")


# Store stats: attribute (or mapping key) names accepted from the store's `stats` object.
# Store stats: attribute (or mapping key) names read from the store's `stats` object
# (eir_server.store.base.StoreStats), first matching name wins per series.
_STORE_FIELDS: tuple[tuple[tuple[str, ...], str, Labels], ...] = (
    (("cache_hits",), "eir_store_lookups_total", ("cache", "hit")),
    (("cache_misses",), "eir_store_lookups_total", ("cache", "miss")),
    (("redis_hits",), "eir_store_lookups_total", ("redis", "hit")),
    (("redis_misses",), "eir_store_lookups_total", ("redis", "miss")),
    (("snapshot_hits",), "eir_store_lookups_total", ("snapshot", "hit")),
    (("snapshot_misses",), "eir_store_lookups_total", ("snapshot", "miss")),
    (("fetches",), "eir_store_fetches_total", ()),
    (("fetch_batches",), "eir_store_fetch_batches_total", ()),
    (("cache_evictions",), "eir_store_cache_evictions_total", ()),
    (("redis_errors",), "eir_store_redis_errors_total", ()),
    # a fetch the store could not answer gets the fallback verdict from the caller
    (("fallback_verdicts", "unavailable_fetches"), "eir_store_fallback_verdicts_total", ()),
    (("fallback_episodes",), "eir_store_fallback_episodes_total", ()),
    (("redis_up",), "eir_store_redis_up", ()),
)


def _field(obj: object, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


class Metrics:
    """One per worker process. Bump attributes directly; they are plain dicts of ints.

    Counter families (keys -> label values):
      requests[(interface, command, result)]     interface "s13" | "n5g_eir"; result str/int
      verdicts[(status, rule)]                    status EquipmentStatus | None | str
      protocol_errors[result_code]                int
      cer[outcome]                                e.g. "success", "no_common_application"
      dpr[(direction, cause)]                     direction "received" | "sent"
      audit[outcome]                              maintained by AuditRecorder
      device_signals[kind]                        maintained by AuditRecorder
      watchdog_failures                           int attribute
      framing_errors                              int attribute
      connections_accepted                        int attribute
    Histograms: latency_s13, latency_n5g (`observe(seconds)`).
    Gauges: `set_gauge_callback(name, fn)`, fn called on scrape only, in the worker's thread:
      "peers"       -> Mapping[state, count]
      "in_flight"   -> number
      "queue_depth" -> number
      "layouts"     -> mapping: entries, evictions (the Diameter fast path's layout caches)
      "overload"    -> mapping: delay (s), reduction (%), active (0/1)
      "device_signals" -> (IMEIs, IMSIs) the device-change detector remembers
      "store"       -> the store's `stats` (StoreStats) or a mapping with any of
                       cache_hits, cache_misses, fetches, fetch_batches, cache_evictions,
                       redis_errors, unavailable_fetches (monotonic ints), redis_up (0/1);
                       fallback_active defaults to `not redis_up`
      "peer_table"  -> Mapping[origin_host, (Mapping[state, connections], requests)] (bounded)
      "sync"        -> mapping: runs {result: n}, last_run, last_success, last_failed,
                       last_duration (from the run records `eir-server sync` keeps in Redis)
      "register"    -> mapping: version (number or string), last_sync (unix seconds), rows:
                       Mapping[(list, "applied"|"rejected"), int]
    """

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, str, str | int], int] = defaultdict(int)
        self.verdicts: defaultdict[tuple[object, str], int] = defaultdict(int)
        self.protocol_errors: defaultdict[int, int] = defaultdict(int)
        self.cer: defaultdict[str, int] = defaultdict(int)
        self.dpr: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.audit: defaultdict[str, int] = defaultdict(int)
        self.device_signals: defaultdict[str, int] = defaultdict(int)
        # overload: requests refused instead of processed, by (interface, reason)
        self.shed: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.http_errors: defaultdict[str, int] = defaultdict(int)  # N5g-eir, by kind
        self.worker_label = "0"  # process metrics label: the worker index
        self.store_kind = ""  # eir_build_info's store label: "redis" or "memory"
        self.watchdog_failures = 0
        self.framing_errors = 0
        self.connections_accepted = 0
        self.latency_s13 = LatencyHistogram()
        self.latency_n5g = LatencyHistogram()
        self._callbacks: dict[str, Callable[[], Any]] = {}
        # Identifies this process's counters so an aggregator can tell a restarted worker
        # (counters back at zero) from a live one.
        self.incarnation = f"{os.getpid()}-{time.time_ns()}"

    def set_gauge_callback(self, name: str, fn: Callable[[], Any]) -> None:
        if name not in GAUGE_CALLBACKS:
            raise ValueError(f"unknown gauge callback {name!r}; known: {sorted(GAUGE_CALLBACKS)}")
        self._callbacks[name] = fn

    def snapshot(self, ready: tuple[bool, str] | None = None) -> Snapshot:
        """Copy current values. Cheap (a few hundred dict items); safe to call on the loop."""
        s: dict[str, dict[Labels, float]] = {}
        s["eir_requests_total"] = {
            (i, c, str(r)): float(v) for (i, c, r), v in self.requests.items()
        }
        verdicts: dict[Labels, float] = {}
        for (status, rule), v in self.verdicts.items():
            k = (_status_label(status), rule)
            verdicts[k] = verdicts.get(k, 0.0) + v
        s["eir_verdicts_total"] = verdicts
        s["eir_diameter_protocol_errors_total"] = {
            (str(code),): float(v) for code, v in self.protocol_errors.items()
        }
        s["eir_diameter_cer_total"] = {(o,): float(v) for o, v in self.cer.items()}
        s["eir_diameter_dpr_total"] = {(d, str(c)): float(v) for (d, c), v in self.dpr.items()}
        s["eir_diameter_watchdog_failures_total"] = {(): float(self.watchdog_failures)}
        s["eir_diameter_framing_errors_total"] = {(): float(self.framing_errors)}
        s["eir_diameter_connections_accepted_total"] = {(): float(self.connections_accepted)}
        s["eir_audit_records_total"] = {(o,): float(v) for o, v in self.audit.items()}
        s["eir_device_signals_total"] = {(k,): float(v) for k, v in self.device_signals.items()}
        s["eir_requests_shed_total"] = {(i, r): float(v) for (i, r), v in self.shed.items()}
        s["eir_http_protocol_errors_total"] = {(k,): float(v) for k, v in self.http_errors.items()}
        if ready is not None:
            s["eir_ready"] = {(): 1.0 if ready[0] else 0.0}
        add_process_samples(s, self.worker_label, self.store_kind)
        self._read_callbacks(s)
        h = {
            "eir_request_duration_seconds": {
                ("s13",): (list(self.latency_s13.counts), self.latency_s13.sum),
                ("n5g_eir",): (list(self.latency_n5g.counts), self.latency_n5g.sum),
            }
        }
        return Snapshot(samples=s, histograms=h, ready=ready, incarnation=self.incarnation)

    def _read_callbacks(self, s: dict[str, dict[Labels, float]]) -> None:
        cb = self._callbacks
        if "in_flight" in cb:
            s["eir_requests_in_flight"] = {(): float(cb["in_flight"]())}
        if "queue_depth" in cb:
            s["eir_request_queue_depth"] = {(): float(cb["queue_depth"]())}
        if "overload" in cb:
            ov = cb["overload"]()
            s["eir_overload_delay_seconds"] = {(): float(ov["delay"])}
            s["eir_overload_reduction_percent"] = {(): float(ov["reduction"])}
            s["eir_overload_shedding"] = {(): float(ov["active"])}
        if "device_signals" in cb:
            imeis, imsis = cb["device_signals"]()
            s["eir_device_signals_tracked"] = {("imei",): float(imeis), ("imsi",): float(imsis)}
        if "layouts" in cb:
            layouts = cb["layouts"]()
            s["eir_diameter_layout_cache_entries"] = {(): float(layouts["entries"])}
            s["eir_diameter_layout_cache_evictions_total"] = {(): float(layouts["evictions"])}
        if "peers" in cb:
            # The open states are always present so "no peers up" is a 0, not an absent series.
            peers: dict[Labels, float] = {("r_open",): 0.0, ("i_open",): 0.0}
            for state, n in cb["peers"]().items():
                k = (_peer_state_label(state),)
                peers[k] = peers.get(k, 0.0) + float(n)
            s["eir_diameter_peers"] = peers
        if "peer_table" in cb:
            conns: dict[Labels, float] = {}
            reqs: dict[Labels, float] = {}
            for host, (states, requests) in cb["peer_table"]().items():
                for state, n in states.items():
                    k = (host, _peer_state_label(state))
                    conns[k] = conns.get(k, 0.0) + float(n)
                reqs[(host,)] = reqs.get((host,), 0.0) + float(requests)
            s["eir_diameter_peer_connections"] = conns
            s["eir_diameter_peer_requests_total"] = reqs
        if "sync" in cb:
            sync = cb["sync"]() or {}
            runs = _field(sync, "runs")
            if runs:
                s["eir_sync_runs_total"] = {(str(r),): float(n) for r, n in runs.items()}
            for key, name in (("last_run", "eir_sync_last_run_timestamp_seconds"),
                              ("last_success", "eir_sync_last_success_timestamp_seconds"),
                              ("last_failed", "eir_sync_last_run_failed"),
                              ("last_duration", "eir_sync_last_run_duration_seconds")):
                value = _field(sync, key)
                if value is not None:
                    s[name] = {(): float(value)}
        if "store" in cb:
            stats = cb["store"]()
            for names, family, labels in _STORE_FIELDS:
                for fname in names:
                    value = _field(stats, fname)
                    if value is not None:
                        s.setdefault(family, {})[labels] = float(value)
                        break
            active = _field(stats, "fallback_active")
            if active is None and (up := _field(stats, "redis_up")) is not None:
                active = not up  # the store is down: every miss gets the fallback verdict
            if active is not None:
                s["eir_store_fallback_active"] = {(): float(active)}
        if "register" in cb:
            reg = cb["register"]() or {}
            version = _field(reg, "version")
            info = _field(reg, "store_version")
            info = version if info is None else info
            if info is not None:
                # info-style series carries any version string; the numeric gauge only a number
                s["eir_register_info"] = {(str(info),): 1.0}
            if version is not None:
                with contextlib.suppress(TypeError, ValueError):
                    s["eir_register_version"] = {(): float(version)}
            date = _field(reg, "date")
            if date is not None:
                s["eir_register_timestamp_seconds"] = {(): float(date)}
            last_sync = _field(reg, "last_sync")
            if last_sync is not None:
                s["eir_register_last_sync_timestamp_seconds"] = {(): float(last_sync)}
            rows = _field(reg, "rows") or {}
            s["eir_register_sync_rows"] = {
                (str(lst), str(outcome)): float(n) for (lst, outcome), n in rows.items()
            }


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def process_stats() -> dict[str, float]:
    """This process's CPU seconds, RSS, open and maximum fds, from /proc (Linux); {} elsewhere."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b") ", 1)[1].split()
        out["cpu"] = (int(fields[11]) + int(fields[12])) / _CLK_TCK
        out["rss"] = float(int(fields[21]) * _PAGE)
        out["fds"] = float(len(os.listdir("/proc/self/fd")))
        import resource

        out["max_fds"] = float(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    except (OSError, IndexError, ValueError):
        pass
    return out


def add_process_samples(s: dict[str, dict[Labels, float]], worker: str,
                        store: str = "") -> None:
    import platform

    from eir_server import __version__, build_kind

    s["eir_build_info"] = {(__version__, platform.python_version(), store, build_kind()): 1.0}
    st = process_stats()
    for key, name in (("cpu", "eir_process_cpu_seconds_total"),
                      ("rss", "eir_process_resident_memory_bytes"),
                      ("fds", "eir_process_open_fds"), ("max_fds", "eir_process_max_fds")):
        if key in st:
            s.setdefault(name, {})[(worker,)] = st[key]


class SnapshotCollector(Collector):
    """prometheus_client Collector over a snapshot source; values are built on collect() only."""

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        return iter(families(self._source()))


def families(snap: Snapshot) -> list[Metric]:
    out: list[Metric] = []
    for spec in SPECS:
        if spec.kind == "histogram":
            hrows = snap.histograms.get(spec.name)
            if not hrows:
                continue
            hf = HistogramMetricFamily(spec.name, spec.help, labels=spec.labels)
            for labels, (counts, total) in sorted(hrows.items()):
                hf.add_metric(list(labels), _cumulative(counts), total)
            out.append(hf)
            continue
        rows = snap.samples.get(spec.name)
        if rows is None:
            continue
        fam: CounterMetricFamily | GaugeMetricFamily
        if spec.kind == "counter":
            fam = CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
        else:
            fam = GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
        for labels, value in sorted(rows.items()):
            fam.add_metric(list(labels), value)
        out.append(fam)
    return out


def _cumulative(counts: Sequence[int]) -> list[tuple[str, float]]:
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
        running += n
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
    return buckets


def render(snap: Snapshot) -> bytes:
    """Prometheus text exposition (format 0.0.4) of one snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snap))
    return generate_latest(registry)

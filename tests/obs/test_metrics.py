from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from eir_server.obs.metrics import (
    LATENCY_BUCKETS,
    SPECS,
    LatencyHistogram,
    Metrics,
    Snapshot,
    merge_snapshots,
    render,
)
from eir_server.policy.types import EquipmentStatus

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def parse(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counters_render_with_labels_and_status_names() -> None:
    m = Metrics()
    m.requests[("s13", "ECR", 2001)] += 3
    m.requests[("n5g_eir", "GET", "404")] += 1
    m.verdicts[(EquipmentStatus.BLACKLISTED, "blacklist")] += 2
    m.verdicts[("blacklisted", "blacklist")] += 1  # a str status adds to the same series
    m.verdicts[(None, "unknown_tac")] += 1
    m.protocol_errors[5005] += 4
    m.cer["success"] += 1
    m.dpr[("received", "REBOOTING")] += 1
    m.watchdog_failures += 2
    m.audit["dropped"] += 7
    m.device_signals["imei_multi_imsi"] += 1
    got = parse(render(m.snapshot()))
    assert got[("eir_requests_total", (("command", "ECR"), ("interface", "s13"), ("result", "2001")))] == 3
    assert got[("eir_requests_total", (("command", "GET"), ("interface", "n5g_eir"), ("result", "404")))] == 1
    assert got[("eir_verdicts_total", (("rule", "blacklist"), ("status", "blacklisted")))] == 3
    assert got[("eir_verdicts_total", (("rule", "unknown_tac"), ("status", "unknown")))] == 1
    assert got[("eir_diameter_protocol_errors_total", (("result_code", "5005"),))] == 4
    assert got[("eir_diameter_cer_total", (("outcome", "success"),))] == 1
    assert got[("eir_diameter_dpr_total", (("cause", "REBOOTING"), ("direction", "received")))] == 1
    assert got[("eir_diameter_watchdog_failures_total", ())] == 2
    assert got[("eir_audit_records_total", (("outcome", "dropped"),))] == 7
    assert got[("eir_device_signals_total", (("kind", "imei_multi_imsi"),))] == 1


def test_histogram_buckets_are_inclusive_and_cumulative() -> None:
    m = Metrics()
    m.latency_s13.observe(0.00005)  # exactly on the first bound: le="5e-05"
    m.latency_s13.observe(0.000051)  # just above: next bucket
    m.latency_s13.observe(0.3)
    m.latency_s13.observe(2.0)  # above 1 s: only +Inf
    got = parse(render(m.snapshot()))

    def bucket(le: str) -> float:
        return got[("eir_request_duration_seconds_bucket", (("interface", "s13"), ("le", le)))]

    assert bucket("5e-05") == 1
    assert bucket("0.0001") == 2
    assert bucket("0.25") == 2
    assert bucket("0.5") == 3
    assert bucket("1.0") == 3
    assert bucket("+Inf") == 4
    assert got[("eir_request_duration_seconds_count", (("interface", "s13"),))] == 4
    assert got[("eir_request_duration_seconds_sum", (("interface", "s13"),))] == pytest.approx(
        0.00005 + 0.000051 + 0.3 + 2.0
    )
    assert LATENCY_BUCKETS[0] == 0.00005 and LATENCY_BUCKETS[-1] == 1.0


def test_gauge_callbacks_are_read_on_scrape_only() -> None:
    m = Metrics()
    calls = []
    peers = {"R-Open": 2, "Wait-Conn-Ack/Elect": 1}

    def peer_counts() -> dict[str, int]:
        calls.append(1)
        return peers

    m.set_gauge_callback("peers", peer_counts)
    m.set_gauge_callback("in_flight", lambda: 5)
    m.set_gauge_callback("queue_depth", lambda: 9)

    class StoreStats:  # any object with plain-int attributes
        cache_hits = 10
        cache_misses = 4
        redis_hits = 3
        redis_misses = 1
        redis_errors = 2
        fallback_verdicts = 6
        fallback_active = True

    m.set_gauge_callback("store", StoreStats)
    m.set_gauge_callback(
        "register",
        lambda: {"version": 42, "last_sync": 1_700_000_000.5,
                 "rows": {("blacklist", "applied"): 100, ("blacklist", "rejected"): 2}},
    )
    assert calls == []
    got = parse(render(m.snapshot()))
    assert calls == [1]
    assert got[("eir_diameter_peers", (("state", "r_open"),))] == 2
    assert got[("eir_diameter_peers", (("state", "i_open"),))] == 0  # always present
    assert got[("eir_diameter_peers", (("state", "wait_conn_ack_elect"),))] == 1
    assert got[("eir_requests_in_flight", ())] == 5
    assert got[("eir_request_queue_depth", ())] == 9
    assert got[("eir_store_lookups_total", (("result", "hit"), ("tier", "cache")))] == 10
    assert got[("eir_store_lookups_total", (("result", "miss"), ("tier", "redis")))] == 1
    assert got[("eir_store_redis_errors_total", ())] == 2
    assert got[("eir_store_fallback_verdicts_total", ())] == 6
    assert got[("eir_store_fallback_active", ())] == 1
    assert got[("eir_register_version", ())] == 42
    assert got[("eir_register_last_sync_timestamp_seconds", ())] == 1_700_000_000.5
    assert got[("eir_register_sync_rows", (("list", "blacklist"), ("outcome", "rejected")))] == 2


def test_unknown_gauge_callback_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown gauge callback"):
        Metrics().set_gauge_callback("peer", lambda: 1)


def test_merge_sums_counters_and_applies_gauge_policies() -> None:
    a, b = Metrics(), Metrics()
    a.requests[("s13", "ECR", "2001")] += 2
    b.requests[("s13", "ECR", "2001")] += 5
    b.requests[("s13", "ECR", "5422")] += 1
    a.latency_s13.observe(0.001)
    b.latency_s13.observe(0.001)
    b.latency_s13.observe(0.02)
    a.set_gauge_callback("register", lambda: {"version": 7, "last_sync": 100.0})
    b.set_gauge_callback("register", lambda: {"version": 8, "last_sync": 50.0})
    a.set_gauge_callback("store", lambda: {"fallback_active": 0, "redis_errors": 1})
    b.set_gauge_callback("store", lambda: {"fallback_active": 1, "redis_errors": 2})
    a.set_gauge_callback("in_flight", lambda: 3)
    b.set_gauge_callback("in_flight", lambda: 4)
    merged = merge_snapshots([a.snapshot(), b.snapshot()])
    got = parse(render(merged))
    assert got[("eir_requests_total", (("command", "ECR"), ("interface", "s13"), ("result", "2001")))] == 7
    assert got[("eir_requests_total", (("command", "ECR"), ("interface", "s13"), ("result", "5422")))] == 1
    assert got[("eir_register_version", ())] == 7  # the laggard
    assert got[("eir_register_last_sync_timestamp_seconds", ())] == 50.0  # the stalest
    assert got[("eir_store_fallback_active", ())] == 1  # any worker in fallback
    assert got[("eir_store_redis_errors_total", ())] == 3
    assert got[("eir_requests_in_flight", ())] == 7
    assert got[("eir_request_duration_seconds_count", (("interface", "s13"),))] == 3
    assert got[("eir_request_duration_seconds_bucket", (("interface", "s13"), ("le", "0.001")))] == 2


def test_counters_only_merge_drops_gauges() -> None:
    m = Metrics()
    m.requests[("s13", "ECR", "2001")] += 1
    m.set_gauge_callback("in_flight", lambda: 3)
    merged = merge_snapshots([m.snapshot()], counters_only=True)
    assert "eir_requests_in_flight" not in merged.samples
    assert merged.samples["eir_requests_total"] == {("s13", "ECR", "2001"): 1.0}


def test_snapshot_json_round_trip() -> None:
    m = Metrics()
    m.requests[("s13", "ECR", "2001")] += 3
    m.latency_n5g.observe(0.004)
    snap = m.snapshot(ready=(False, "register not loaded"))
    back = Snapshot.from_json_obj(json.loads(json.dumps(snap.to_json_obj())))
    assert back == snap


@given(
    st.lists(st.floats(min_value=0, max_value=5, allow_nan=False), max_size=60),
    st.integers(min_value=1, max_value=4),
)
def test_merged_worker_histograms_equal_one_histogram(values: list[float], workers: int) -> None:
    whole = LatencyHistogram()
    parts = [Metrics() for _ in range(workers)]
    for i, v in enumerate(values):
        whole.observe(v)
        parts[i % workers].latency_s13.observe(v)
    merged = merge_snapshots(p.snapshot() for p in parts)
    counts, total = merged.histograms["eir_request_duration_seconds"][("s13",)]
    assert counts == whole.counts
    assert total == pytest.approx(whole.sum)
    # every value sits in the first bucket whose bound is >= it
    for v in values:
        idx = next((i for i, b in enumerate(LATENCY_BUCKETS) if v <= b), len(LATENCY_BUCKETS))
        assert whole.counts[idx] > 0


def test_names_follow_prometheus_conventions() -> None:
    for spec in SPECS:
        assert re.fullmatch(r"eir_[a-z0-9_]+", spec.name), spec.name
        if spec.kind == "counter":
            assert spec.name.endswith("_total"), spec.name
        else:
            assert not spec.name.endswith("_total"), spec.name
        if spec.kind == "histogram":
            assert spec.name.endswith("_seconds"), spec.name
        for label in spec.labels:
            assert re.fullmatch(r"[a-z_]+", label) and label != "le"


def test_every_metric_is_documented_with_type_and_labels() -> None:
    text = DOCS.read_text()
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\|\s*`(eir_[a-z0-9_]+)`\s*\|\s*(\w+)\s*\|\s*([^|]*)\|", line)
        if m:
            rows[m.group(1)] = (m.group(2), set(re.findall(r"`([a-z_]+)`", m.group(3))))
    for spec in SPECS:
        assert spec.name in rows, f"{spec.name} missing from docs/metrics.md"
        kind, labels = rows[spec.name]
        assert kind == spec.kind, spec.name
        assert labels == set(spec.labels), spec.name
    assert set(rows) == {s.name for s in SPECS}, "docs list a metric the code does not define"


def test_store_stats_of_the_real_store_map_to_metrics() -> None:
    from eir_server.store.base import StoreStats

    stats = StoreStats()
    stats.cache_hits, stats.cache_misses, stats.fetches, stats.fetch_batches = 90, 10, 10, 2
    stats.redis_errors, stats.unavailable_fetches, stats.cache_evictions = 3, 4, 5
    stats.redis_up = 1
    m = Metrics()
    m.set_gauge_callback("store", lambda: stats)
    got = parse(render(m.snapshot()))
    assert got[("eir_store_lookups_total", (("result", "hit"), ("tier", "cache")))] == 90
    assert got[("eir_store_lookups_total", (("result", "miss"), ("tier", "cache")))] == 10
    assert got[("eir_store_fetches_total", ())] == 10
    assert got[("eir_store_fetch_batches_total", ())] == 2
    assert got[("eir_store_cache_evictions_total", ())] == 5
    assert got[("eir_store_redis_errors_total", ())] == 3
    assert got[("eir_store_fallback_verdicts_total", ())] == 4
    assert got[("eir_store_redis_up", ())] == 1
    assert got[("eir_store_fallback_active", ())] == 0
    stats.redis_up = 0  # Redis lost: the fallback is answering
    got = parse(render(m.snapshot()))
    assert got[("eir_store_fallback_active", ())] == 1 and got[("eir_store_redis_up", ())] == 0


def test_register_version_strings_go_to_the_info_series() -> None:
    m = Metrics()
    m.set_gauge_callback("register", lambda: {"version": "20240501T0300", "last_sync": 5.0})
    got = parse(render(m.snapshot()))
    assert got[("eir_register_info", (("version", "20240501T0300"),))] == 1
    assert ("eir_register_version", ()) not in got
    m.set_gauge_callback("register", lambda: {"version": "17"})
    got = parse(render(m.snapshot()))
    assert got[("eir_register_version", ())] == 17

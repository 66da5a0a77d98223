from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from eir_server.obs.audit import (
    REFRESH,
    AuditRecorder,
    DeviceChangeDetector,
    JsonlDirSink,
    MemorySink,
    RedisStreamSink,
    make_sink,
    observation,
)
from eir_server.obs.logging import configure_logging
from eir_server.obs.metrics import Metrics
from eir_server.policy.types import CheckRequest, EquipmentStatus, Verdict

WHITE = Verdict(EquipmentStatus.WHITELISTED, "default")
BLACK = Verdict(EquipmentStatus.BLACKLISTED, "blacklist", ("stolen",))
DAY = 1_714_521_600.0  # 2024-05-01T00:00:00Z


def req(n: int, imsi: str | None = None, **kw: str) -> CheckRequest:
    return CheckRequest(imei=f"35{n:012d}", imsi=imsi, **kw)


@pytest.fixture
def log_buf() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    configure_logging("json", "info", stream=buf, cache_loggers=False)
    yield buf
    structlog.reset_defaults()


def test_observation_fields() -> None:
    row = observation(
        DAY + 0.1234, CheckRequest("35000000000001", "07", "001010000000001", "15550001"),
        BLACK, "mme1.example.net", "s13",
    )
    assert row == {
        "t": f"{DAY + 0.1234:.3f}", "imei": "35000000000001", "imeisv": "3500000000000107",
        "imsi": "001010000000001", "msisdn": "15550001", "peer": "mme1.example.net",
        "interface": "s13", "verdict": "blacklisted", "rule": "blacklist",
    }
    # an N5g-eir PEI carrying an IMEISV: the IMEI is its first 14 digits
    row = observation(DAY, CheckRequest("3500000000000107"), Verdict(None, "unknown"), "amf", "n5g_eir")
    assert (row["imei"], row["imeisv"], row["imsi"], row["verdict"]) == (
        "35000000000001", "3500000000000107", "", "unknown")


async def test_batches_land_in_a_redis_stream(obs_redis, obs_redis_url: str) -> None:
    client = aioredis.Redis.from_url(obs_redis_url)
    m = Metrics()
    rec = AuditRecorder(m, RedisStreamSink(client, stream="t:audit"), batch_size=100)
    for i in range(250):
        rec.record(DAY + i, req(i, imsi=f"00101{i:010d}"), WHITE, "mme1")
    assert rec.pending == 250 and obs_redis.xlen("t:audit") == 0  # nothing written inline
    assert await rec.flush() == 250
    await client.aclose()
    entries = obs_redis.xrange("t:audit")
    assert len(entries) == 250
    first = entries[0][1]
    assert first["imei"] == "35000000000000" and first["imsi"] == "001010000000000"
    assert first["verdict"] == "whitelisted" and first["peer"] == "mme1"
    assert m.audit["queued"] == 250 and m.audit["written"] == 250


async def test_stream_is_bounded_by_approximate_maxlen(obs_redis, obs_redis_url: str) -> None:
    client = aioredis.Redis.from_url(obs_redis_url)
    rec = AuditRecorder(Metrics(), RedisStreamSink(client, "t:bounded", maxlen=1000))
    for i in range(5000):
        rec.record(DAY + i, req(i), WHITE, "mme1")
    await rec.flush()
    await client.aclose()
    # `~` trims whole stream nodes (100 entries by default): bounded, not exact
    assert 1000 <= obs_redis.xlen("t:bounded") <= 1100


async def test_background_task_flushes_without_being_asked(obs_redis, obs_redis_url) -> None:
    client = aioredis.Redis.from_url(obs_redis_url)
    rec = AuditRecorder(Metrics(), RedisStreamSink(client, "t:bg"), batch_size=10,
                        flush_interval=0.05)
    rec.start()
    for i in range(25):
        rec.record(DAY + i, req(i), WHITE, "mme1")
    async with asyncio.timeout(10):
        while obs_redis.xlen("t:bg") < 25:
            await asyncio.sleep(0.01)
    await rec.close()
    await client.aclose()
    assert obs_redis.xlen("t:bg") == 25


async def test_full_buffer_drops_new_observations_and_counts_them() -> None:
    m = Metrics()
    sink = MemorySink()
    rec = AuditRecorder(m, sink, capacity=3)
    for i in range(5):
        rec.record(DAY, req(i), WHITE, "mme1")
    assert rec.pending == 3 and m.audit["dropped"] == 2
    await rec.flush()
    assert [r["imei"] for r in sink.rows] == [f"35{i:012d}" for i in range(3)]  # oldest kept
    assert m.audit["queued"] == 3 and m.audit["written"] == 3


async def test_sampling_decides_what_is_written() -> None:
    m = Metrics()
    draws = iter([0.05, 0.5, 0.09, 0.95, 0.1])
    sink = MemorySink()
    rec = AuditRecorder(m, sink, sample=0.1, rng=lambda: next(draws))
    for i in range(5):
        rec.record(DAY, req(i), WHITE, "mme1")
    await rec.flush()
    assert [r["imei"] for r in sink.rows] == ["35000000000000", "35000000000002"]
    assert m.audit["written"] == 2


async def test_sample_zero_without_detector_costs_nothing() -> None:
    rec = AuditRecorder(Metrics(), MemorySink(), sample=0.0, rng=lambda: pytest.fail("drawn"))
    rec.record(DAY, req(1), WHITE, "mme1")
    assert rec.pending == 0


async def test_detector_sees_unsampled_checks() -> None:
    m = Metrics()
    det = DeviceChangeDetector(m, max_imsis=1, window=3600, log_identities=True)
    rec = AuditRecorder(m, None, detector=det)  # audit off, detection on
    rec.record(DAY, req(7, imsi="001010000000001"), WHITE, "mme1")
    rec.record(DAY + 1, req(7, imsi="001010000000002"), WHITE, "mme1")
    assert await rec.flush() == 0
    assert m.device_signals["imei_multi_imsi"] == 1


async def test_redis_down_counts_failures_and_logs_once(log_buf: io.StringIO) -> None:
    m = Metrics()
    client = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    rec = AuditRecorder(m, RedisStreamSink(client), batch_size=5)
    for i in range(12):
        rec.record(DAY, req(i), WHITE, "mme1")
    assert await rec.flush() == 0  # no exception escapes
    await client.aclose()
    assert m.audit["write_failed"] == 12
    errors = [json.loads(line) for line in log_buf.getvalue().splitlines()]
    assert [e["event"] for e in errors] == ["audit_write_failed"]  # rate-limited
    assert errors[0]["level"] == "error"


def test_imei_with_too_many_imsis_is_signalled_once_per_window(log_buf) -> None:
    m = Metrics()
    det = DeviceChangeDetector(m, max_imsis=2, window=100, log_identities=True)
    imei = "35000000000001"
    assert det.observe(0, imei + "5", "001") == []
    assert det.observe(1, imei, "002") == []
    assert det.observe(2, imei, "003") == ["imei_multi_imsi"]  # check digit ignored: 3 IMSIs
    assert det.observe(3, imei, "004") == []  # already signalled in this window
    assert m.device_signals["imei_multi_imsi"] == 1
    # long after: old IMSIs expired, only two within the window again -> no signal
    assert det.observe(500, imei, "005") == []
    assert det.observe(501, imei, "006") == []
    assert det.observe(502, imei, "007") == ["imei_multi_imsi"]
    events = [json.loads(line) for line in log_buf.getvalue().splitlines()]
    assert [(e["event"], e["kind"], e["imei"]) for e in events] == [
        ("device_signal", "imei_multi_imsi", imei)] * 2


def test_imsi_changing_imei_is_signalled_within_the_window() -> None:
    m = Metrics()
    det = DeviceChangeDetector(m, max_imsis=5, window=100, log_identities=True)
    assert det.observe(0, "35000000000001", "001") == []
    assert det.observe(10, "35000000000001", "001") == []  # same device
    assert det.observe(20, "35000000000002", "001") == ["imsi_imei_change"]
    assert det.observe(500, "35000000000003", "001") == []  # previous sighting too old
    assert det.observe(501, "35000000000003", None) == []  # no IMSI: nothing to correlate
    assert m.device_signals["imsi_imei_change"] == 1


def test_identities_are_kept_exactly(log_buf) -> None:
    """The maps hold identities as numbers: leading zeros and lengths still tell IMSIs apart,
    the previous IMEI is logged as it was, and a User-Name that is not an IMSI is not tracked
    (nothing to correlate), whatever it holds."""
    det = DeviceChangeDetector(Metrics(), window=100, log_identities=True)
    assert det.observe(0, "01000000000001", "001") == []
    assert det.observe(1, "01000000000002", "01") == []  # another IMSI, not "001"
    assert det.observe(2, "01000000000002", "001") == ["imsi_imei_change"]
    assert det.observe(3, "35000000000009", "user@realm") == []
    assert det.observe(4, "35000000000008", "user@realm") == []
    assert det.observe(5, "35000000000008", "1" * 18) == []  # longer than any IMSI
    assert det.observe(6, "35000000000007", "1" * 18) == []
    assert det.observe(7, "35000000000007", "١٢٣") == []  # digits, but not ASCII ones
    assert det.last_seen("001") == ("01000000000002", 2)
    assert det.last_seen("01") == ("01000000000002", 1)
    events = [json.loads(line) for line in log_buf.getvalue().splitlines()]
    assert [(e["imsi"], e["imei"], e["previous_imei"]) for e in events] == [
        ("001", "01000000000002", "01000000000001")]


def test_times_are_kept_to_the_millisecond() -> None:
    det = DeviceChangeDetector(Metrics(), window=10, log_events=False)
    det.observe(1000.0004, "35000000000001", "001")
    assert det.last_seen("001") == ("35000000000001", 1000.0)
    assert det.observe(1010.0, "35000000000002", "001") == ["imsi_imei_change"]  # 10 s: within
    det.observe(2000.0, "35000000000003", "002")
    assert det.observe(2010.001, "35000000000004", "002") == []  # 10.001 s: past the window


def test_an_unchanged_pair_is_refreshed_once_a_minute() -> None:
    """Repeated sightings of the same IMEI and IMSI within a minute touch nothing (the hot
    path); the last-seen time moves on after that, so a change is judged against it."""
    det = DeviceChangeDetector(Metrics(), window=100, log_identities=True)
    det.observe(0, "35000000000001", "001")
    det.observe(30, "35000000000001", "001")
    assert det.last_seen("001") == ("35000000000001", 0)  # within REFRESH: untouched
    det.observe(61, "35000000000001", "001")
    assert det.last_seen("001") == ("35000000000001", 61)
    # 130 s after the first sighting but 69 s after the refreshed one: inside the window.
    assert det.observe(130, "35000000000002", "001") == ["imsi_imei_change"]


# (seconds since the last sighting, IMEI, IMSI): two devices and three SIMs, so that pairs
# repeat, change and collide; IMEIs in 14-, 15- and 16-digit forms of the same two bodies.
_sightings = st.lists(st.tuples(
    st.sampled_from([0.0, 0.5, 20.0, 61.0]),
    st.sampled_from(["35000000000001", "350000000000015", "35000000000002", "3500000000000223"]),
    st.sampled_from(["001", "002", "003", None])), max_size=40)


@given(_sightings)
@settings(max_examples=300, deadline=None)
def test_skipping_fresh_pairs_signals_what_checking_every_sighting_signals(
        sightings: list[tuple[float, str, str | None]]) -> None:
    """The hot path skips pairs written this period; a detector that checks every sighting in
    full (its fresh pairs forgotten before each) signals exactly the same. A window far longer
    than REFRESH: the skipped refreshes of last-seen times then cannot move a decision."""
    fast = DeviceChangeDetector(Metrics(), max_imsis=2, window=1e7, log_events=False)
    full = DeviceChangeDetector(Metrics(), max_imsis=2, window=1e7, log_events=False)
    when = DAY
    for gap, imei, imsi in sightings:
        when += gap
        full.fresh.clear()
        assert fast.observe(when, imei, imsi) == full.observe(when, imei, imsi)
    assert fast.metrics.device_signals == full.metrics.device_signals


def _reference_signals(sightings: list[tuple[float, str, str | None]], max_imsis: int,
                       window: float) -> list[list[str]]:
    """The two signals as plain, unbounded dicts: IMEI body -> {IMSI: last seen} (with when it
    was last flagged), IMSI -> (IMEI body, last seen)."""
    imsis: dict[str, dict[str, float]] = {}
    flagged: dict[str, float] = {}
    last: dict[str, tuple[str, float]] = {}
    out: list[list[str]] = []
    when = DAY
    for gap, imei, imsi in sightings:
        when += gap
        signals: list[str] = []
        if imsi:
            body = imei[:14]
            seen = imsis.setdefault(body, {})
            seen[imsi] = when
            if len(seen) > max_imsis:
                seen = imsis[body] = {s: t for s, t in seen.items() if t >= when - window}
                if len(seen) > max_imsis and when - flagged.get(body, -1e18) >= window:
                    flagged[body] = when
                    signals.append("imei_multi_imsi")
            prev = last.get(imsi)
            last[imsi] = (body, when)
            if prev is not None and prev[0] != body and when - prev[1] <= window:
                signals.append("imsi_imei_change")
        out.append(signals)
    return out


# Windows around the gaps, so that sightings fall both inside and outside them.
@given(_sightings, st.sampled_from([0.4, 20.0, 60.0, 1e7]), st.integers(1, 3))
@settings(max_examples=400, deadline=None)
def test_detector_signals_what_the_plain_rules_say(
        sightings: list[tuple[float, str, str | None]], window: float, max_imsis: int) -> None:
    """Every sighting checked in full (fresh pairs forgotten before each), the detector's
    signals are those of the rules written as plain dicts."""
    det = DeviceChangeDetector(Metrics(), max_imsis=max_imsis, window=window, log_events=False)
    got = []
    when = DAY
    for gap, imei, imsi in sightings:
        when += gap
        det.fresh.clear()
        got.append(det.observe(when, imei, imsi))
    assert got == _reference_signals(sightings, max_imsis, window)


@given(_sightings)
@settings(max_examples=100, deadline=None)
async def test_recorder_skips_only_what_the_detector_would(
        sightings: list[tuple[float, str, str | None]]) -> None:
    """AuditRecorder.record drops fresh pairs before queuing them: the signals are the ones
    the detector gives when it sees every sighting."""
    m = Metrics()
    rec = AuditRecorder(m, None, detector=DeviceChangeDetector(m, max_imsis=2, window=1e7,
                                                                log_events=False))
    full = DeviceChangeDetector(Metrics(), max_imsis=2, window=1e7, log_events=False)
    when = DAY
    for gap, imei, imsi in sightings:
        when += gap
        rec.record(when, CheckRequest(imei=imei, imsi=imsi), WHITE, "mme")
        await rec.flush()  # as the drain task would between reads
        full.observe(when, imei, imsi)
    assert m.device_signals == full.metrics.device_signals


@given(_sightings)
@settings(max_examples=100, deadline=None)
async def test_record_now_skips_only_what_the_detector_would(
        sightings: list[tuple[float, str, str | None]]) -> None:
    """record_now (the service's hot path) trusts `fresh` without reading the clock; the flush
    task ends the period. With that task's step between sightings, the signals are the ones
    the detector gives when it sees every sighting."""
    m = Metrics()
    now = [DAY]
    rec = AuditRecorder(m, None, detector=DeviceChangeDetector(m, max_imsis=2, window=1e7,
                                                                log_events=False),
                        clock=lambda: now[0])
    det = rec.detector
    assert det is not None
    full = DeviceChangeDetector(Metrics(), max_imsis=2, window=1e7, log_events=False)
    for gap, imei, imsi in sightings:
        now[0] += gap
        det.expire(now[0])  # what _run does before each flush
        rec.record_now(CheckRequest(imei=imei, imsi=imsi), WHITE, "mme", "s13")
        await rec.flush()
        full.observe(now[0], imei, imsi)
    assert m.device_signals == full.metrics.device_signals


async def test_the_flush_task_ends_a_fresh_period() -> None:
    """Without a flush task stepping in, a pair written once would be skipped forever by
    record_now; the task empties `fresh` when REFRESH has passed."""
    m = Metrics()
    now = [DAY]
    rec = AuditRecorder(m, None, detector=DeviceChangeDetector(m, log_events=False),
                        clock=lambda: now[0], flush_interval=0.01)
    det = rec.detector
    assert det is not None
    rec.record_now(req(1, imsi="001"), WHITE, "mme", "s13")
    await rec.flush()
    assert det.fresh.get(hash("001")) == req(1).imei[:14] and len(det.fresh) == 1
    rec.start()
    await asyncio.sleep(0.05)
    assert len(det.fresh) == 1  # still within the period
    now[0] += REFRESH
    await asyncio.sleep(0.05)
    assert len(det.fresh) == 0 and det.fresh.get(hash("001")) is None
    await rec.close()


def test_detector_memory_is_bounded() -> None:
    det = DeviceChangeDetector(Metrics(), max_tracked=100, log_events=False)
    for i in range(1000):
        det.observe(i, f"35{i:012d}", f"00101{i:010d}")
    imeis, imsis = det.tracked()
    assert 50 <= imeis <= 100 and 50 <= imsis <= 100
    # The most recent half is always kept; the oldest are forgotten.
    assert all(det.tracks(f"35{i:012d}") for i in range(950, 1000))
    assert not det.tracks(f"35{0:012d}") and det.last_seen(f"00101{0:010d}") is None
    assert det.last_seen(f"00101{999:010d}") == (f"35{999:012d}", 999)


def test_serve_bounds_the_detector_by_its_option() -> None:
    """`--device-signal-max-devices` reaches the detector a worker builds, fresh pairs
    included (they can never outnumber the pairs tracked)."""
    from eir_server.config import ServeConfig
    from eir_server.io.app import _audit_recorder

    rec = _audit_recorder(ServeConfig(device_signal_max_devices=100), Metrics())
    assert rec is not None and rec.detector is not None
    det = rec.detector
    for i in range(1000):  # within one REFRESH period, so no fresh pair leaves by time
        det.observe(i / 1000, f"35{i:012d}", f"00101{i:010d}")
    imeis, imsis = det.tracked()
    assert 50 <= imeis <= 100 and 50 <= imsis <= 100 and len(det.fresh) <= 100
    with pytest.raises(ValueError, match="device_signal_max_devices"):
        ServeConfig(device_signal_max_devices=0)


def test_a_device_seen_again_is_not_forgotten() -> None:
    """Bounded by generations: a pair seen again while other devices churn through stays
    tracked (a change of its IMEI is still signalled), however many others came and went."""
    det = DeviceChangeDetector(Metrics(), max_tracked=100, window=1e9, log_events=False)
    det.observe(0, "35999999999999", "001019999999999")
    for i in range(1000):
        det.observe(1 + i, f"35{i:012d}", f"00101{i:010d}")
        if i % 40 == 0:  # seen again, past REFRESH: written again
            det.observe(1 + i, "35999999999999", "001019999999999")
    assert det.observe(2000, "35888888888888", "001019999999999") == ["imsi_imei_change"]


async def test_jsonl_dir_sink_writes_daily_files(tmp_path: Path) -> None:
    sink = JsonlDirSink(str(tmp_path), keep_days=100_000)
    rec = AuditRecorder(Metrics(), sink)
    rec.record(DAY + 10, req(1, imsi="001"), WHITE, "mme1")
    rec.record(DAY + 86400 + 10, req(2, imsi="002"), BLACK, "mme2")
    await rec.flush()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit-20240501.jsonl", "audit-20240502.jsonl"]
    row = json.loads((tmp_path / "audit-20240502.jsonl").read_text())
    assert row["imsi"] == "002" and row["verdict"] == "blacklisted"


def test_make_sink_picks_by_store_url(tmp_path: Path) -> None:
    assert isinstance(make_sink("redis://127.0.0.1:1/0"), RedisStreamSink)
    assert isinstance(make_sink("memory://", audit_dir=str(tmp_path)), JsonlDirSink)
    assert isinstance(make_sink("memory://"), MemorySink)

"""Pure parts of `eir-server load`: IMEI sources, histogram, request templates, answer checks."""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eir_server.diameter.answers import Identity as ServerIdentity
from eir_server.diameter.codec import FLAG_E, FLAG_P, decode, message, str_avp, u32_avp, validate
from eir_server.diameter.dictionary import load_dictionary
from eir_server.load import hist
from eir_server.load.imeis import (
    NOT_CHECKED,
    ImeiEntry,
    load_source,
    mix,
    parse_expected,
    parse_line,
    parse_range,
)
from eir_server.load.s13 import AnswerChecker, EcrTemplates, Identity, entry_block
from eir_server.policy.imei import NormalizedImei, luhn_check_digit, normalize_imei
from eir_server.policy.types import EquipmentStatus
from eir_server.s13.app import EcaBuilder

D = load_dictionary()
ME = Identity("mme0.load.test", "load.test", "localdomain", "eir.localdomain")
digits = st.text("0123456789", min_size=14, max_size=16)


@given(digits, st.sampled_from(["", "whitelisted", "blacklisted", "greylisted", "unknown", "0",
                                 "1", "2", "5004"]),
       st.one_of(st.none(), st.text("0123456789", min_size=2, max_size=2)),
       st.one_of(st.none(), st.text("0123456789", min_size=5, max_size=15)))
def test_line_round_trip(imei, expected, sv, imsi):
    fields = [imei, expected, sv or "", imsi or ""]
    e = parse_line(",".join(fields))
    assert e == ImeiEntry(imei, parse_expected(expected), sv, imsi)
    assert (e.expected == NOT_CHECKED) == (expected == "")


@given(st.text(max_size=40))
def test_bad_lines_raise_value_error_only(line):
    try:
        e = parse_line(line)
    except ValueError:
        return
    assert e is None or (e.imei.isdigit() and 14 <= len(e.imei) <= 16)


@pytest.mark.parametrize("line", ["3520990017614", "35209900176148x", "35209900176148,purple",
                                  "35209900176148,0,7", "35209900176148,0,01,12", "1,2,3,4,5"])
def test_bad_lines(line):
    with pytest.raises(ValueError):
        parse_line(line)


@given(st.integers(10**13, 10**14 - 1000), st.integers(1, 300))
@settings(max_examples=30)
def test_range_has_valid_luhn_digits(start, count):
    entries = parse_range(f"range:{start:014d}:{count}")
    assert len(entries) == count
    for k, e in enumerate(entries):
        assert e.imei[:14] == f"{start + k:014d}" and len(e.imei) == 15
        assert e.imei[14] == luhn_check_digit(e.imei[:14])
        if not e.imei.startswith("00"):
            assert isinstance(normalize_imei(e.imei), NormalizedImei)


@pytest.mark.parametrize("spec", ["range:1:5", "range:35209900000000:0", "range:x:1",
                                  "range:99999999999999:5", "range:35209900000000:99999999"])
def test_bad_ranges(spec):
    with pytest.raises(ValueError):
        parse_range(spec)


@given(st.integers(1, 500), st.integers(1, 50), st.floats(0.0, 1.0))
def test_mix_share(nbase, nlisted, share):
    base = [ImeiEntry(f"{i:014d}") for i in range(nbase)]
    listed = [ImeiEntry(f"{10**13 + i:014d}", 1) for i in range(nlisted)]
    n = 1000
    out = mix(base, listed, share, n)
    if share == 0:
        assert out == base
        return
    assert len(out) == n
    got = sum(e.expected == 1 for e in out)
    assert abs(got - share * n) <= 1


@given(st.lists(st.integers(0, 10**9), min_size=1, max_size=400),
       st.sampled_from([0, 1, 50, 90, 99, 99.9, 100]))
def test_histogram_percentile_within_bucket_precision(values, p):
    h = hist.Histogram()
    for v in values:
        h.record(v)
    s = sorted(values)
    rank = max(1, -(-len(s) * p // 100))
    exact = s[int(rank) - 1]
    got = h.percentile(p)
    assert exact <= got <= max(exact * (1 + 1 / 128), exact + 0)  # top of the exact's bucket
    assert h.max == s[-1]
    again = hist.Histogram.from_pairs(h.to_pairs(), h.max)
    assert again.percentile(p) == got


@given(st.integers(0, hist.MAX_VALUE))
def test_histogram_index_bounds(v):
    i = hist.index(v)
    lo, hi = hist.bounds(i)
    assert lo <= v <= hi and 0 <= i < hist.SIZE
    assert hi - lo <= max(lo // 128, 0)


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.sampled_from(range(3)))
@settings(max_examples=50)
def test_request_is_a_valid_ecr(hbh, e2e, which):
    entries = [ImeiEntry("35209900176148"), ImeiEntry("352099001761481", sv="07",
                                                        imsi="001019999999999"),
               ImeiEntry("3520990017614807")]
    t = EcrTemplates(ME, 3, [entry_block(e) for e in entries])
    data = t.request(which, hbh, e2e)
    m = decode(data, D)
    validate(m, D.compiled.request(16777252, 324))
    assert not m.problems
    assert (m.hop_by_hop, m.end_to_end) == (hbh, e2e)
    assert m.value(m.find(263)) == f"mme0.load.test;3;{hbh:010d}".encode()
    assert m.avps[0][0] == 263  # Session-Id first
    assert m.text(m.find(293)) == "eir.localdomain"
    assert data[20:20 + t.sid_total] == t.sid(hbh)


def _eca(request: bytes, status: EquipmentStatus) -> bytes:
    me = ServerIdentity("eir.localdomain", "localdomain", 1)
    b = EcaBuilder(me, D)
    msg = decode(request, D)
    validate(msg, D.compiled.request(16777252, 324))
    parsed = b.parse(msg)
    assert not isinstance(parsed, bytes)
    _, prefix, suffix, _ = parsed
    return b.answer(msg, prefix, suffix, status)


def test_checker_reads_our_servers_answers():
    t = EcrTemplates(ME, 0, [entry_block(ImeiEntry("35209900176148"))])
    req = t.request(0, 5, 6)
    c = AnswerChecker(D)
    for status in EquipmentStatus:
        value, rc, exp, problem = c.body(_eca(req, status), t.sid_total)
        assert (value, rc, exp, problem) == (int(status), 2001, -1, "")


def test_checker_error_answers():
    c = AnswerChecker(D)
    busy = message(FLAG_E | FLAG_P, 324, 16777252, 1, 1, [
        str_avp(263, "x"), u32_avp(268, 3004), str_avp(264, "eir"), str_avp(296, "r")])
    assert c.classify(busy)[:3] == (3004, 3004, -1)
    missing_status = message(FLAG_P, 324, 16777252, 1, 1, [
        str_avp(263, "x"), u32_avp(277, 1), u32_avp(268, 2001), str_avp(264, "eir"),
        str_avp(296, "r")])
    assert c.classify(missing_status)[0] == -2
    e_bit_success = message(FLAG_E | FLAG_P, 324, 16777252, 1, 1, [
        str_avp(263, "x"), u32_avp(268, 2001), str_avp(264, "eir"), str_avp(296, "r")])
    assert c.classify(e_bit_success)[0] == -2


@given(st.binary(max_size=64), st.integers(20, 200))
@settings(max_examples=200)
def test_checker_never_raises_on_garbage(junk, cut):
    t = EcrTemplates(ME, 0, [entry_block(ImeiEntry("35209900176148"))])
    good = _eca(t.request(0, 5, 6), EquipmentStatus.WHITELISTED)
    body = (good[:cut] + junk)[: len(good) + len(junk)]
    body += b"\0" * (-len(body) % 4)
    msg = struct.pack("!I", 1 << 24 | len(body)) + body[4:]
    value, _rc, _exp, problem = AnswerChecker(D).classify(msg)
    assert value in (-2, 0, 1, 2) or value >= 1000
    assert (value == -2) == bool(problem)


@given(st.floats(1, 1e5), st.floats(1, 1e5), st.floats(0.5, 100), st.integers(0, 10**6))
def test_open_loop_schedule_inverts(r0, r1, span, i):
    from eir_server.load.client import Generator, LoadConfig
    g = Generator.__new__(Generator)
    g.cfg = LoadConfig("h", 1, ME, [], rate=(r0, r1), duration=span, warmup=0)
    total = g.due(span)
    assert abs(total - (r0 + r1) / 2 * span) <= 1e-6 * total + 1e-6  # the ramp's area
    if i <= total:
        t = g.sched_time(i)
        assert 0 <= t <= span * (1 + 1e-9)
        assert abs(g.due(t) - i) <= 1e-6 * max(i, 1) + 1e-6


def test_imei_file_names_the_line_of_a_bad_expected_status(tmp_path):
    f = tmp_path / "imeis.csv"
    f.write_text("# imei,expected\n35209900176148,blacklisted\n\n49015420323751,purple\n")
    with pytest.raises(ValueError) as e:
        load_source(str(f))
    assert str(e.value).startswith(f"{f}:4: expected status 'purple'"), str(e.value)


class _StampedConn:
    """What the open loop hands a connection: the scheduled time of each request it sends."""

    is_up = True

    def __init__(self, g) -> None:
        self.g = g
        self.batches: list[list[float]] = []

    def send(self, times: list[float]) -> None:
        self.batches.append(times)
        self.g.stats.sent += len(times)


@pytest.mark.parametrize("rate", [(10.0, 10.0), (10.0, 30.0)])
async def test_open_loop_stamps_each_request_with_its_own_due_time(rate):
    """Request k (from 0) becomes due when the schedule has k + 1 requests due: that moment is
    its stamp, the start of its latency. Stamped one request early, every latency would include
    one inter-arrival interval (1/rate) the server never saw."""
    from eir_server.load.client import Generator, LoadConfig
    g = Generator(LoadConfig("h", 1, ME, [ImeiEntry("35209900176148")], rate=rate,
                             duration=10, warmup=0), D)
    conn = _StampedConn(g)
    g.conns = [conn]
    g.running = True
    g.t0 = time.perf_counter() - 1.05  # over a second into the run: 10 or more requests due
    g.tick()
    sent_by = time.perf_counter()
    g.running = False  # the tick it scheduled does nothing
    assert len(conn.batches) == 1
    stamps = conn.batches[0]
    assert g.stats.sent == len(stamps)
    assert int(g.due(1.0)) <= len(stamps) <= int(g.due(sent_by - g.t0))
    for k, s in enumerate(stamps):  # the first one 1/rate into the run, not at its start
        assert g.due(s - g.t0) == pytest.approx(k + 1, rel=1e-9, abs=1e-6), (k, stamps)
    assert stamps[-1] <= sent_by  # none stamped after it was sent

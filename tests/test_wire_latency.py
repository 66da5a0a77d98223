"""benchmarks/wire_latency.py pairs requests and answers from a capture file: requests split over
segments or several to a segment, a retransmitted segment, answers in another order, and the
stall/gap figures that say whose tail it is."""

from __future__ import annotations

import struct
from pathlib import Path

from benchmarks.wire_latency import analyse

SERVER, CLIENT = 3868, 40000


def diameter(hbh: int, request: bool, size: int = 40, result: int = 0) -> bytes:
    flags = 0x80 if request else 0
    body = (268).to_bytes(4, "big") + b"\x40\x00\x00\x0c" + result.to_bytes(4, "big")
    body = (body if result else b"") + bytes(size - 20 - (len(body) if result else 0))
    return (bytes([1]) + size.to_bytes(3, "big") + bytes([flags]) + (324).to_bytes(3, "big")
            + (16777252).to_bytes(4, "big") + hbh.to_bytes(4, "big") + hbh.to_bytes(4, "big")
            + body)


def frame(sport: int, dport: int, seq: int, payload: bytes, syn: bool = False) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02 if syn else 0x18,
                      65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0, 64, 6, 0,
                     b"\x7f\0\0\1", b"\x7f\0\0\1")
    return b"\0" * 12 + b"\x08\x00" + ip + tcp + payload


def pcap(path: Path, packets: list[tuple[float, bytes]]) -> None:
    out = bytearray(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    for ts, f in packets:
        sec = int(ts)
        out += struct.pack("<IIII", sec, round((ts - sec) * 1e6), len(f), len(f)) + f
    path.write_bytes(bytes(out))


def test_pairs_requests_and_answers(tmp_path: Path) -> None:
    r1, r2, r3 = diameter(1, True), diameter(2, True), diameter(3, True)
    c_seq, s_seq = 1000, 5000
    pkts = [
        (10.0, frame(CLIENT, SERVER, c_seq - 1, b"", syn=True)),
        (10.0, frame(SERVER, CLIENT, s_seq - 1, b"", syn=True)),
        (10.100, frame(CLIENT, SERVER, c_seq, r1 + r2)),  # two requests in one segment
        (10.101, frame(CLIENT, SERVER, c_seq + 80, r3[:25])),  # r3 split over two segments
        (10.101, frame(CLIENT, SERVER, c_seq, r1 + r2)),  # a retransmission: ignored
        (10.102, frame(CLIENT, SERVER, c_seq + 105, r3[25:])),
        (10.1025, frame(SERVER, CLIENT, s_seq, diameter(2, False, result=3004))),  # reordered
        (10.1100, frame(SERVER, CLIENT, s_seq + 40, diameter(1, False, result=2001)
                        + diameter(3, False, result=2001))),
    ]
    f = tmp_path / "c.pcap"
    pcap(f, pkts)
    r = analyse(f, SERVER)
    assert (r.requests, r.answers, r.unmatched_answers, r.gaps) == (3, 3, 0, 0)
    assert [round(x) for x in r.latencies_us] == [2500, 10000, 8000]
    # Requests waiting and nothing answered: 10.100 -> 10.1025, then 10.1025 -> 10.1100.
    assert [round(x, 1) for x in r.server_stalls_ms] == [2.5, 7.5]
    assert r.server_stall_at == [10.100, 10.1025]
    assert {c: len(v) for c, v in r.by_result.items()} == {3004: 1, 2001: 2}
    assert round(r.result_percentile((2001,), 99)) == 10000
    s = r.summary()
    assert round(s["max_ms"], 3) == 10.0 and round(s["p50_ms"], 3) == 8.0


def test_capture_gap_is_reported_not_misframed(tmp_path: Path) -> None:
    pkts = [
        (1.0, frame(CLIENT, SERVER, 99, b"", syn=True)),
        (1.1, frame(CLIENT, SERVER, 100 + 40, diameter(2, True))),  # bytes 100..139 missing
    ]
    f = tmp_path / "g.pcap"
    pcap(f, pkts)
    r = analyse(f, SERVER)
    assert (r.gaps, r.requests) == (1, 0)

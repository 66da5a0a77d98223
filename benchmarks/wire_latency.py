"""Server latency from packet timestamps: the time between the kernel seeing the last byte of a
Diameter request on the loopback interface and the last byte of its answer, request and answer
paired by connection and hop-by-hop id.

A load generator written in Python runs milliseconds behind its own schedule now and then, and
it reads its answers late when it does; the latency it reports then has its own lag in it. The
kernel's capture timestamps do not: what is left is the server (and the loopback), so a tail
measured this way is the server's tail. A lagging generator still sends in bursts, which only
makes the measured tail worse, never better.

    python benchmarks/wire_latency.py CAPTURE.pcap SERVER_PORT

reads a classic pcap file (`dumpcap -P`; Ethernet, Linux cooked v1/v2, or raw IP link types).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_ETH, _RAW, _SLL, _SLL2 = 1, 101, 113, 276
_REQUEST = 0x80
SENDER_GAP = 0.002  # `eir-server load` sends every 1 ms in open loop: twice that is a stall
SERVER_STALL = 0.001  # requests waiting and no answer leaving for this long


@dataclass
class _Stream:
    """One direction of one TCP connection, reassembled by sequence number."""

    next_seq: int | None = None
    buf: bytearray = field(default_factory=bytearray)
    broken: bool = False  # a capture gap: the rest of this direction cannot be framed


@dataclass
class WireLatency:
    latencies_us: list[float] = field(default_factory=list)
    requests: int = 0
    answers: int = 0
    unmatched_answers: int = 0
    gaps: int = 0  # directions with bytes missing from the capture
    retransmitted: int = 0  # segments with bytes sent before (latency counts from the first)
    first_ts: float | None = None
    last_ts: float = 0.0
    per_second: dict[int, list[float]] = field(default_factory=dict)
    # Whose tail is it? A server stall: requests waiting and no answer leaving for a while. A
    # generator stall: no request arriving for a while (then a burst, answered in turn).
    server_stalls_ms: list[float] = field(default_factory=list)
    # When each began (capture time: the wall clock, so `perf record -k CLOCK_REALTIME` samples
    # of the server's CPU can be matched with them).
    server_stall_at: list[float] = field(default_factory=list)
    sender_gaps_ms: list[float] = field(default_factory=list)
    by_result: dict[int, list[float]] = field(default_factory=dict)  # Result-Code -> latencies

    def result_percentile(self, codes: tuple[int, ...], p: float) -> float:
        xs = sorted(x for c in codes for x in self.by_result.get(c, ()))
        if not xs:
            return float("nan")
        return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))]

    def percentile(self, p: float) -> float:
        xs = sorted(self.latencies_us)
        if not xs:
            return float("nan")
        k = min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))
        return xs[k]

    def summary(self) -> dict[str, float | int]:
        xs = self.latencies_us
        stalls, gaps = self.server_stalls_ms, self.sender_gaps_ms
        return {"server_stalls_over_1ms": len(stalls),
                "server_stall_max_ms": round(max(stalls, default=0.0), 2),
                "sender_gaps_over_2ms": len(gaps),
                "sender_gap_max_ms": round(max(gaps, default=0.0), 2),
                "requests": self.requests, "answers": self.answers,
                "unmatched_answers": self.unmatched_answers, "gaps": self.gaps,
                "retransmitted_segments": self.retransmitted,
                "p50_ms": self.percentile(50) / 1000, "p99_ms": self.percentile(99) / 1000,
                "p99.9_ms": self.percentile(99.9) / 1000,
                "max_ms": (max(xs) if xs else float("nan")) / 1000}


def _packets(path: Path) -> Iterator[tuple[float, bytes]]:
    """(timestamp, IP packet bytes) for each captured frame."""
    data = path.read_bytes()
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        end = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        end = ">"
    else:
        raise ValueError(f"{path}: not a classic pcap file (write it with dumpcap -P)")
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = struct.unpack(end + "I", data[20:24])[0] & 0x0FFFFFFF
    rec = struct.Struct(end + "IIII")
    scale = 1e-9 if nano else 1e-6
    pos = 24
    n = len(data)
    while pos + 16 <= n:
        sec, frac, incl, _orig = rec.unpack_from(data, pos)
        pos += 16
        frame = data[pos:pos + incl]
        pos += incl
        if linktype == _ETH:
            ip = frame[14:] if frame[12:14] in (b"\x08\x00", b"\x86\xdd") else b""
        elif linktype == _SLL:
            ip = frame[16:]
        elif linktype == _SLL2:
            ip = frame[20:]
        elif linktype == _RAW:
            ip = frame
        else:
            raise ValueError(f"link type {linktype} not handled")
        if ip:
            yield sec + frac * scale, ip


def _result_code(buf: bytearray, pos: int, length: int) -> int:
    """An answer's Result-Code (or the Experimental-Result-Code in Experimental-Result); 0 if
    it has neither."""
    i, end = pos + 20, pos + length
    while i + 8 <= end:
        code = int.from_bytes(buf[i:i + 4], "big")
        flags = buf[i + 4]
        alen = int.from_bytes(buf[i + 5:i + 8], "big")
        if alen < 8:
            return 0
        head = 12 if flags & 0x80 else 8
        if code == 268 and alen >= head + 4:
            return int.from_bytes(buf[i + head:i + head + 4], "big")
        if code == 297:  # grouped: Vendor-Id + Experimental-Result-Code
            j, gend = i + head, i + alen
            while j + 8 <= gend:
                c2, l2 = int.from_bytes(buf[j:j + 4], "big"), int.from_bytes(buf[j + 5:j + 8],
                                                                              "big")
                if l2 < 8:
                    break
                if c2 == 298:
                    return int.from_bytes(buf[j + 8:j + 12], "big")
                j += (l2 + 3) & ~3
        i += (alen + 3) & ~3
    return 0


def analyse(path: Path, server_port: int) -> WireLatency:
    res = WireLatency()
    streams: dict[tuple[bytes, int, bytes, int], _Stream] = {}
    sent: dict[tuple[bytes, int, int], float] = {}  # (client addr, client port, hbh) -> time
    last_request = last_answer = None
    for ts, ip in _packets(path):
        ver = ip[0] >> 4
        if ver == 4:
            ihl = (ip[0] & 15) * 4
            if ip[9] != 6:
                continue
            total = struct.unpack_from("!H", ip, 2)[0]
            src, dst, tcp = ip[12:16], ip[16:20], ip[ihl:total]
        elif ver == 6:
            if ip[6] != 6:
                continue
            plen = struct.unpack_from("!H", ip, 4)[0]
            src, dst, tcp = ip[8:24], ip[24:40], ip[40:40 + plen]
        else:
            continue
        sport, dport, seq = struct.unpack_from("!HHI", tcp, 0)
        off = (tcp[12] >> 4) * 4
        flags = tcp[13]
        payload = tcp[off:]
        key = (src, sport, dst, dport)
        st = streams.get(key)
        if st is None:
            st = streams[key] = _Stream()
        if flags & 0x02:  # SYN takes one sequence number
            st.next_seq = (seq + 1) & 0xFFFFFFFF
            continue
        if not payload or st.broken:
            continue
        if st.next_seq is None:  # capture started mid-connection: cannot frame it
            st.broken = True
            res.gaps += 1
            continue
        d = (seq - st.next_seq) & 0xFFFFFFFF
        if d >= 0x80000000:  # (partly) a retransmission of bytes we have
            skip = (st.next_seq - seq) & 0xFFFFFFFF
            payload = payload[skip:]
            res.retransmitted += 1
            if not payload:
                continue
        elif d:
            st.broken = True
            res.gaps += 1
            continue
        st.next_seq = (st.next_seq + len(payload)) & 0xFFFFFFFF
        st.buf += payload
        buf = st.buf
        to_server = dport == server_port
        pos = 0
        while len(buf) - pos >= 20:
            length = int.from_bytes(buf[pos + 1:pos + 4], "big")
            if length < 20:
                st.broken = True
                res.gaps += 1
                break
            if len(buf) - pos < length:
                break
            flags_byte = buf[pos + 4]
            hbh = int.from_bytes(buf[pos + 12:pos + 16], "big")
            if to_server and flags_byte & _REQUEST:
                res.requests += 1
                if buf[pos + 8:pos + 12] != b"\0\0\0\0":  # not CER/DWR/DPR (sent when idle)
                    if last_request is not None and ts - last_request > SENDER_GAP:
                        res.sender_gaps_ms.append((ts - last_request) * 1000)
                    last_request = ts
                if not sent:
                    last_answer = ts  # idle until now: a stall is measured from here
                sent[(src, sport, hbh)] = ts
            elif not to_server and not flags_byte & _REQUEST:
                if sent and last_answer is not None and ts - last_answer > SERVER_STALL:
                    res.server_stalls_ms.append((ts - last_answer) * 1000)
                    res.server_stall_at.append(last_answer)
                last_answer = ts
                t0 = sent.pop((dst, dport, hbh), None)
                if t0 is None:
                    res.unmatched_answers += 1
                else:
                    res.answers += 1
                    lat = (ts - t0) * 1e6
                    res.latencies_us.append(lat)
                    res.by_result.setdefault(_result_code(buf, pos, length), []).append(lat)
                    if res.first_ts is None:
                        res.first_ts = ts
                    res.last_ts = ts
                    res.per_second.setdefault(int(ts - res.first_ts), []).append(lat)
            pos += length
        if pos:
            del buf[:pos]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pcap", type=Path)
    ap.add_argument("port", type=int, help="the server's TCP port")
    ap.add_argument("--worst", type=int, default=10, help="list the worst N seconds")
    a = ap.parse_args(argv)
    r = analyse(a.pcap, a.port)
    out = r.summary()
    worst = sorted(r.per_second.items(), key=lambda kv: -max(kv[1]))[:a.worst]
    out["by_result_code"] = {  # type: ignore[assignment]
        str(c): {"answers": len(v), "p99_ms": r.result_percentile((c,), 99) / 1000}
        for c, v in sorted(r.by_result.items())}
    out["worst_seconds"] = [(s, round(max(v) / 1000, 2), len(v)) for s, v in worst]  # type: ignore[assignment]
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""CPU cost of the N5g-eir request path without sockets: HTTP/2 frames in (as nghttp2-based
AMFs and h2load send them: indexed fields, a Huffman-coded :path literal without indexing) ->
HttpConnection.data_received -> H2Connection -> N5gEirService (app, checker, counters, audit
with the device-signal detector) -> answer frames out to a transport that only counts bytes.
Runs on the event loop the worker uses (uvloop), so the audit task drains as it does there.

    .venv/bin/python benchmarks/bench_n5g_path.py [--batch 32] [--n 200000] [--profile]

For counts that do not depend on the machine's load, run it under
`valgrind --tool=callgrind --callgrind-out-file=/dev/null` with --n 20000 and --n 40000 and
take the difference over 20,000: the instructions per request. Add `--refresh 1e9` there: the
device-signal detector re-checks every pair once per period (60 s), and under valgrind a run
takes minutes, so the count would depend on how many periods it spans.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpack.huffman import HuffmanEncoder  # noqa: E402
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH  # noqa: E402

from eir_server.checker import EquipmentChecker  # noqa: E402
from eir_server.io.http_server import HttpConnection, Listener, N5gEirService  # noqa: E402
from eir_server.n5g_eir.app import N5gEirApp  # noqa: E402
from eir_server.n5g_eir.h2conn import (  # noqa: E402
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PREFACE,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
)
from eir_server.obs import audit as audit_module  # noqa: E402
from eir_server.obs.audit import AuditRecorder, DeviceChangeDetector  # noqa: E402
from eir_server.obs.metrics import Metrics  # noqa: E402
from eir_server.policy import Policy, PolicyConfig  # noqa: E402
from eir_server.policy.imei import luhn_check_digit  # noqa: E402
from eir_server.policy.types import BlacklistEntry, ImeiRecord  # noqa: E402
from eir_server.service import CheckService  # noqa: E402
from eir_server.store import MemoryStore  # noqa: E402

PATH = "/n5g-eir-eic/v1/equipment-status"
_huffman = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)


def _string(value: bytes, huffman: bool = False) -> bytes:
    if huffman:
        value = _huffman.encode(value)
    assert len(value) < 127
    return bytes(((0x80 if huffman else 0) | len(value),)) + value


def block(i: int, first: bool) -> bytes:
    """What nghttp2 sends for request i: :method GET and :scheme http indexed, :authority and
    user-agent indexed into the dynamic table on the first request, :path never indexed."""
    imei = f"{35209900000000 + i:014d}"
    path = f"{PATH}?pei=imei-{imei}{luhn_check_digit(imei)}&supi=imsi-00101{imei[4:]}"
    out = b"\x82\x86"  # :method GET, :scheme http
    out += b"\x41" + _string(b"127.0.0.1:8080", True) if first else b"\xbf"  # :authority
    out += b"\x04" + _string(path.encode(), True)  # :path, literal without indexing
    # user-agent, indexed into the dynamic table the first time (static name 58)
    return out + (b"\x7a" + _string(b"h2load nghttp2/1.52.0", True) if first else b"\xbe")


class CountingTransport:
    def __init__(self) -> None:
        self.written = 0
        self.acked = 0  # octets the "client" gave back with WINDOW_UPDATE

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def setup(imeis: int) -> tuple[N5gEirService, AuditRecorder]:
    store = MemoryStore()
    for i in range(0, imeis, 3):  # every third IMEI asked is blacklisted
        store.put(f"{35209900000000 + i:014d}",
                  ImeiRecord(blacklist=BlacklistEntry("20200101", ("stolen",))))
    metrics = Metrics()
    checker = EquipmentChecker(Policy(PolicyConfig()), store, today=lambda: "20260101")
    audit = AuditRecorder(metrics, None, detector=DeviceChangeDetector(metrics))
    audit.start()
    service = CheckService(checker, metrics, audit.record_now)
    return N5gEirService(N5gEirApp(), service, metrics), audit


def connect(service: N5gEirService) -> HttpConnection:
    conn = HttpConnection(Listener(service))
    conn.connection_made(CountingTransport())  # type: ignore[arg-type]
    # as h2load: a large stream window, and the connection window opened as answers arrive
    conn.data_received(PREFACE + frame(SETTINGS, 0, 0, struct.pack(">HL", 4, 0x3FFFFFFF)))
    return conn


async def run(batch: int, n: int, imeis: int, profile: bool) -> float:
    service, audit = setup(imeis)
    # Stream ids only rise on a connection: the batches cover `imeis` requests once, and a new
    # connection (same worker state) takes over when they are used up.
    batches = []
    sid = 1
    for b in range(max(1, imeis // batch)):
        frames = []
        for k in range(batch):
            frames.append(frame(HEADERS, END_HEADERS | END_STREAM, sid,
                                block(b * batch + k, sid == 1)))
            sid += 2
        batches.append(b"".join(frames))
    rounds = max(1, n // batch)
    prof = cProfile.Profile() if profile else None
    conn = connect(service)
    t0 = time.process_time()
    if prof:
        prof.enable()
    k = 0
    for _ in range(rounds):
        if k == len(batches):
            conn.connection_lost(None)
            conn = connect(service)
            k = 0
        t = conn.transport
        opened = t.written - t.acked  # type: ignore[union-attr]
        t.acked = t.written  # type: ignore[union-attr]
        conn.data_received(frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", opened)) + batches[k]
                           if opened else batches[k])
        k += 1
        await asyncio.sleep(0)  # the audit task's turn, as between reads in the worker
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    per = (time.process_time() - t0) / (rounds * batch) * 1e6
    await audit.close()
    return per


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32, help="requests per read")
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--imeis", type=int, default=10_000, help="distinct IMEIs (and streams "
                    "per connection before a new one)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--refresh", type=float, default=audit_module.REFRESH,
                    help="the device-signal detector's period, seconds")
    args = ap.parse_args()
    audit_module.REFRESH = args.refresh
    try:
        import uvloop
        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    per = runner(run(args.batch, args.n, args.imeis, args.profile))
    print(f"N5g-eir request in -> answer out (batch {args.batch}): {per:6.2f} µs/request")
    return 0


if __name__ == "__main__":
    sys.exit(main())

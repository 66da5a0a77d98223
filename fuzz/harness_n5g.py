"""One fuzz input through everything an N5g-eir consumer's bytes reach before the verdict: the
HPACK decoder, an HTTP/2 server connection (after a valid preface and SETTINGS, the input fed
in chunks whose sizes it picks) and the request router. An exception, or an invariant broken,
is a finding:

- the HPACK decoder raises nothing but HpackError;
- the connection raises nothing; every byte it sends is a whole frame of a known type, and
  after a connection error (`closed`) it returns no more requests;
- every request it returns has the pseudo-header fields, and the router answers it (a
  finished response or a check) without raising; the answer goes back through `respond`.

Shared by the coverage-guided target (`fuzz/fuzz_n5g.py`, `make fuzz`) and the hypothesis
version in the suite (`tests/n5g_eir/test_fuzz_h2.py`).
"""

from __future__ import annotations

from eir_server.n5g_eir.app import N5gEirApp, Response
from eir_server.n5g_eir.h2conn import PREFACE, SETTINGS, H2Connection, encode_head, frame
from eir_server.n5g_eir.hpack import Decoder, HpackError

APP = N5gEirApp()
VERDICT = encode_head(200, [("content-type", "application/json")], 24)
OPENING = PREFACE + frame(SETTINGS, 0, 0)


def check_frames(out: bytes) -> int:
    """Frames in `out` (whole, of the types a server sends); returns how many."""
    i = n = 0
    while i < len(out):
        assert len(out) - i >= 9, "a partial frame header"
        length = int.from_bytes(out[i:i + 3], "big")
        assert out[i + 3] in (0, 1, 3, 4, 6, 7, 8, 9), f"frame type {out[i + 3]}"
        i += 9 + length
        n += 1
    assert i == len(out), "a partial frame"
    return n


def run_one(data: bytes) -> None:
    # 1. The HPACK decoder alone, on the raw input.
    try:
        Decoder().decode(data)
    except HpackError:
        pass
    # 2. A connection past its preface, fed the input in chunks.
    conn = H2Connection(max_concurrent_streams=16)
    conn.receive(OPENING)
    step = (data[0] % 97 + 1) if data else 1
    for i in range(0, len(data) + step, step):
        requests = conn.receive(data[i:i + step])
        if conn.closed:
            assert not requests
        for sid, method, path, query, headers in requests:
            assert method and path is not None
            answer = APP.handle(method, path, query, headers.get, 0.0)
            if type(answer) is Response:
                conn.respond(sid, encode_head(answer.status, answer.headers,
                                              len(answer.body)), answer.body)
            else:
                conn.respond(sid, VERDICT, b'{"status":"WHITELISTED"}')
        check_frames(bytes(conn.out))
        conn.out.clear()
        conn.errors.clear()

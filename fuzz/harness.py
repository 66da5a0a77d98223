"""One fuzz input through every parser a peer's bytes reach, with the invariants that must hold.

Shared by the coverage-guided target (`fuzz/fuzz_s13.py`, atheris, `make fuzz`) and the
hypothesis version in the suite (`tests/diameter/test_fuzz.py`). An invariant broken, or any
exception, is a finding:

- the framer splits the stream into messages whose Message-Length matches their size;
- the general decoder never raises; validation against the command grammar never raises;
- the fast path (header routing, `decode_fast`, cached layouts) accepts only what the general
  decoder accepts, with the same AVPs;
- a connection that completed CER, fed the bytes in arbitrary chunks, never raises, and every
  byte it sends is a whole answer (R bit clear, length consistent);
- the S13 parse of an accepted ECR never raises and its ECA is well framed.
"""

from __future__ import annotations

import struct

from eir_server.diameter.answers import Identity, session_and_proxies
from eir_server.diameter.codec import (
    FLAG_R,
    Framer,
    LayoutCache,
    address_payload,
    avp,
    decode,
    decode_fast,
    grouped_avp,
    message,
    str_avp,
    u32_avp,
    validate,
)
from eir_server.diameter.connection import AppRequest, Connection, PeerConfig, PeerState
from eir_server.diameter.dictionary import load_dictionary
from eir_server.diameter.doic import SUPPORTED, olr
from eir_server.diameter.shed import BusyAnswer
from eir_server.policy.types import EquipmentStatus
from eir_server.s13.app import EcaBuilder

DICTIONARY = load_dictionary()
_ECR = DICTIONARY.compiled.request(16777252, 324)
assert _ECR is not None
FAST_ECR = _ECR.fast
IDENTITY = Identity("eir.fuzz.test", "fuzz.test", 1)
CONFIG = PeerConfig(identity=IDENTITY, max_message_length=65_535)
ECA = EcaBuilder(IDENTITY, DICTIONARY)
LAYOUTS = LayoutCache()
BUSY = BusyAnswer(IDENTITY)
DOIC = SUPPORTED + olr(7, 50, 10)
_HEAD = struct.Struct("!II")


def _cer() -> bytes:
    return message(FLAG_R, 257, 0, 1, 1, [
        str_avp(264, "mme.fuzz.test"), str_avp(296, "fuzz.test"),
        avp(257, address_payload("192.0.2.1")), u32_avp(266, 0),
        str_avp(269, "fuzz", mandatory=False),
        grouped_avp(260, [u32_avp(266, 10415), u32_avp(258, 16777252)])])


CER = _cer()


def check_frames(out: bytes) -> int:
    """Every byte sent is a whole answer: returns how many."""
    pos = n = 0
    while pos < len(out):
        assert len(out) - pos >= 20, "truncated answer header"
        vl, fc = _HEAD.unpack_from(out, pos)
        length = vl & 0xFFFFFF
        assert vl >> 24 == 1 and length >= 20 and length % 4 == 0, f"bad answer length {length}"
        assert pos + length <= len(out), "answer overruns what was sent"
        code = fc & 0xFFFFFF
        # Answers only, except the DWR/DPR we originate (base application, R bit).
        assert not (fc >> 24) & FLAG_R or code in (280, 282), "a request among the answers"
        pos += length
        n += 1
    return n


def check_busy(raw: bytes, msg: object) -> None:
    """The shed path's 3004 (built without decoding) is whole, and for a request the decoder
    walks without trouble it echoes the same Session-Id and Proxy-Infos as a full answer."""
    for extra in (b"", DOIC):
        ans = BUSY.answer(raw, extra)
        assert check_frames(ans) == 1 and len(ans) % 4 == 0
        assert ans[4] & 0xA0 == 0x20 and ans[12:20] == raw[12:20]
        if not msg.problems and msg.flags & FLAG_R:  # type: ignore[attr-defined]
            session, proxies = session_and_proxies(msg)  # type: ignore[arg-type]
            if session.startswith(b"\0\0\1\x07") and raw[20:24] == b"\0\0\1\x07":
                assert ans[20:20 + len(session)] == session
            assert ans.endswith(proxies)


def check_message(raw: bytes) -> None:
    msg = decode(raw, DICTIONARY)
    check_busy(raw, msg)
    compiled = DICTIONARY.compiled
    if not msg.problems:
        tables = (compiled.request if msg.flags & FLAG_R else compiled.answer)(
            msg.application_id, msg.code)
        if tables is not None:
            validate(msg, tables)
    if (msg.application_id, msg.code) != (16777252, 324) or len(raw) % 4 or \
            raw[4] & 0xAF != 0x80 or raw[0] != 1:  # the header gate of Connection._fast_request
        return
    general_ok = not msg.problems
    slots: list = [None] * FAST_ECR.nslots
    fast = decode_fast(raw, FAST_ECR, 20, len(raw), slots)
    if fast is not None:
        assert general_ok, f"fast path accepted what the decoder refuses: {msg.problems[0]}"
        assert list(fast) == list(msg.avps) and slots == msg.slots
        LAYOUTS.learn(raw, len(raw), fast, slots)
    lay = LAYOUTS.find(raw, len(raw))
    if lay is not None:
        assert general_ok, f"a cached layout matched a bad message: {msg.problems[0]}"
        assert list(lay.avps) == list(msg.avps)
    if general_ok:
        parsed = ECA.parse(msg)
        if isinstance(parsed, bytes):
            assert check_frames(parsed) == 1
        else:
            for status in (None, *EquipmentStatus):
                assert check_frames(ECA.answer(msg, parsed[1], parsed[2], status)) == 1
            assert check_frames(ECA.failure(msg, 3004, "busy")) == 1


def run_one(data: bytes) -> None:
    """Feed `data` (an arbitrary byte string) through framing, decoding and a live peer."""
    # 1. Framing, then every framed message through both decoders and the S13 parse.
    framer = Framer(65_535)
    total = 0
    for raw in framer.feed(data):
        length = int.from_bytes(raw[1:4], "big")
        assert length == len(raw) and length >= 20
        total += length
        check_message(raw)
    assert total + framer.buffered <= len(data)
    # 2. The same bytes on an open connection, in chunks whose sizes the input picks.
    conn = Connection(CONFIG, DICTIONARY, 0.0, "192.0.2.1")
    conn.receive_data(CER, 0.0)
    assert conn.state is PeerState.R_OPEN
    conn.events()
    assert check_frames(conn.data_to_send()) == 1
    step = (data[0] % 61 + 1) if data else 1
    now = 0.0
    for i in range(0, len(data) + step, step):
        now += 0.001
        conn.receive_data(data[i:i + step], now)
        while conn.pending:  # more than one turn's worth: the shell calls again
            conn.receive_data(b"", now)
        for ev in conn.events():
            if type(ev) is AppRequest:
                msg = ev.message
                if msg.code != 324:
                    conn.send(ECA.failure(msg, 3001, "not supported"))
                    continue
                parsed = ECA.parse(msg)
                if isinstance(parsed, bytes):
                    conn.send(parsed)
                else:
                    conn.send(ECA.answer(msg, parsed[1], parsed[2],
                                         EquipmentStatus.WHITELISTED))
        check_frames(conn.data_to_send())
    deadline = conn.next_deadline()
    if deadline is not None:
        conn.handle_timer(deadline)
        conn.events()
        check_frames(conn.data_to_send())

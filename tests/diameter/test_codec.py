"""Codec: round trips for every data format, framing under any chunking, problems as data,
and random or mutated bytes never raising."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eir_server.diameter import errors
from eir_server.diameter.codec import (
    AVP_M,
    CHILDREN,
    CODE,
    FLAG_E,
    FLAG_P,
    FLAG_R,
    Framer,
    avp,
    decode,
    decode_value,
    encode_avp,
    grouped_avp,
    message,
    str_avp,
    u32_avp,
    validate,
)
from eir_server.diameter.dictionary import load_dictionary
from tests.diameter.builders import ecr, ecr_avps, terminal_information

D = load_dictionary()
ECR_GRAMMAR = D.compiled.request(16777252, 324)
KNOWN_CODES = set(errors.NAMES)

# One value strategy per RFC 6733 data format.
VALUES = {
    "Unsigned32": st.integers(0, 2**32 - 1),
    "Integer32": st.integers(-(2**31), 2**31 - 1),
    "Unsigned64": st.integers(0, 2**64 - 1),
    "Integer64": st.integers(-(2**63), 2**63 - 1),
    "Float64": st.floats(allow_nan=False),
    "Time": st.integers(0, 2**32 - 1),
    "Enumerated": st.integers(-(2**31), 2**31 - 1),
    "UTF8String": st.text(max_size=50),
    "DiameterIdentity": st.from_regex(r"[a-z0-9.-]{1,40}", fullmatch=True),
    "DiameterURI": st.from_regex(r"aaa://[a-z0-9.]{1,20}:3868", fullmatch=True),
    "OctetString": st.binary(max_size=50),
    "Address": st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str)),
}
SIMPLE_AVPS = [a for a in D.avps.values() if a.type in VALUES]



@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SIMPLE_AVPS).flatmap(lambda a: st.tuples(st.just(a), VALUES[a.type])))
def test_every_avp_type_round_trips(pair: tuple) -> None:
    d, value = pair
    wire = encode_avp(d, value)
    assert len(wire) % 4 == 0
    msg = decode(message(FLAG_R, 280, 0, 1, 1, [wire]), D)
    assert msg.problems == [] or d.type == "Enumerated"
    (a,) = msg.avps
    back = decode_value(d, msg.value(a))
    if d.type == "Address":
        import ipaddress
        assert ipaddress.ip_address(back) == ipaddress.ip_address(value)
    else:
        assert back == value


@settings(max_examples=200)
@given(st.lists(st.binary(min_size=0, max_size=40), max_size=5),
       st.lists(st.integers(1, 60), min_size=1, max_size=20))
def test_framing_is_independent_of_chunking(bodies: list[bytes], cuts: list[int]) -> None:
    msgs = [message(FLAG_R, 280, 0, i, i, [avp(1, b)]) for i, b in enumerate(bodies)]
    stream = b"".join(msgs)
    framer = Framer()
    out: list[bytes] = []
    pos = 0
    i = 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        out.extend(framer.feed(stream[pos:pos + step]))
        pos += step
        i += 1
    assert out == msgs
    assert framer.buffered == 0


@pytest.mark.parametrize("head", [
    struct.pack("!I", (1 << 24) | 12),  # shorter than a header
    struct.pack("!I", (1 << 24) | 70_000),  # above the maximum
])
def test_unframeable_streams_stop_framing_but_keep_earlier_messages(head: bytes) -> None:
    good = message(FLAG_R, 280, 0, 1, 1, [avp(1, b"x")])
    framer = Framer(65_535)
    assert framer.feed(good + head + b"\0" * 16) == [good]
    assert framer.error is not None
    assert framer.feed(good) == []  # nothing is framed after the break


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=300))
def test_random_bytes_never_raise_past_the_framer(body: bytes) -> None:
    """Any frame with a valid header decodes to a message with problems, never an exception."""
    length = 20 + len(body)
    data = struct.pack("!IIIII", (1 << 24) | length, (FLAG_R << 24) | 324, 16777252, 1, 1) + body
    msg = decode(data, D)
    validate(msg, ECR_GRAMMAR)  # type: ignore[arg-type]
    for p in msg.problems:
        assert p.result_code in KNOWN_CODES


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_ecr_gives_a_defined_outcome(data: st.DataObject) -> None:
    frame = bytearray(ecr(proxies=[grouped_avp(284, [str_avp(280, "dra"), avp(33, b"s")])]))
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(20, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    msg = decode(bytes(frame), D)
    validate(msg, ECR_GRAMMAR)  # type: ignore[arg-type]
    assert all(p.result_code in KNOWN_CODES for p in msg.problems)
    for p in msg.problems:
        if p.failed_avp is not None:
            # Failed-AVP payloads are themselves well-formed AVP encodings.
            inner = decode(message(0, 280, 0, 1, 1, [avp(279, p.failed_avp)]), D)
            assert inner.avps[0][CODE] == 279


def problems_of(frame: bytes) -> list[int]:
    msg = decode(frame, D)
    if not msg.problems:
        validate(msg, ECR_GRAMMAR)  # type: ignore[arg-type]
    return [p.result_code for p in msg.problems]


def s13(avps: list[bytes]) -> bytes:
    return message(FLAG_R | FLAG_P, 324, 16777252, 7, 7, avps)


def test_valid_ecr_has_no_problems() -> None:
    assert problems_of(ecr()) == []


def test_missing_avp_5005_carries_a_zeroed_example() -> None:
    avps = [a for a in ecr_avps() if not a.startswith(struct.pack("!I", 283))]
    msg = decode(s13(avps), D)
    validate(msg, ECR_GRAMMAR)  # type: ignore[arg-type]
    (p,) = msg.problems
    assert p.result_code == errors.MISSING_AVP
    assert p.failed_avp is not None and struct.unpack("!I", p.failed_avp[:4])[0] == 283


def test_nested_problem_is_wrapped_in_its_grouped_parent() -> None:
    # Proxy-Info without Proxy-State: Failed-AVP { Proxy-Info { Proxy-State } }
    msg = decode(s13(ecr_avps(proxies=[grouped_avp(284, [str_avp(280, "dra")])])), D)
    validate(msg, ECR_GRAMMAR)  # type: ignore[arg-type]
    (p,) = msg.problems
    assert p.result_code == errors.MISSING_AVP
    outer = decode(message(0, 280, 0, 1, 1, [p.failed_avp]), D)  # type: ignore[list-item]
    assert outer.avps[0][CODE] == 284
    assert [c[CODE] for c in outer.avps[0][CHILDREN]] == [33]


@pytest.mark.parametrize("mutate, code", [
    # 5009: two Destination-Realm
    (lambda: s13(ecr_avps(after=[str_avp(283, "x")])), errors.AVP_OCCURS_TOO_MANY_TIMES),
    # 5001: unknown AVP with the M bit
    (lambda: s13(ecr_avps(after=[avp(99999, b"x")])), errors.AVP_UNSUPPORTED),
    # unknown AVP without M bit is fine (*[AVP])
    (lambda: s13(ecr_avps(after=[avp(99999, b"x", mandatory=False)])), None),
    # 5008: an extra AVP inside Experimental-Result (no *[AVP] in its grammar) -- in a request
    (lambda: s13(ecr_avps(after=[grouped_avp(297, [u32_avp(266, 1), u32_avp(298, 1),
                                                   u32_avp(268, 1)])])), errors.AVP_NOT_ALLOWED),
    # 5008: Session-Id not first
    (lambda: s13(ecr_avps()[1:2] + ecr_avps()[:1] + ecr_avps()[2:]), errors.AVP_NOT_ALLOWED),
    # 3009: M bit on an AVP whose definition forbids it (Product-Name)
    (lambda: s13(ecr_avps(after=[str_avp(269, "x", mandatory=True)])), errors.INVALID_AVP_BITS),
    # 5004: Auth-Session-State value not in its enumeration
    (lambda: s13([u32_avp(277, 9) if a == u32_avp(277, 1) else a for a in ecr_avps()]),
     errors.INVALID_AVP_VALUE),
    # 5004: IMEI not UTF-8
    (lambda: s13(ecr_avps(terminal=grouped_avp(1401, [avp(1402, b"\xff\xfe", 10415)], 10415))),
     errors.INVALID_AVP_VALUE),
    # 5014: Auth-Session-State with a 3-byte value
    (lambda: s13([avp(277, b"\0\0\1") if a == u32_avp(277, 1) else a for a in ecr_avps()]),
     errors.INVALID_AVP_LENGTH),
    # 5005: no Terminal-Information
    (lambda: s13(ecr_avps(terminal=b"")), errors.MISSING_AVP),
])
def test_grammar_problems(mutate, code) -> None:  # noqa: ANN001
    found = problems_of(mutate())
    assert (found[0] if found else None) == code, found


def test_avp_length_overrunning_the_message_is_5014_with_padded_header() -> None:
    frame = bytearray(ecr())
    # Make the last AVP (Terminal-Information) claim more bytes than the message has.
    last = frame.rfind(struct.pack("!I", 1401))
    struct.pack_into("!I", frame, last + 4, (0xC0 << 24) | 500)
    msg = decode(bytes(frame), D)
    assert msg.problems[0].result_code == errors.INVALID_AVP_LENGTH
    failed = msg.problems[0].failed_avp
    assert failed is not None and struct.unpack("!I", failed[:4])[0] == 1401
    # Header re-written with a length matching the zero payload it carries
    assert struct.unpack("!I", failed[4:8])[0] & 0xFFFFFF == 12


def test_avp_length_below_header_is_5014() -> None:
    frame = bytearray(ecr())
    struct.pack_into("!I", frame, 20 + 4, (0x40 << 24) | 5)  # Session-Id length 5
    assert problems_of(bytes(frame))[0] == errors.INVALID_AVP_LENGTH


def test_avp_length_below_header_failed_avp_is_decodable() -> None:
    # RFC 6733 7.5: the Failed-AVP of a 5014 must itself be a well-formed AVP, else the peer
    # cannot decode the answer (Wireshark: malformed; Erlang/OTP diameter discards it).
    frame = bytearray(ecr())
    struct.pack_into("!I", frame, 20 + 4, (0x40 << 24) | 5)  # Session-Id length 5
    failed = decode(bytes(frame), D).problems[0].failed_avp
    assert failed is not None and struct.unpack("!I", failed[:4])[0] == 263
    assert struct.unpack("!I", failed[4:8])[0] & 0xFFFFFF == 8 == len(failed)


def test_message_length_not_multiple_of_four_is_5015() -> None:
    frame = ecr() + b"\0\0\0"
    frame = struct.pack("!I", (1 << 24) | len(frame)) + frame[4:]
    assert problems_of(frame)[0] == errors.INVALID_MESSAGE_LENGTH


def test_request_with_e_bit_is_3008() -> None:
    assert problems_of(ecr(flags=FLAG_R | FLAG_P | FLAG_E))[0] == errors.INVALID_HDR_BITS


def test_reserved_avp_bits_are_3009() -> None:
    frame = bytearray(ecr())
    frame[20 + 4] |= 0x01  # Session-Id flags byte: a reserved bit
    assert problems_of(bytes(frame))[0] == errors.INVALID_AVP_BITS


def test_terminal_information_children_are_decoded() -> None:
    msg = decode(ecr(terminal=terminal_information("490154203237518", "01")), D)
    ti = msg.find(1401, 10415)
    assert ti is not None
    assert [(c[CODE], msg.text(c)) for c in ti[CHILDREN]] == [(1402, "490154203237518"),
                                                              (1403, "01")]
    assert ti[2] & AVP_M


GROUP_LEAVES = [a for a in SIMPLE_AVPS if a.type in ("Unsigned32", "UTF8String", "OctetString")]


@st.composite
def grouped_trees(draw: st.DrawFn, depth: int = 0) -> tuple[bytes, list]:
    """A random tree of AVPs: leaves of known types and unknown grouped containers (code 1401
    is Terminal-Information, whose grammar allows any AVP)."""
    children = []
    expect: list = []
    for _ in range(draw(st.integers(0, 4))):
        if depth < 3 and draw(st.booleans()):
            wire, sub = draw(grouped_trees(depth + 1))
            children.append(grouped_avp(1401, [wire], 10415))
            expect.append(("Terminal-Information", sub))
        else:
            d = draw(st.sampled_from(GROUP_LEAVES))
            v = draw(VALUES[d.type])
            children.append(encode_avp(d, v))
            expect.append((d.name, v))
    return b"".join(children), expect


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(grouped_trees())
def test_grouped_avps_round_trip(tree: tuple[bytes, list]) -> None:
    from eir_server.diameter.codec import to_dict
    wire, expect = tree
    msg = decode(message(FLAG_R, 280, 0, 1, 1, [grouped_avp(1401, [wire], 10415)]), D)
    assert msg.problems == []

    def norm(items: list) -> list:
        return [(n, norm(v) if isinstance(v, list) else v) for n, v in items]
    assert norm(to_dict(msg)) == [("Terminal-Information", norm(expect))]


def test_tables_survive_dictionaries_being_freed_and_ids_reused() -> None:
    """Derived tables belong to their dictionary (no module-level caches keyed by id()): when
    dictionaries are loaded and freed (tests, reloads), a new one may get a freed one's id and
    must not inherit its tables. This failed (an ECA reported "missing Session-Id") while the
    tables lived in id()-keyed caches."""
    import gc

    from eir_server.diameter.dictionary import load_dictionary as load
    eca = message(FLAG_P, 324, 16777252, 1, 1, [
        str_avp(263, "s"), u32_avp(268, 2001), u32_avp(277, 1), str_avp(264, "h"),
        str_avp(296, "r"), u32_avp(1445, 0, 10415)])
    request = ecr()
    for i in range(120):
        d = load()
        tables = (d.compiled.answer if i % 2 else d.compiled.request)(16777252, 324)
        assert tables is not None
        msg = decode(eca if i % 2 else request, d)
        validate(msg, tables)
        assert msg.problems == [], (i, msg.problems)
        del d, tables, msg
        gc.collect()  # frees the dictionary now, so the next load may reuse its ids

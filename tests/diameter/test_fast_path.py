"""The fast path (decode_fast + cached layouts) must accept exactly what the general path
(decode + validate) accepts, with the same AVPs; it may only bail out more often on non-ASCII
text, which the general path then judges."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eir_server.diameter.codec import (
    LayoutCache,
    avp,
    decode,
    decode_fast,
    grouped_avp,
    str_avp,
    u32_avp,
    validate,
)
from eir_server.diameter.dictionary import load_dictionary
from tests.diameter.builders import ecr, proxy_info, terminal_information

D = load_dictionary()
CMD = D.command(16777252, 324)
assert CMD is not None and CMD.request is not None
TABLES = D.compiled.request(16777252, 324)
assert TABLES is not None
FG = TABLES.fast

BASES = [
    ecr(),
    ecr(imsi="001010123456789", sv="01"),
    ecr(proxies=[proxy_info("dra1", b"x"), proxy_info("dra2", b"yy")]),
    ecr(before=[u32_avp(301, 3, mandatory=False)],
        after=[grouped_avp(621, [avp(622, b"\0" * 7 + b"\1", mandatory=False)],
                           mandatory=False), avp(99999, b"opaque", mandatory=False)]),
    ecr(terminal=terminal_information("490154203237518", "99"), dest_host="eir.localdomain"),
    ecr(after=[str_avp(1, "x"), str_avp(1, "y")]),  # two User-Name: 5009
]


def _flatten(avps: list) -> list:
    out = []
    for a in avps:
        out.append(a)
        out.extend(_flatten(a[7] or []))
    return out


def general(frame: bytes):  # noqa: ANN201
    msg = decode(frame, D)
    if not msg.problems:
        validate(msg, TABLES)
    return msg


def check_agreement(frame: bytes, cache: LayoutCache) -> None:
    msg = general(frame)
    n = len(frame)
    length = int.from_bytes(frame[1:4], "big")
    if length != n or length % 4 or frame[4] & 0xAF != 0x80:
        return  # the connection never takes the fast path for these headers
    slots: list = [None] * FG.nslots
    fast = decode_fast(frame, FG, 20, n, slots)
    if fast is not None:
        assert msg.problems == [], msg.problems
        assert fast == msg.avps
        assert slots == msg.slots
        cache.learn(frame, n, fast, slots)
    elif not msg.problems:
        texts = [frame[a[3]:a[4]] for a in _flatten(msg.avps)
                 if a[8] is not None and a[8].type in ("UTF8String", "DiameterIdentity")]
        assert not all(t.isascii() for t in texts), "fast path bailed on a valid message"
    lay = cache.find(frame, n)
    if lay is not None:
        # A cached layout only matches what the general path accepts, with the same AVPs.
        assert msg.problems == [], msg.problems
        assert lay.avps == msg.avps


def test_bases_agree() -> None:
    cache = LayoutCache()
    for b in BASES:
        check_agreement(b, cache)
    assert decode_fast(BASES[0], FG, 20, len(BASES[0])) is not None
    assert decode_fast(BASES[-1], FG, 20, len(BASES[-1])) is None


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(BASES), st.lists(st.tuples(st.integers(20, 400), st.integers(0, 255)),
                                        min_size=1, max_size=4))
def test_mutations_agree(base: bytes, edits: list[tuple[int, int]]) -> None:
    cache = LayoutCache()
    for b in BASES:  # learn the valid shapes first, so mutants are tried against layouts too
        check_agreement(b, cache)
    frame = bytearray(base)
    for i, v in edits:
        if i < len(frame):
            frame[i] = v
    check_agreement(bytes(frame), cache)


def test_layout_cache_is_bounded_evicting_and_immutable() -> None:
    cache = LayoutCache(max_layouts=2)
    shapes = BASES[:3]
    for b in shapes:
        fresh: list = [None] * FG.nslots
        avps = decode_fast(b, FG, 20, len(b), fresh)
        assert avps is not None
        cache.learn(b, len(b), avps, fresh)
    assert (len(cache), cache.learned, cache.evicted) == (2, 3, 1)
    assert cache.find(shapes[0], len(shapes[0])) is None, "the oldest shape was evicted"
    lay = cache.find(shapes[2], len(shapes[2]))
    assert lay is not None
    # Every message of this shape shares these: they must not be mutable.
    assert isinstance(lay.avps, tuple) and isinstance(lay.slots, tuple)
    assert all(isinstance(a.children, tuple) for a in lay.avps if a.children is not None)


def test_layout_cache_metrics_come_from_the_compiled_dictionary() -> None:
    from eir_server.diameter.dictionary import emit_xml, loads_dictionary
    from eir_server.obs.metrics import Metrics

    d = loads_dictionary(emit_xml(D))
    table = d.compiled.fast_commands(frozenset({16777252}))
    cmd = table[(16777252 << 24) | 324]
    cmd.layouts.max_layouts = 1
    for b in BASES[:2]:
        cmd.layouts.learn(b, len(b), decode_fast(b, cmd.grammar, 20, len(b)) or (), [])
    m = Metrics()
    m.set_gauge_callback("layouts", d.compiled.layout_stats)
    values = m.snapshot().samples
    assert values["eir_diameter_layout_cache_entries"] == {(): 1.0}
    assert values["eir_diameter_layout_cache_evictions_total"] == {(): 1.0}

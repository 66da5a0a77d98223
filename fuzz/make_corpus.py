"""Write the seed corpora: Diameter frames as MMEs, SGSNs and relays send them (S13 ECRs in
every shape the README's behaviour table names, CER/DWR/DPR/DWA, and streams of several), and
HTTP/2 frames as AMFs send them (N5g-eir GETs as nghttp2 encodes them, CONTINUATION, bodies,
padding, control frames), one file each.

    .venv/bin/python fuzz/make_corpus.py        # rewrites fuzz/seeds/ and fuzz/seeds_n5g/
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eir_server.diameter.codec import (  # noqa: E402
    FLAG_P,
    FLAG_R,
    FLAG_T,
    avp,
    grouped_avp,
    message,
    str_avp,
    u32_avp,
)
from tests.diameter.builders import cer, ecr, proxy_info, terminal_information  # noqa: E402

OC = grouped_avp(621, [avp(622, b"\0" * 7 + b"\1", mandatory=False)], mandatory=False)
DRMP = u32_avp(301, 3, mandatory=False)


def seeds() -> dict[str, bytes]:
    out = {
        "cer": cer(),
        "cer_relay": cer(apps=[u32_avp(258, 0xFFFFFFFF)]),
        "cer_plain_auth": cer(apps=[u32_avp(258, 16777252)]),
        "cer_no_common": cer(apps=[u32_avp(258, 4)]),
        "dwr": message(FLAG_R, 280, 0, 7, 7, [str_avp(264, "mme1.epc.test"),
                                             str_avp(296, "epc.test"), u32_avp(278, 5)]),
        "dwa": message(0, 280, 0, 7, 7, [u32_avp(268, 2001), str_avp(264, "mme1.epc.test"),
                                        str_avp(296, "epc.test")]),
        "dpr": message(FLAG_R, 282, 0, 8, 8, [str_avp(264, "mme1.epc.test"),
                                             str_avp(296, "epc.test"), u32_avp(273, 0)]),
        "ecr": ecr(realm="fuzz.test"),
        "ecr_imsi_sv": ecr(realm="fuzz.test", imsi="001010123456789", sv="01"),
        "ecr_imeisv16": ecr(realm="fuzz.test", terminal=terminal_information("4901542032375101")),
        "ecr_proxies": ecr(realm="fuzz.test",
                           proxies=[proxy_info("dra1", b"x"), proxy_info("dra2", b"yy")]),
        "ecr_drmp_oc": ecr(realm="fuzz.test", before=[DRMP], after=[OC]),
        "ecr_unknown_avp": ecr(realm="fuzz.test",
                               after=[avp(99999, b"opaque", mandatory=False)]),
        "ecr_unknown_m_avp": ecr(realm="fuzz.test", after=[avp(99999, b"opaque")]),
        "ecr_dest_host": ecr(realm="fuzz.test", dest_host="eir.fuzz.test"),
        "ecr_wrong_host": ecr(realm="fuzz.test", dest_host="other.fuzz.test"),
        "ecr_wrong_realm": ecr(realm="other.test"),
        "ecr_no_imei": ecr(realm="fuzz.test", imei=None),
        "ecr_two_user_names": ecr(realm="fuzz.test", after=[str_avp(1, "x"), str_avp(1, "y")]),
        "ecr_t_flag": ecr(realm="fuzz.test", flags=FLAG_R | FLAG_P | FLAG_T),
        "ecr_e_bit": ecr(realm="fuzz.test", flags=FLAG_R | FLAG_P | 0x20),
        "ecr_wrong_app": ecr(realm="fuzz.test", app=4),
        "ecr_wrong_cmd": ecr(realm="fuzz.test", code=325),
        "ecr_utf8": ecr(realm="fuzz.test", session="mme1;\u00e9t\u00e9;1"),
    }
    out["stream_cer_ecr_dwr"] = out["cer"] + out["ecr"] + out["dwr"] + out["ecr_proxies"]
    out["stream_pipelined"] = b"".join(ecr(hbh=i, realm="fuzz.test") for i in range(1, 9))
    out["stream_then_dpr"] = out["ecr"] + out["dpr"] + out["ecr_imsi_sv"]
    return out


_N5G_PATH = "/n5g-eir-eic/v1/equipment-status?pei=imei-352099001761481"


def _h2(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((ftype, flags)) + sid.to_bytes(4, "big") \
        + payload


def _nghttp2_block(path: str, first: bool) -> bytes:
    """As nghttp2 encodes a GET: :authority and user-agent indexed into the dynamic table the
    first time, :path a Huffman literal never indexed."""
    from hpack.huffman import HuffmanEncoder
    from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

    huff = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)

    def string(v: str) -> bytes:
        b = huff.encode(v.encode())
        return bytes((0x80 | len(b),)) + b

    out = b"\x82\x86" + (b"\x41" + string("eir.5gc.test:8080") if first else b"\xbf")
    out += b"\x04" + string(path)
    return out + (b"\x7a" + string("nghttp2/1.52.0") if first else b"\xbe")


def n5g_seeds() -> dict[str, bytes]:
    """HTTP/2 frames after the preface and SETTINGS (the harness sends those)."""
    import hpack

    enc = hpack.Encoder()
    get = [(":method", "GET"), (":scheme", "http"), (":authority", "eir"), (":path", _N5G_PATH)]
    out = {
        "get": _h2(1, 0x5, 1, enc.encode(get)),
        "get_nghttp2": _h2(1, 0x5, 1, _nghttp2_block(_N5G_PATH, True))
        + _h2(1, 0x5, 3, _nghttp2_block(_N5G_PATH + "&supi=imsi-001010123456789", False)),
        "get_errors": b"".join(
            _h2(1, 0x5, 1 + 2 * i, hpack.Encoder().encode(h)) for i, h in enumerate([
                [*get[:3], (":path", "/n5g-eir-eic/v1/equipment-status?pei=imei-1")],
                [(":method", "POST"), *get[1:]],
                [*get, ("accept", "text/html")],
                [*get[:3], (":path", "/other")],
            ])),
    }
    block = hpack.Encoder().encode([*get, ("x-long", "v" * 200)])
    out["continuation"] = _h2(1, 0x1, 1, block[:50]) + _h2(9, 0x4, 1, block[50:])
    body = hpack.Encoder().encode([*get, ("content-length", "3")])
    out["body"] = _h2(1, 0x4, 1, body) + _h2(0, 0x1, 1, b"abc")
    out["padded_priority"] = _h2(1, 0x2D, 1, b"\x02" + b"\x00\x00\x00\x00\x10"
                                 + hpack.Encoder().encode(get) + b"\x00\x00")
    out["control"] = (_h2(6, 0, 0, b"12345678") + _h2(8, 0, 0, b"\x00\x01\x00\x00")
                      + _h2(4, 0, 0, b"\x00\x04\x00\x00\x00\x00\x00\x05\x00\x00\x80\x00")
                      + _h2(1, 0x5, 1, hpack.Encoder().encode(get))
                      + _h2(8, 0, 1, b"\x00\x00\x01\x00") + _h2(2, 0, 3, b"\x00\x00\x00\x01\x10")
                      + _h2(3, 0, 1, b"\x00\x00\x00\x08") + _h2(7, 0, 0, bytes(8)))
    return out


def main() -> int:
    for name, corpus in (("seeds", seeds()), ("seeds_n5g", n5g_seeds())):
        d = ROOT / "fuzz" / name
        d.mkdir(exist_ok=True)
        for old in d.glob("*.bin"):
            old.unlink()
        for key, data in corpus.items():
            (d / f"{key}.bin").write_bytes(data)
        print(f"{len(corpus)} seeds in {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

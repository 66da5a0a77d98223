"""Write the seed corpus: frames as MMEs, SGSNs and relays send them (S13 ECRs in every shape
the README's behaviour table names, CER/DWR/DPR/DWA, and streams of several), one file each.

    .venv/bin/python fuzz/make_corpus.py        # rewrites fuzz/seeds/
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


def main() -> int:
    d = ROOT / "fuzz" / "seeds"
    d.mkdir(exist_ok=True)
    for old in d.glob("*.bin"):
        old.unlink()
    for name, data in seeds().items():
        (d / f"{name}.bin").write_bytes(data)
    print(f"{len(seeds())} seeds in {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Requests as an MME would send them, built with the codec's encoders (test helper)."""

from __future__ import annotations

from eir_server.diameter.codec import (
    FLAG_P,
    FLAG_R,
    address_payload,
    avp,
    grouped_avp,
    message,
    str_avp,
    u32_avp,
)

VENDOR_3GPP = 10415
S13 = 16777252


def cer(hbh: int = 1, host: str = "mme1.epc.test", realm: str = "epc.test",
        apps: list[bytes] | None = None, extra: list[bytes] | None = None) -> bytes:
    if apps is None:
        apps = [grouped_avp(260, [u32_avp(266, VENDOR_3GPP), u32_avp(258, S13)])]
    return message(FLAG_R, 257, 0, hbh, hbh, [
        str_avp(264, host), str_avp(296, realm), avp(257, address_payload("192.0.2.1")),
        u32_avp(266, 10415), str_avp(269, "test-mme", mandatory=False), *apps, *(extra or []),
    ])


def terminal_information(imei: str | None = "49015420323751", sv: str | None = None) -> bytes:
    children = []
    if imei is not None:
        children.append(str_avp(1402, imei, VENDOR_3GPP))
    if sv is not None:
        children.append(str_avp(1403, sv, VENDOR_3GPP))
    return grouped_avp(1401, children, VENDOR_3GPP)


def ecr_avps(session: str = "mme1.epc.test;1;1", imei: str | None = "49015420323751",
             sv: str | None = None, imsi: str | None = None, realm: str = "localdomain",
             dest_host: str | None = None, proxies: list[bytes] | None = None,
             terminal: bytes | None = None, before: list[bytes] | None = None,
             after: list[bytes] | None = None) -> list[bytes]:
    avps = [str_avp(263, session), *(before or []), u32_avp(277, 1),
            str_avp(264, "mme1.epc.test"), str_avp(296, "epc.test")]
    if dest_host is not None:
        avps.append(str_avp(293, dest_host))
    avps.append(str_avp(283, realm))
    avps.append(terminal if terminal is not None else terminal_information(imei, sv))
    if imsi is not None:
        avps.append(str_avp(1, imsi))
    avps.extend(after or [])
    avps.extend(proxies or [])
    return avps


def ecr(hbh: int = 2, e2e: int | None = None, flags: int = FLAG_R | FLAG_P,
        app: int = S13, code: int = 324, **kw: object) -> bytes:
    return message(flags, code, app, hbh, hbh if e2e is None else e2e,
                   ecr_avps(**kw))  # type: ignore[arg-type]


def proxy_info(host: str, state: bytes) -> bytes:
    return grouped_avp(284, [str_avp(280, host), avp(33, state)])

"""CER/CEA over TCP: accepted peers, 5010, 3010 allow-lists, and messages before CER."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from eir_server.diameter.codec import grouped_avp, u32_avp

from .conftest import (
    AUTH_APP_ID,
    CER,
    HOST_IP,
    ORIGIN_HOST,
    ORIGIN_REALM,
    ORIGIN_STATE_ID,
    OUR_HOST,
    OUR_REALM,
    RESULT_CODE,
    S13,
    V3GPP,
    VENDOR_ID,
    VSAI,
    E,
    Peer,
    Server,
    cer,
    ecr,
    peer_config,
)


def _capabilities_ok(cea: Any) -> None:
    assert cea.code == CER and cea.app == 0
    assert cea.one(ORIGIN_HOST).text == OUR_HOST
    assert cea.one(ORIGIN_REALM).text == OUR_REALM
    assert cea.one(ORIGIN_STATE_ID).u32 == 1234
    assert cea.all(HOST_IP), "CEA needs Host-IP-Address"
    assert cea.one(VENDOR_ID) is not None


async def test_cer_accepted_and_cea_advertises_s13(server: Server) -> None:
    p = await Peer.connect(server.port)
    cea = await p.request(cer(hbh=0xABCDEF01, e2e=0x12345678))
    assert cea.result_code == 2001
    assert cea.flags == 0, "CEA: no R, P, E bits"
    assert (cea.hbh, cea.e2e) == (0xABCDEF01, 0x12345678)
    _capabilities_ok(cea)
    vsai = cea.one(VSAI).children
    assert {(a.code, a.u32) for a in vsai} == {(VENDOR_ID, V3GPP), (AUTH_APP_ID, S13)}
    # The peer is open: an ECR is answered.
    eca = await p.request(ecr())
    assert eca.code == 324 and eca.experimental_result == (V3GPP, 5422)
    p.close()


async def test_cer_with_relay_application_is_accepted(server: Server) -> None:
    p = await Peer.connect(server.port)
    cea = await p.request(cer(apps=[u32_avp(AUTH_APP_ID, 0xFFFFFFFF)]))
    assert cea.result_code == 2001
    p.close()


async def test_cer_without_common_application_gets_5010_and_close(server: Server) -> None:
    p = await Peer.connect(server.port)
    s6a = grouped_avp(VSAI, [u32_avp(VENDOR_ID, V3GPP), u32_avp(AUTH_APP_ID, 16777251)])
    cea = await p.request(cer(apps=[s6a]))
    assert cea.result_code == 5010
    assert not cea.flags & E, "5010 is not a protocol error: no E bit"
    _capabilities_ok(cea)
    assert await p.expect_closed() == b""


async def test_cer_from_host_outside_allow_list_gets_3010(servers: Callable[..., Any]) -> None:
    srv: Server = await servers(config=peer_config(allowed_hosts=("mme*.test.example",)))
    good = await Peer.connect(srv.port)
    assert (await good.request(cer("MME7.test.example"))).result_code == 2001  # case-insensitive
    bad = await Peer.connect(srv.port)
    cea = await bad.request(cer("hss.other.example"))
    assert cea.result_code == 3010
    assert cea.flags & E, "3010 is a protocol error: E bit"
    assert await bad.expect_closed() == b""
    # The allowed peer is unaffected.
    assert (await good.request(ecr())).experimental_result == (V3GPP, 5422)
    good.close()


async def test_cer_from_network_outside_allow_list_gets_3010(servers: Callable[..., Any]) -> None:
    srv: Server = await servers(config=peer_config(allowed_networks=("10.0.0.0/8",)))
    p = await Peer.connect(srv.port)
    cea = await p.request(cer())
    assert cea.result_code == 3010 and cea.flags & E
    assert await p.expect_closed() == b""
    srv2: Server = await servers(config=peer_config(allowed_networks=("127.0.0.0/8", "::1/128")))
    p2 = await Peer.connect(srv2.port)
    assert (await p2.request(cer())).result_code == 2001
    p2.close()


async def test_cer_missing_origin_realm_gets_5005(server: Server) -> None:
    p = await Peer.connect(server.port)
    raw = cer()
    # Drop the Origin-Realm AVP (second AVP) from a valid CER.
    from .conftest import Msg, build
    m = Msg.parse(raw)
    cea = await p.request(build(m.flags, CER, 0, [a.raw for a in m.avps
                                                    if a.code != ORIGIN_REALM]))
    assert cea.result_code == 5005
    assert [a.code for a in cea.failed_avp] == [ORIGIN_REALM]
    assert await p.expect_closed() == b""


async def test_message_before_cer_gets_3010_and_close(server: Server) -> None:
    p = await Peer.connect(server.port)
    eca = await p.request(ecr(n=77, proxies=[]))
    assert eca.code == 324 and eca.app == S13
    assert eca.result_code == 3010
    assert eca.flags & E
    assert (eca.hbh, eca.e2e) == (77, 77)
    assert eca.avps[0].code == 263, "Session-Id first"
    assert await p.expect_closed() == b""


async def test_second_cer_on_open_connection_is_answered(server: Server) -> None:
    p = await server.peer()
    cea = await p.request(cer(hbh=9, e2e=9))
    assert cea.result_code == 2001 and cea.hbh == 9
    assert (await p.request(ecr())).get(RESULT_CODE) is None
    p.close()


async def test_dwr_before_cer_gets_3010_and_close(server: Server) -> None:
    from .conftest import dwr
    p = await Peer.connect(server.port)
    ans = await p.request(dwr(hbh=3, e2e=4))
    assert (ans.code, ans.app, ans.hbh, ans.e2e) == (280, 0, 3, 4)
    assert ans.result_code == 3010 and ans.flags == E
    assert await p.expect_closed() == b""

"""S13 and N5g-eir give the same verdict for the same identity and register state: one worker's
two interfaces, one store (embedded, and Redis filled by `sync`), every case asked both ways."""

from __future__ import annotations

import asyncio
import json

import pytest

from eir_server.policy import PolicyConfig
from eir_server.policy.imei import luhn_check_digit
from eir_server.store import open_store
from tests.diameter_io.conftest import (
    IMEI_BLACK,
    IMEI_GREY,
    IMEI_UNKNOWN,
    IMEI_WHITE,
    IMSI_PAIRED,
    Peer,
    default_records,
    ecr,
    terminal_information,
)
from tests.n5g_eir.conftest import PATH, H2Client
from tests.store.test_contract import publish

NAMES = {0: "WHITELISTED", 1: "BLACKLISTED", 2: "GREYLISTED"}
OTHER_IMSI = "001019999999999"
# (IMEI body, SVN or None, IMSI or None): listed, paired, unlisted, notified, bad check digit.
CASES = [
    (imei, svn, imsi)
    for imei in (IMEI_BLACK, IMEI_GREY, IMEI_WHITE, IMEI_UNKNOWN, "00000000123456")
    for svn in (None, "07")
    for imsi in (None, IMSI_PAIRED, OTHER_IMSI)
]


def n17_query(imei: str, svn: str | None, imsi: str | None) -> str:
    pei = f"imeisv-{imei}{svn}" if svn else f"imei-{imei}{luhn_check_digit(imei)}"
    q = f"pei={pei}"
    if imsi:
        q += f"&supi=imsi-{imsi}&gpsi=msisdn-4915100000000"
    return q


async def s13_status(peer: Peer, n: int, imei: str, svn: str | None, imsi: str | None) -> str:
    full = imei + luhn_check_digit(imei)
    eca = await peer.request(ecr(full, n, imsi=imsi, terminal=terminal_information(full, svn)))
    if eca.experimental_result is not None:
        assert eca.experimental_result[1] == 5422
        return "UNKNOWN"
    assert eca.result_code == 2001, eca.summary()
    return NAMES[eca.equipment_status]


async def compare(eir) -> None:
    peer = await eir_peer(eir)
    client = H2Client(eir.http_port)
    try:
        answers = await asyncio.to_thread(
            client.get_many, [f"{PATH}?{n17_query(*c)}" for c in CASES])
        seen = set()
        for n, (case, (status, body)) in enumerate(zip(CASES, answers, strict=True), 1):
            s13 = await s13_status(peer, n, *case)
            n17 = "UNKNOWN" if status == 404 else json.loads(body)["status"]
            assert status in (200, 404), (case, status, body)
            assert s13 == n17, case
            seen.add(s13)
        # The cases cover every outcome, so agreement is not agreement on one answer.
        assert seen == {"WHITELISTED", "BLACKLISTED", "GREYLISTED", "UNKNOWN"}
    finally:
        client.close()
        peer.close()


async def eir_peer(eir) -> Peer:
    p = await Peer.connect(eir.diameter_port)
    await p.open()
    return p


POLICY = PolicyConfig(unknown_equipment=None)  # unlisted -> "unknown" (5422 / 404)


async def test_same_verdicts_embedded_store(eirs) -> None:
    await compare(await eirs(policy=POLICY))


@pytest.mark.parametrize("warm", [False, True])
async def test_same_verdicts_redis_store(eirs, redis_url, dirbs, sync_dir, warm: bool) -> None:
    url = redis_url + "?namespace=n17agree" + ("w" if warm else "c")
    assert sync_dir(url, publish(dirbs, default_records())).mode == "full"
    eir = await eirs(store=open_store(url), policy=POLICY)
    if warm:  # second pass answers from the worker's local cache
        await compare(eir)
    await compare(eir)

"""eir-server against Erlang/OTP's diameter application acting as the MME.

OTP does the capabilities exchange, encodes the ECRs, decodes our ECAs with its own codec (from
an S13 dictionary written from TS 29.272, tests/interop/erlang/s13.dia), runs its RFC 3539
watchdog and sends DPR when its service stops. Every answer must come back decoded without
errors, with the values the register says.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    BLACKLISTED,
    EIR_HOST,
    EIR_REALM,
    GREYLISTED,
    IMEI_BLACK,
    IMEI_GREY,
    IMEI_UNKNOWN,
    IMEI_WHITE,
    MME_HOST,
    WHITELISTED,
    EirServer,
    Erlang,
    MmeRun,
    run_mme,
)

S13 = 16777252
V3GPP = 10415
SUCCESS = 2001
EQUIPMENT_UNKNOWN = 5422  # DIAMETER_ERROR_EQUIPMENT_UNKNOWN, TS 29.272 7.4.3
NO_STATE_MAINTAINED = 1
IMSI = "001010123456789"


@dataclass(frozen=True)
class Check:
    label: str
    imei: str
    sv: str  # "" = no Software-Version AVP
    imsi: str | None
    status: int

    @property
    def step(self) -> str:
        return ":".join(["ecr", self.label, self.imei, self.sv] + ([self.imsi] if self.imsi else []))


CHECKS = [
    Check("white", IMEI_WHITE, "01", None, WHITELISTED),
    Check("white_with_imsi", IMEI_WHITE, "01", IMSI, WHITELISTED),
    Check("black", IMEI_BLACK, "01", IMSI, BLACKLISTED),
    Check("black_15_digits", IMEI_BLACK + "1", "", None, BLACKLISTED),  # with its check digit
    Check("grey", IMEI_GREY, "07", IMSI, GREYLISTED),
]


# ---------------------------------------------------------------------------------------------
# helpers: what OTP decoded (decode_format map: optional AVPs are lists of 0 or 1 values)


def avps_of(answer: dict[str, Any], run: MmeRun) -> dict[str, Any]:
    assert answer.get("name") == "ECA", f"diameter:call/4 did not return an ECA{run.context()}"
    assert answer["errors"] == [], f"OTP's decoder reported errors in our ECA{run.context()}"
    msg = answer["msg"]
    assert msg["name"] == "ECA"
    avps: dict[str, Any] = msg["avps"]
    # AVPs OTP could not place in the TS 29.272 grammar land in 'AVP'; there must be none.
    assert avps.get("AVP", []) == [], f"AVPs outside the ECA grammar: {avps['AVP']}"
    assert avps.get("Failed-AVP", []) == []
    return avps


def assert_common_eca(answer: dict[str, Any], run: MmeRun) -> dict[str, Any]:
    avps = avps_of(answer, run)
    assert avps["Session-Id"] == answer["session_id_sent"]
    assert avps["Origin-Host"] == EIR_HOST
    assert avps["Origin-Realm"] == EIR_REALM
    assert avps["Auth-Session-State"] == NO_STATE_MAINTAINED
    assert avps.get("Vendor-Specific-Application-Id") in (
        None, [], [{"Vendor-Id": V3GPP, "Auth-Application-Id": [S13]}])
    return avps


def assert_no_otp_errors(counters: dict[str, int], run: MmeRun) -> None:
    bad = {k: v for k, v in counters.items() if "error" in k}
    assert not bad, f"OTP counted messages with errors: {bad}{run.context()}"


def assert_clean_disconnect(run: MmeRun, server: EirServer) -> None:
    """OTP's DPR answered by a DPA OTP accepted; our server saw the DPR from this peer."""
    stopped = run.one("stopped")
    # diameter_peer_fsm ends with {shutdown, 'DPA'} only after a DPA matching its DPR's
    # hop-by-hop and end-to-end ids; a missing DPA ends it with dpa_timeout.
    assert stopped["peer_exit"] == "{shutdown,'DPA'}", run.context()
    dprs = server.wait_event("peer_sent_dpr")
    assert [(e["origin_host"], e["cause"]) for e in dprs] == [(MME_HOST, "REBOOTING")]
    assert not server.events("error_answer"), server.log_text()
    assert not server.events("connection_aborted"), server.log_text()


def assert_capabilities(run: MmeRun) -> None:
    up = run.one("up")
    assert up["cea_errors"] == [], f"OTP's decoder reported errors in our CEA{run.context()}"
    cea = up["cea"]
    assert cea["name"] == "CEA"
    avps = cea["avps"]
    assert avps["Result-Code"] == SUCCESS
    assert avps["Origin-Host"] == EIR_HOST
    assert avps["Origin-Realm"] == EIR_REALM
    assert avps.get("AVP", []) == [], f"AVPs outside the CEA grammar: {avps['AVP']}"
    assert {"Vendor-Id": [V3GPP], "Auth-Application-Id": [S13]} in avps[
        "Vendor-Specific-Application-Id"]
    assert up["remote_origin_host"] == EIR_HOST


# ---------------------------------------------------------------------------------------------
# One OTP MME run against a server with the register: CER/CEA, the ECRs above, DPR/DPA.


@dataclass
class MainRun:
    server: EirServer
    run: MmeRun


@pytest.fixture(scope="module")
def main_run(erlang: Erlang, register_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[MainRun]:
    server = EirServer(tmp_path_factory.mktemp("eir"), "--register", str(register_dir),
                       metrics=True)
    try:
        run = run_mme(erlang, server, *(c.step for c in CHECKS))
        yield MainRun(server, run)
    finally:
        server.stop()


def test_otp_completes_capabilities_exchange(main_run: MainRun) -> None:
    assert_capabilities(main_run.run)
    opened = main_run.server.events("peer_opened")
    assert [(e["origin_host"], e["applications"]) for e in opened] == [(MME_HOST, [S13])]


@pytest.mark.parametrize("check", CHECKS, ids=[c.label for c in CHECKS])
def test_otp_decodes_eca(main_run: MainRun, check: Check) -> None:
    run = main_run.run
    avps = assert_common_eca(run.answer(check.label), run)
    assert avps["Result-Code"] == [SUCCESS]
    assert avps.get("Experimental-Result", []) == []
    assert avps["Equipment-Status"] == [check.status]


def test_otp_counts_no_errors(main_run: MainRun) -> None:
    run = main_run.run
    counters = run.one("stats")["counters"]
    assert_no_otp_errors(counters, run)
    assert counters.get("ecr_sent") == len(CHECKS)
    assert counters.get("eca_received_rc_2001") == len(CHECKS)


def test_otp_disconnects_cleanly(main_run: MainRun) -> None:
    assert_clean_disconnect(main_run.run, main_run.server)
    server = main_run.server
    dpr = server.wait_metric('eir_diameter_dpr_total{cause="REBOOTING",direction="received"}')
    assert dpr == 1.0, server.metrics_text()
    cer = server.wait_metric('eir_diameter_cer_total{outcome="success"}')
    assert cer == 1.0, server.metrics_text()


# ---------------------------------------------------------------------------------------------
# --unknown-equipment unknown: Experimental-Result 5422, no Result-Code, no Equipment-Status.


def test_otp_decodes_equipment_unknown(erlang: Erlang, register_dir: Path,
                                       eir_servers: Callable[..., EirServer]) -> None:
    server = eir_servers("--register", str(register_dir), "--unknown-equipment", "unknown")
    run = run_mme(erlang, server, f"ecr:unknown:{IMEI_UNKNOWN}:01:{IMSI}",
                  f"ecr:black:{IMEI_BLACK}:01")
    assert_capabilities(run)
    avps = assert_common_eca(run.answer("unknown"), run)
    assert avps.get("Result-Code", []) == []
    assert avps["Experimental-Result"] == [
        {"Vendor-Id": V3GPP, "Experimental-Result-Code": EQUIPMENT_UNKNOWN}]
    assert avps.get("Equipment-Status", []) == []
    # Listed equipment is still answered from the register by the same server.
    black = assert_common_eca(run.answer("black"), run)
    assert black["Result-Code"] == [SUCCESS]
    assert black["Equipment-Status"] == [BLACKLISTED]
    assert_no_otp_errors(run.one("stats")["counters"], run)
    assert_clean_disconnect(run, server)


# ---------------------------------------------------------------------------------------------
# RFC 3539 watchdogs, both directions. Each side resets its timer on any message received, so
# each test lets only one side's timer run out: the other side's Tw is 30 s.


def test_otp_watchdog_answered(erlang: Erlang, register_dir: Path, eir_servers: Callable[..., EirServer]) -> None:
    """OTP's Tw (watchdog_timer 6000, +-2 s jitter) fires on an idle connection; our DWA keeps
    the peer OKAY and a later ECR is still answered."""
    server = eir_servers("--register", str(register_dir))  # our Tw: 30 s
    run = run_mme(erlang, server, f"ecr:before:{IMEI_GREY}:01", "watchdog:15000:otp",
                  f"ecr:after:{IMEI_BLACK}:01", watchdog_timer_ms=6000)
    wd = run.one("watchdog")
    counters = wd["counters"]
    assert counters.get("dwr_sent", 0) >= 1, f"OTP sent no DWR{run.context()}"
    assert counters.get("dwa_received_rc_2001", 0) >= 1, f"no DWA 2001 reached OTP{run.context()}"
    assert counters.get("dwa_received") == counters.get("dwr_sent"), run.context()
    # No watchdog transition (to SUSPECT/DOWN) while idle: OTP only reports one on a change.
    assert wd["events"] == [] or all("{initial,okay}" in e for e in wd["events"]), run.context()
    assert_no_otp_errors(run.one("stats")["counters"], run)
    assert assert_common_eca(run.answer("before"), run)["Equipment-Status"] == [GREYLISTED]
    assert assert_common_eca(run.answer("after"), run)["Equipment-Status"] == [BLACKLISTED]
    assert not server.events("watchdog_state"), server.log_text()
    assert_clean_disconnect(run, server)


def test_server_watchdog_answered_by_otp(erlang: Erlang, register_dir: Path,
                                         eir_servers: Callable[..., EirServer]) -> None:
    """Our Tw (6 s, +-2 s) fires; OTP decodes our DWR and answers DWA 2001."""
    server = eir_servers("--register", str(register_dir), "--watchdog-interval", "6")
    run = run_mme(erlang, server, "watchdog:15000:server", f"ecr:after:{IMEI_WHITE}:01",
                  watchdog_timer_ms=30000)
    counters = run.one("watchdog")["counters"]
    assert counters.get("dwr_received", 0) >= 1, f"OTP received no DWR{run.context()}"
    # OTP answers a DWR it could not decode with an error Result-Code, not 2001.
    assert counters.get("dwa_sent_rc_2001") == counters["dwr_received"], run.context()
    assert_no_otp_errors(run.one("stats")["counters"], run)
    assert assert_common_eca(run.answer("after"), run)["Equipment-Status"] == [WHITELISTED]
    assert not server.events("watchdog_state"), server.log_text()
    assert_clean_disconnect(run, server)

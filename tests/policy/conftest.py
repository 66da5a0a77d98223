"""Fixtures for the policy tests: a small TAC database and an operator-local list."""

from __future__ import annotations

import pytest

from eir_server.policy import EquipmentStatus, LocalLists, SvnRule, TacDatabase, TacInfo

W, G, B = EquipmentStatus.WHITELISTED, EquipmentStatus.GREYLISTED, EquipmentStatus.BLACKLISTED

# TACs used across the tests (all allocated in the fixture database except UNALLOCATED_TAC).
TAC_PHONE = "35209900"   # the Wikipedia example device: 35209900176148 check digit 1
TAC_SVN = "49015420"     # has an SVN rule: SVN 01-02 blacklisted
TAC_BARRED = "86123400"  # barred
TAC_RANGE = "35332811"   # a local grey range lives in this TAC
UNALLOCATED_TAC = "99887766"

LOCAL_CSV = """\
# list,imei,imei_end,reason
list,imei,imei_end,reason
black,35209900000017,,stolen: operator ticket 4711
white,35209900000025,,VIP handset wrongly listed nationally
grey,35332811000000,35332811099999,"batch under investigation, NOC-12"
white,86123400555555,,lab unit of a barred TAC
white,001001*,,our lab's test handsets
white,35209900000033,,handset with a bad check digit we accept
"""


@pytest.fixture
def tacdb() -> TacDatabase:
    return TacDatabase(
        {t: TacInfo("Maker", f"Model {t}") for t in (TAC_PHONE, TAC_SVN, TAC_BARRED, TAC_RANGE)},
        barred={TAC_BARRED: "counterfeit model"},
        svn_rules=[SvnRule(TAC_SVN, frozenset({"01", "02"}), B, "vulnerable firmware")],
    )


@pytest.fixture
def local() -> LocalLists:
    return LocalLists.parse_csv(LOCAL_CSV.splitlines())

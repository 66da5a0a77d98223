"""Loaders: operator-local CSV lists (with overlap resolution) and the GSMA TAC file."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eir_server.policy import LoadError, LocalEntry, LocalLists, TacDatabase, make_entry

# -- operator-local lists -------------------------------------------------------------------


def test_csv_forms(local: LocalLists) -> None:
    assert len(local) == 6 and local.bad_lines == ()
    e = local.lookup("35209900000017")
    assert e is not None and (e.kind, e.reason, e.line) == ("black", "stolen: operator ticket 4711", 3)
    grey = local.lookup("35332811050000")
    assert grey is not None and grey.kind == "grey"
    assert grey.reason == "batch under investigation, NOC-12"  # quoted comma survives
    lab = local.lookup("00100199999999")
    assert lab is not None and lab.pattern == "001001*"
    assert local.lookup("00100200000000") is None
    assert local.lookup("35332811100000") is None


def test_csv_accepts_15_and_16_digit_forms() -> None:
    lists = LocalLists.parse_csv(["black,352099001761481", "grey,4901542032375101,,sv"])
    assert lists.lookup("35209900176148").kind == "black"
    assert lists.lookup("49015420323751").kind == "grey"


BAD_CSV = """\
black,35209900176148,,ok
purple,35209900176149,,no such list
black,352099001761482,,bad check digit
black,35209900x76148
white,35209900000100,35209900000000,reversed range
white,35*,35999999999999,prefix with end
grey,35209900176148,,duplicate of line 1
black
"""


def test_csv_bad_lines_reported_by_line_number() -> None:
    with pytest.raises(LoadError) as exc:
        LocalLists.parse_csv(BAD_CSV.splitlines(), source="local.csv")
    assert "local.csv" in str(exc.value)
    lists = LocalLists.parse_csv(BAD_CSV.splitlines(), strict=False)
    assert [b.line for b in lists.bad_lines] == [2, 3, 4, 5, 6, 7, 8]
    assert "already listed (black, line 1)" in lists.bad_lines[5].reason
    assert lists.lookup("35209900176148").kind == "black"  # first occurrence kept


def test_csv_file_with_bom_and_crlf(tmp_path: Path) -> None:
    f = tmp_path / "local.csv"
    f.write_bytes("\ufefflist,imei,imei_end,reason\r\nblack,35209900176148,,stolen\r\n"
                  .encode())
    lists = LocalLists.load_csv(f)
    assert lists.lookup("35209900176148").reason == "stolen"


def test_overlap_resolution_rules() -> None:
    lists = LocalLists([
        make_entry("white", "35*"),                          # wide white
        make_entry("grey", "35209900*"),                     # narrower grey inside it
        make_entry("black", "35209900100000", "35209900100009"),
        make_entry("white", "35209900100005"),               # exact beats ranges
        make_entry("grey", "36000000000000", "36000000000009", line=1),
        make_entry("black", "36000000000000", "36000000000009", line=2),  # same width: black
    ])
    kind = {k: lists.lookup(k).kind for k in
            ("35000000000000", "35209900000000", "35209900100003", "35209900100005",
             "36000000000004")}
    assert kind == {"35000000000000": "white", "35209900000000": "grey",
                    "35209900100003": "black", "35209900100005": "white",
                    "36000000000004": "black"}
    assert lists.lookup("37000000000000") is None


_point = st.integers(0, 60)
_ranges = st.lists(st.tuples(st.sampled_from(["black", "grey", "white"]), _point, _point),
                   max_size=12)


@given(_ranges, st.lists(_point, min_size=1, max_size=20))
def test_flattened_ranges_match_brute_force(ranges, probes) -> None:
    # Reference: among ranges containing x (not exact entries), the narrowest, then black >
    # grey > white, then the earlier line.
    base = 35209900000000
    entries = [make_entry(k, f"{base + min(a, b):014d}", f"{base + max(a, b):014d}", line=i + 1)
               for i, (k, a, b) in enumerate(ranges) if a != b]
    lists = LocalLists(entries)
    sev = {"black": 0, "grey": 1, "white": 2}
    for p in probes:
        x = f"{base + p:014d}"
        covering = [e for e in entries if e.start <= x <= e.end]
        want = min(covering, key=lambda e: (int(e.end) - int(e.start), sev[e.kind], e.line),
                   default=None)
        got: LocalEntry | None = lists.lookup(x)
        assert got == want


# -- GSMA TAC database ----------------------------------------------------------------------

GSMA = (
    "\ufeffTAC|Manufacturer|Model_Name|Bands|Allocation_Date|Country\r\n"
    "35209900|Apple|iPhone X|GSM 1800|01-Jan-2017|US\r\n"
    "49015420|Acme|Phone 1|LTE|02-Feb-2015|DE\r\n"
    "\r\n"
    "4901542|Short|TAC|x|y|z\r\n"
    "86123400|Too|Few|Fields\r\n"
    "49015420|Acme|Phone 1 again|LTE|02-Feb-2015|DE\r\n"
    "3520990A|Bad|TAC|x|y|z\r\n"
    " 35332811 |Spaced|Model|x|y|z\r\n"
)


def test_gsma_parse_with_bom_crlf_and_bad_lines(tmp_path: Path) -> None:
    f = tmp_path / "tac.txt"
    f.write_bytes(GSMA.encode())
    db = TacDatabase.load_gsma(f)
    assert len(db) == 3
    info = db.info("35209900")
    assert info is not None and (info.manufacturer, info.model_name) == ("Apple", "iPhone X")
    assert info.allocation_date == "01-Jan-2017"
    assert db.info("35332811") is not None
    assert db.info("49015420").model_name == "Phone 1"  # first occurrence kept
    assert [(b.line, b.reason.split(" (")[0]) for b in db.bad_lines] == [
        (5, "TAC is not 8 digits"), (6, "expected 6 fields, got 4"), (7, "duplicate TAC"),
        (8, "TAC is not 8 digits")]
    with pytest.raises(LoadError, match="4 bad line"):
        TacDatabase.load_gsma(f, strict=True)


def test_gsma_header_variants_and_errors() -> None:
    db = TacDatabase.parse_gsma(["tac|Marketing Name|manufacturer", "35209900|iPhone|Apple"])
    assert db.info("35209900").model_name == "iPhone"
    with pytest.raises(LoadError, match="no TAC column"):
        TacDatabase.parse_gsma(["Manufacturer|Model", "a|b"])
    with pytest.raises(LoadError, match="empty"):
        TacDatabase.parse_gsma(["", "  "])


def test_gsma_tolerates_latin1_bytes(tmp_path: Path) -> None:
    f = tmp_path / "tac.txt"
    f.write_bytes(b"TAC|Manufacturer\n35209900|Soci\xe9t\xe9\n")
    assert TacDatabase.load_gsma(f).info("35209900").manufacturer.startswith("Soci")


def test_tac_database_rules_and_validation() -> None:
    db = TacDatabase(["35209900"]).with_rules(barred={"86123400": "fake"})
    assert db.barred == {"86123400": "fake"} and db.info("35209900") is not None
    with pytest.raises(ValueError, match="8 digits"):
        TacDatabase(["3520990"])
    with pytest.raises(ValueError, match="8 digits"):
        TacDatabase(barred=["x"])

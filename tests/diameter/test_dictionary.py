"""Dictionaries are data: load, re-emit, reload gives the same tables; codes agree with
Wireshark's dictionary, which is an implementation we did not write."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from eir_server.diameter.dictionary import (
    DictionaryError,
    emit_xml,
    load_dictionary,
    loads_dictionary,
)

WIRESHARK = Path("/usr/share/wireshark/diameter")


def test_round_trip_load_emit_load() -> None:
    d = load_dictionary()
    again = loads_dictionary(emit_xml(d))
    assert again == d
    assert emit_xml(again) == emit_xml(d)


def test_s13_definitions() -> None:
    d = load_dictionary()
    for name, code, type_ in [("Terminal-Information", 1401, "Grouped"), ("IMEI", 1402,
                              "UTF8String"), ("Software-Version", 1403, "UTF8String"),
                              ("3GPP2-MEID", 1471, "OctetString"),
                              ("Equipment-Status", 1445, "Enumerated")]:
        a = d.avp(name)
        assert (a.code, a.vendor, a.type, a.vendor_bit) == (code, 10415, type_, "must")
    assert dict(d.avp("Equipment-Status").enums) == {0: "WHITELISTED", 1: "BLACKLISTED",
                                                      2: "GREYLISTED"}
    ecr = d.command(16777252, 324)
    assert ecr is not None and ecr.request is not None
    required = {r.name for r in ecr.request.rules if r.min >= 1}
    assert required == {"Session-Id", "Auth-Session-State", "Origin-Host", "Origin-Realm",
                        "Destination-Realm", "Terminal-Information"}
    assert {"REQ", "PXY"} <= ecr.request.flags
    assert d.avp("DRMP").code == 301 and d.avp("OC-OLR").code == 623


def test_codes_and_types_agree_with_wireshark() -> None:
    """Every AVP we define that Wireshark's dictionary also defines has the same code,
    vendor and base type (Wireshark spells some types differently; map those)."""
    assert WIRESHARK.is_dir(), "tshark (wireshark-common) must be installed: make test does it"
    def wire(t: str) -> str:
        # Wireshark names value-mapped Unsigned32s Enumerated and has its own aliases; what must
        # agree is the wire form.
        for form, names in {"32": ("Unsigned32", "Integer32", "Enumerated", "Time", "AppId",
                                   "VendorId", "Float32"),
                            "64": ("Unsigned64", "Integer64", "Float64"),
                            "address": ("Address", "IPAddress"), "grouped": ("Grouped",)}.items():
            if t in names:
                return form
        return "octets"

    theirs: dict[str, tuple[int, str]] = {}
    # Regex, not an XML parser: Wireshark's files pull each other in through DTD entities.
    avp_re = re.compile(r"<avp\s([^>]*)>(.*?)</avp>", re.S)
    attr_re = re.compile(r'([\w-]+)="([^"]*)"')
    for f in WIRESHARK.glob("*.xml"):
        for attrs, body in avp_re.findall(f.read_text(errors="replace")):
            a = dict(attr_re.findall(attrs))
            m = re.search(r'type-name="([^"]+)"', body)
            tname = "Grouped" if "<grouped" in body else (m.group(1) if m else "")
            if "name" in a and a.get("code", "").isdigit():
                theirs.setdefault(a["name"], (int(a["code"]), tname))
    d = load_dictionary()
    compared = 0
    for a in d.avps.values():
        if a.name not in theirs:
            continue
        code, tname = theirs[a.name]
        assert code == a.code, a.name
        if tname:
            assert wire(tname) == wire(a.type), (a.name, tname, a.type)
        compared += 1
    assert compared >= 40


@pytest.mark.parametrize("xml, message", [
    ("<dictionary><application id='0'><avp name='X' code='1'><type type-name='Bogus'/></avp>"
     "</application></dictionary>", "unknown type"),
    ("<dictionary><application id='0'><avp name='X' code='1'><grouped><gavp name='Y'/>"
     "</grouped></avp></application></dictionary>", "unknown AVP"),
    ("<dictionary><application id='0'><avp name='X' code='1'><type type-name='Unsigned32'/>"
     "</avp><avp name='Y' code='1'><type type-name='Unsigned32'/></avp></application>"
     "</dictionary>", "defined twice"),
    ("<dictionary><application id='0'><avp name='X' code='1' vendor-id='V'>"
     "<type type-name='Unsigned32'/></avp></application></dictionary>", "unknown vendor"),
    ("<nope/>", "root element"),
])
def test_bad_dictionaries_are_refused(xml: str, message: str) -> None:
    with pytest.raises(DictionaryError, match=message):
        loads_dictionary(xml)

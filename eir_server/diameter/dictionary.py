"""Diameter dictionaries: XML data files compiled once into frozen lookup tables.

The file format is Wireshark's dictionary vocabulary (``dictionary``, ``application``, ``vendor``,
``command``, ``avp``, ``type``, ``enum``, ``grouped``, ``gavp``), which operators already know, plus
a grammar extension Wireshark ignores: ``<request>``/``<answer>`` inside ``<command>``,
``min``/``max``/``position`` on ``<gavp>``, and ``<any-avp/>`` for RFC 6733's ``*[ AVP ]``.
``dictionaries/README.md`` documents it. Standard library only.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING
from xml.sax.saxutils import quoteattr

# RFC 6733 4.2/4.3 data formats. Derived formats are kept by name: the codec needs to know that a
# DiameterIdentity is an OctetString that must also be valid ASCII, and an Enumerated an Integer32.
BASIC_TYPES = frozenset(
    {
        "OctetString", "Integer32", "Integer64", "Unsigned32", "Unsigned64", "Float32",
        "Float64", "Grouped", "Address", "Time", "UTF8String", "DiameterIdentity",
        "DiameterURI", "Enumerated", "IPFilterRule", "QoSFilterRule",
    }
)
FIXED_LENGTH = MappingProxyType(
    {
        "Integer32": 4, "Unsigned32": 4, "Float32": 4, "Enumerated": 4, "Time": 4,
        "Integer64": 8, "Unsigned64": 8, "Float64": 8,
    }
)
FLAG_RULES = ("must", "may", "mustnot", "shouldnot")

if TYPE_CHECKING:
    from .compiled import CompiledDictionary

AvpKey = tuple[int, int]  # (code, vendor-id); vendor 0 means no V bit


class DictionaryError(ValueError):
    """A dictionary file is inconsistent (unknown type, dangling reference, duplicate code)."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One line of an ABNF grammar: ``min*max{name}``; max None is unbounded."""

    key: AvpKey
    name: str
    min: int
    max: int | None
    first: bool = False  # "< Session-Id >": fixed at the start of the message


@dataclass(frozen=True, slots=True)
class Grammar:
    rules: tuple[Rule, ...]
    any_avp: bool  # "*[ AVP ]": AVPs not named in the rules are allowed
    any_min: int = 0  # Failed-AVP ::= 1* {AVP}
    flags: frozenset[str] = frozenset()  # REQ, PXY, ERR for command grammars

    def index(self) -> Mapping[AvpKey, int]:
        return {r.key: i for i, r in enumerate(self.rules)}


@dataclass(frozen=True, slots=True)
class AvpDef:
    name: str
    code: int
    vendor: int
    type: str
    mandatory: str  # M bit rule: must / may / mustnot / shouldnot
    vendor_bit: str
    may_encrypt: bool
    enums: Mapping[int, str]
    grammar: Grammar | None  # grouped AVPs only
    section: str  # the <application> it was defined in, for re-emission


@dataclass(frozen=True, slots=True)
class CommandDef:
    name: str
    code: int
    application_id: int
    request: Grammar | None
    answer: Grammar | None
    section: str


@dataclass(frozen=True, slots=True)
class Section:
    """An ``<application>`` element as written in a file (several may share id 0)."""

    id: int
    name: str
    uri: str


@dataclass(frozen=True)
class Dictionary:
    vendors: Mapping[str, int]  # Wireshark vendor-id symbol -> vendor code
    vendor_names: Mapping[str, str]
    sections: tuple[Section, ...]
    avps: Mapping[AvpKey, AvpDef]
    commands: Mapping[tuple[int, int], CommandDef]  # (application id, command code)
    # Every derived table, built once on first use (`load_dictionary` builds it at load).
    _compiled: CompiledDictionary | None = field(default=None, init=False, repr=False,
                                                 compare=False)

    @property
    def compiled(self) -> CompiledDictionary:
        c = self._compiled
        if c is None:
            from .compiled import CompiledDictionary  # it imports the codec, which imports us

            c = CompiledDictionary(self)
            object.__setattr__(self, "_compiled", c)
        return c

    def avp(self, name: str) -> AvpDef:
        return self.compiled.by_name[name]

    def command(self, application_id: int, code: int) -> CommandDef | None:
        return self.commands.get((application_id, code))


def _default_dir() -> Path:
    """The repository's dictionaries/ in a checkout; the packaged copy once installed."""
    here = Path(__file__).resolve().parents[2] / "dictionaries"
    if here.is_dir():
        return here
    # By name: a data-only package, which mypy (and so mypyc) need not find or type.
    import importlib

    return Path(importlib.import_module("eir_server.dictionaries").__path__[0])


DEFAULT_DIR = _default_dir()


def _int(text: str | None, what: str) -> int:
    if text is None:
        raise DictionaryError(f"missing {what}")
    try:
        return int(text, 0)
    except ValueError:
        raise DictionaryError(f"{what} is not a number: {text!r}") from None


def _max(text: str | None) -> int | None:
    if text is None:
        return 1
    if text in ("*", "unbounded"):
        return None
    return _int(text, "max")


@dataclass
class _RawAvp:
    el: ET.Element
    section: str


def load_dictionary(paths: Iterable[str | Path] | None = None) -> Dictionary:
    """Compile dictionary files (default: every ``*.xml`` under ``dictionaries/``)."""
    if paths is None:
        paths = sorted(DEFAULT_DIR.glob("*.xml"))
    roots = [ET.parse(p).getroot() for p in paths]
    d = compile_elements(roots)
    d.compiled  # noqa: B018 - built now, not on the first message
    return d


def loads_dictionary(*texts: str) -> Dictionary:
    d = compile_elements([ET.fromstring(t) for t in texts])
    d.compiled  # noqa: B018
    return d


def compile_elements(roots: list[ET.Element]) -> Dictionary:
    vendors: dict[str, int] = {"None": 0}
    vendor_names: dict[str, str] = {}
    sections: list[Section] = []
    raw_avps: list[_RawAvp] = []
    raw_cmds: list[tuple[ET.Element, Section]] = []
    for root in roots:
        if root.tag != "dictionary":
            raise DictionaryError(f"root element is <{root.tag}>, expected <dictionary>")
        for v in root.iter("vendor"):
            sym = v.get("vendor-id") or ""
            vendors[sym] = _int(v.get("code"), f"vendor {sym} code")
            vendor_names[sym] = v.get("name") or sym
        for app in list(root.iter("application")) + list(root.iter("base")):
            sec = Section(_int(app.get("id", "0"), "application id"), app.get("name") or "",
                          app.get("uri") or "")
            if sec in sections:
                raise DictionaryError(f"application section {sec.name!r} defined twice")
            sections.append(sec)
            raw_avps.extend(_RawAvp(a, sec.name) for a in app.findall("avp"))
            raw_cmds.extend((c, sec) for c in app.findall("command"))

    names: dict[str, AvpKey] = {}
    for ra in raw_avps:
        name = ra.el.get("name") or ""
        vsym = ra.el.get("vendor-id", "None")
        if vsym not in vendors:
            raise DictionaryError(f"AVP {name}: unknown vendor-id {vsym!r}")
        key = (_int(ra.el.get("code"), f"AVP {name} code"), vendors[vsym])
        if name in names:
            raise DictionaryError(f"AVP {name} defined twice")
        names[name] = key

    def grammar(el: ET.Element, where: str) -> Grammar:
        rules: list[Rule] = []
        any_avp = False
        any_min = 0
        for g in el:
            if g.tag == "any-avp":
                any_avp = True
                any_min = _int(g.get("min", "0"), "min")
                continue
            if g.tag != "gavp":
                continue
            n = g.get("name") or ""
            if n not in names:
                raise DictionaryError(f"{where}: unknown AVP {n!r} in grammar")
            lo = _int(g.get("min", "0"), "min")
            hi = _max(g.get("max"))
            rules.append(Rule(names[n], n, lo, hi, g.get("position") == "first"))
        flags = frozenset(f for f in (el.get("flags") or "").split(",") if f)
        return Grammar(tuple(rules), any_avp, any_min, flags)

    avps: dict[AvpKey, AvpDef] = {}
    for ra in raw_avps:
        el = ra.el
        name = el.get("name") or ""
        t = el.find("type")
        g = el.find("grouped")
        if g is not None and t is None:
            tname = "Grouped"
        elif t is not None and g is None:
            tname = t.get("type-name") or ""
        else:
            raise DictionaryError(f"AVP {name}: needs exactly one of <type> or <grouped>")
        if tname not in BASIC_TYPES:
            raise DictionaryError(f"AVP {name}: unknown type {tname!r}")
        rules = {}
        for attr in ("mandatory", "vendor-bit"):
            default = "may" if attr == "mandatory" else "mustnot"
            rules[attr] = el.get(attr, default)
            if rules[attr] not in FLAG_RULES:
                raise DictionaryError(f"AVP {name}: {attr}={rules[attr]!r}")
        key = names[name]
        if key in avps:
            raise DictionaryError(f"AVP code {key} defined twice ({avps[key].name}, {name})")
        if key[1] and rules["vendor-bit"] != "must":
            raise DictionaryError(f"AVP {name}: a vendor AVP needs vendor-bit=\"must\"")
        enums = MappingProxyType({_int(e.get("code"), "enum code"): e.get("name") or ""
                                  for e in el.findall("enum")})
        avps[key] = AvpDef(
            name=name, code=key[0], vendor=key[1], type=tname, mandatory=rules["mandatory"],
            vendor_bit=rules["vendor-bit"], may_encrypt=el.get("may-encrypt", "yes") == "yes",
            enums=enums, grammar=grammar(g, f"AVP {name}") if g is not None else None,
            section=ra.section,
        )

    commands: dict[tuple[int, int], CommandDef] = {}
    for el, sec in raw_cmds:
        name = el.get("name") or ""
        code = _int(el.get("code"), f"command {name} code")
        req = el.find("request")
        ans = el.find("answer")
        cmd = CommandDef(
            name=name, code=code, application_id=sec.id,
            request=grammar(req, f"{name} request") if req is not None else None,
            answer=grammar(ans, f"{name} answer") if ans is not None else None,
            section=sec.name,
        )
        if (sec.id, code) in commands:
            raise DictionaryError(f"command {code} defined twice in application {sec.id}")
        commands[(sec.id, code)] = cmd
    return Dictionary(
        vendors=MappingProxyType(vendors),
        vendor_names=MappingProxyType(vendor_names),
        sections=tuple(sections),
        avps=MappingProxyType(avps),
        commands=MappingProxyType(commands),
    )


def emit_xml(d: Dictionary) -> str:
    """Write a dictionary back as one XML document; loading it gives an equal Dictionary."""
    vsym = {code: sym for sym, code in d.vendors.items()}
    key_name = {k: a.name for k, a in d.avps.items()}
    out = ['<?xml version="1.0" encoding="UTF-8"?>', "<dictionary>"]
    for sym, code in d.vendors.items():
        if sym != "None":
            out.append(f"  <vendor vendor-id={quoteattr(sym)} code=\"{code}\" "
                       f"name={quoteattr(d.vendor_names.get(sym, sym))}/>")

    def rules_xml(g: Grammar, indent: str) -> list[str]:
        lines = []
        for r in g.rules:
            attrs = f"name={quoteattr(key_name[r.key])}"
            if r.min:
                attrs += f' min="{r.min}"'
            if r.max != 1:
                attrs += ' max="*"' if r.max is None else f' max="{r.max}"'
            if r.first:
                attrs += ' position="first"'
            lines.append(f"{indent}<gavp {attrs}/>")
        if g.any_avp:
            lines.append(f'{indent}<any-avp min="{g.any_min}"/>' if g.any_min
                         else f"{indent}<any-avp/>")
        return lines

    for sec in d.sections:
        out.append(f'  <application id="{sec.id}" name={quoteattr(sec.name)} '
                   f"uri={quoteattr(sec.uri)}>")
        for c in d.commands.values():
            if c.section != sec.name:
                continue
            out.append(f'    <command name={quoteattr(c.name)} code="{c.code}" vendor-id="None">')
            for tag, g in (("request", c.request), ("answer", c.answer)):
                if g is not None:
                    out.append(f'      <{tag} flags="{",".join(sorted(g.flags))}">')
                    out.extend(rules_xml(g, "        "))
                    out.append(f"      </{tag}>")
            out.append("    </command>")
        for a in d.avps.values():
            if a.section != sec.name:
                continue
            attrs = (f'name={quoteattr(a.name)} code="{a.code}" mandatory="{a.mandatory}" '
                     f'vendor-bit="{a.vendor_bit}" may-encrypt="{"yes" if a.may_encrypt else "no"}"')
            if a.vendor:
                attrs += f" vendor-id={quoteattr(vsym[a.vendor])}"
            out.append(f"    <avp {attrs}>")
            if a.grammar is not None:
                out.append("      <grouped>")
                out.extend(rules_xml(a.grammar, "        "))
                out.append("      </grouped>")
            else:
                out.append(f'      <type type-name="{a.type}"/>')
            for code, name in a.enums.items():
                out.append(f"      <enum name={quoteattr(name)} code=\"{code}\"/>")
            out.append("    </avp>")
        out.append("  </application>")
    out.append("</dictionary>")
    return "\n".join(out) + "\n"

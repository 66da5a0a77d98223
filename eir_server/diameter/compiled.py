"""Every table derived from a dictionary, built once: `CompiledDictionary`.

A `Dictionary` is the data of the XML files; its `compiled` attribute (built by
`load_dictionary`) owns what the codec and the connection derive from it: per-grammar rule
indexes and 5005 example AVPs (`GrammarTables`, for `validate`/`check`), the fast path's
grammars (`FastGrammar`), and per served application set the table that routes a request's header
to its fast grammar, routing slots and layout cache (`FastCommand`). Nothing is keyed by id():
tables hang off the object they were built for and live exactly as long.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import NamedTuple

from .codec import FastGrammar, GrammarTables, LayoutCache, example_avp
from .dictionary import AvpKey, Dictionary, Grammar

LAYOUTS_PER_COMMAND = 1024  # cached message shapes per request command (all peers together)


class FastCommand(NamedTuple):
    """One application request we serve, as the fast path sees it."""

    grammar: FastGrammar
    proxiable: bool  # the command's grammar has PXY: the P bit is allowed
    realm_slot: int  # rule index of Destination-Realm, -1 if the grammar has none
    host_slot: int  # rule index of Destination-Host, -1 if the grammar has none
    layouts: LayoutCache


class CompiledDictionary:
    __slots__ = ("dictionary", "by_name", "_groups", "_fast_groups", "_commands", "_fast")

    def __init__(self, dictionary: Dictionary) -> None:
        self.dictionary = dictionary
        defs = dictionary.avps
        self.by_name = {a.name: a for a in defs.values()}
        # Grouped AVPs first (a grammar's tables refer to those of the groups inside it), in
        # two steps: grouped grammars may contain themselves.
        self._fast_groups = {k: FastGrammar(d.grammar) for k, d in defs.items()
                             if d.grammar is not None}
        for fg in self._fast_groups.values():
            fg.build(defs, self._fast_groups)
        self._groups: dict[AvpKey, GrammarTables] = {}
        for key, fg in self._fast_groups.items():
            self._groups[key] = self._tables(fg.grammar, fg)
        # (application id, command code) -> (request tables, answer tables)
        self._commands: dict[tuple[int, int], tuple[GrammarTables | None,
                                                      GrammarTables | None]] = {
            key: (self._tables(c.request) if c.request is not None else None,
                  self._tables(c.answer) if c.answer is not None else None)
            for key, c in dictionary.commands.items()
        }
        self._fast: dict[frozenset[int], Mapping[int, FastCommand]] = {}

    def _tables(self, grammar: Grammar, fast: FastGrammar | None = None) -> GrammarTables:
        defs = self.dictionary.avps
        if fast is None:
            fast = FastGrammar(grammar)
            fast.build(defs, self._fast_groups)
        examples = tuple(example_avp(defs[r.key]) for r in grammar.rules)
        return GrammarTables(grammar, examples, self._groups, fast)

    def request(self, application_id: int, code: int) -> GrammarTables | None:
        """The compiled request grammar of a command (None: unknown command, or no request)."""
        entry = self._commands.get((application_id, code))
        return entry[0] if entry is not None else None

    def answer(self, application_id: int, code: int) -> GrammarTables | None:
        entry = self._commands.get((application_id, code))
        return entry[1] if entry is not None else None

    def fast_commands(self, applications: frozenset[int]) -> Mapping[int, FastCommand]:
        """(application << 24 | command code) -> FastCommand for every request of the given
        applications: built once per set and shared by every connection serving it, layout
        caches included (peers of one deployment send the same shapes)."""
        table = self._fast.get(applications)
        if table is None:
            table = self._fast[applications] = {
                (app << 24) | code: _fast_command(tables)
                for (app, code), (tables, _) in self._commands.items()
                if app in applications and tables is not None
            }
        return table

    def layout_caches(self) -> Iterator[LayoutCache]:
        for table in self._fast.values():
            for cmd in table.values():
                yield cmd.layouts

    def layout_stats(self) -> dict[str, int]:
        """Cached layouts and evictions, for the eir_diameter_layout_cache_* metrics."""
        caches = list(self.layout_caches())
        return {"entries": sum(len(c) for c in caches),
                "evictions": sum(c.evicted for c in caches)}


def _fast_command(tables: GrammarTables) -> FastCommand:
    names = [r.name for r in tables.grammar.rules]
    return FastCommand(
        tables.fast, "PXY" in tables.grammar.flags,
        names.index("Destination-Realm") if "Destination-Realm" in names else -1,
        names.index("Destination-Host") if "Destination-Host" in names else -1,
        LayoutCache(LAYOUTS_PER_COMMAND))

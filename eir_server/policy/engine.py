"""The verdict policy: one pure function from (request, register record, date) to a Verdict.

Precedence, first match wins (docs/policy.md has an example for each):

  1. malformed            identity unusable (non-digits, wrong length): nothing else can match
  2. local_white/grey/black  operator-local lists, exact IMEI before range
  3. malformed            bad check digit, all-zero or test TAC (after 2, so operators override)
  4. exception_pair       paired IMSI on the national exception list: WHITELISTED whenever
                          the rules 5-10 below would not whitelist
  5. national_blacklist   record.blacklist with block_date <= today
  6. notification_blocked a notification whose block_date <= today
     notification_grace   a notification before its block_date
  7. tac_barred           config.barred_tacs or TacDatabase.barred
  8. svn_rule             per-TAC SVN rule matching the request's SVN
  9. tac_unallocated      TAC not in the loaded GSMA database (when enabled)
 10. default              config.unknown_equipment

Dates are YYYYMMDD strings compared as strings (same width, so lexical order is date order);
`decide` does not validate `today` -- it is called per attach, the caller owns the clock.
Rule 4 precedes 5-10 in authority but is checked after computing them, because a pair only
matters when they would not whitelist (and the verdict then names what it overrode).
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Final

from . import rules as R
from .common import status_name
from .config import PolicyConfig
from .imei import (
    MALFORMED_REASONS,
    ZERO_TAC,
    Malformed,
    NormalizedImei,
    _check_digit,
    normalize_imei,
    parse_imei,
)
from .lists import LocalEntry, LocalLists
from .tac import TacDatabase
from .types import CheckRequest, EquipmentStatus, ImeiRecord, NotificationEntry, Verdict

_W: Final = EquipmentStatus.WHITELISTED
_G: Final = EquipmentStatus.GREYLISTED
_B: Final = EquipmentStatus.BLACKLISTED
_LOCAL = {"black": (_B, R.LOCAL_BLACK), "grey": (_G, R.LOCAL_GREY), "white": (_W, R.LOCAL_WHITE)}


# Local ranges may flag at most this many TACs in the index before the bisect is simply done
# for every IMEI (bounds the index's memory for very wide ranges such as "35*").
_MAX_RANGE_TACS: Final = 100_000

# What `Policy.identify` returns: (14-digit body, IMEISV's SVN, malformed verdict), plain tuple.
Identified = tuple[str | None, str | None, Verdict | None]


class _TacEntry:
    """What the policy knows about one TAC. Mutable only while Policy.__init__ builds it."""

    __slots__ = ("allocated", "ranges", "barred", "svns")

    def __init__(self, allocated: bool = False) -> None:
        self.allocated = allocated
        self.ranges = False
        self.barred: Verdict | None = None
        self.svns: dict[str, Verdict] | None = None


_PLAIN: Final = _TacEntry(allocated=True)  # shared: allocated, nothing else to know


def _local_verdict(e: LocalEntry) -> Verdict:
    status, rule = _LOCAL[e.kind]
    return Verdict(status, rule, (e.describe(),))


BLACKLIST_VERDICTS_MAX: Final = 4096


class Policy:
    """Immutable compiled policy. Build once per configuration/list load; swap the reference
    to reload. Everything derivable ahead of time (verdict objects, lookup tables) is built
    here so `decide` mostly does dict lookups and returns shared Verdict objects."""

    __slots__ = (
        "config", "local", "tacs",
        "_check_luhn", "_zero_spare", "_test_tacs",
        "_v_malformed", "_v_default", "_v_unalloc", "_v_pair",
        "_local_exact", "_seg_starts", "_seg_ends", "_seg_verdicts", "_ranges_everywhere",
        "_tac_index", "_unalloc_on",
        "_grace_status", "_blocked_status", "_notif_imsi", "_v_blacklist",
    )

    def __init__(
        self, config: PolicyConfig | None = None, local: LocalLists | None = None,
        tacs: TacDatabase | None = None,
    ) -> None:
        cfg = config if config is not None else PolicyConfig()
        self.config, self.local, self.tacs = cfg, local, tacs
        self._check_luhn = cfg.check_luhn
        self._zero_spare = cfg.accept_zero_spare_digit
        self._test_tacs = tuple(cfg.test_tacs)
        self._v_malformed = {
            code: Verdict(cfg.malformed, R.MALFORMED, (f"{code}: {text}",))
            for code, text in MALFORMED_REASONS.items()
        }
        self._v_default = Verdict(cfg.unknown_equipment, R.DEFAULT,
                                  (f"no list or rule matched: {status_name(cfg.unknown_equipment)}",))
        self._v_pair = {
            rule: Verdict(_W, R.EXCEPTION_PAIR,
                          ("IMSI paired with this IMEI on the exception list", f"overrides {rule}"))
            for rule in R.RULES
        }
        self._v_unalloc = Verdict(cfg.unallocated_tac, R.TAC_UNALLOCATED,
                                  ("TAC not in the GSMA TAC database",))
        self._grace_status = cfg.notification_grace
        self._blocked_status = cfg.notification_blocked
        self._notif_imsi = cfg.notification_match_imsi
        # Blacklist verdicts by (block date, reasons): a register has few distinct ones, and a
        # frozen dataclass costs ~1 µs to build, once per blacklisted request otherwise. A memo
        # (emptied when full), so decide stays a function of its inputs.
        self._v_blacklist: dict[tuple[str, tuple[str, ...]], Verdict] = {}

        # Operator-local lists: exact IMEI -> Verdict, and disjoint range segments for bisect.
        self._local_exact: dict[str, Verdict] = {}
        self._seg_starts: list[str] = []
        self._seg_ends: list[str] = []
        self._seg_verdicts: list[Verdict] = []
        if local is not None:
            shared: dict[int, Verdict] = {}  # one Verdict per entry, even if split in segments
            self._local_exact = {k: _local_verdict(e) for k, e in local.exact.items()}
            self._seg_starts = list(local.seg_starts)
            self._seg_ends = list(local.seg_ends)
            self._seg_verdicts = [
                shared.setdefault(id(e), _local_verdict(e)) for e in local.seg_entries
            ]

        # One TAC index answers, in a single dict lookup: allocated? barred? SVN rules? does a
        # local range touch this TAC? Most allocated TACs map to the shared _PLAIN entry.
        barred: dict[str, str] = {t: "barred by policy configuration" for t in cfg.barred_tacs}
        svn_rules = list(cfg.svn_rules)
        if tacs is not None:
            barred.update({t: (r or "barred") for t, r in tacs.barred.items()})
            svn_rules += tacs.svn_rules
        alloc = tacs.allocations if tacs is not None else None
        self._unalloc_on = cfg.unallocated_tac is not None and alloc is not None
        index: dict[str, _TacEntry] = (
            dict.fromkeys(alloc, _PLAIN) if self._unalloc_on and alloc is not None else {}
        )

        def entry(tac: str) -> _TacEntry:
            e = index.get(tac)
            if e is None or e is _PLAIN:
                e = _TacEntry(allocated=e is _PLAIN)
                index[tac] = e
            return e

        for tac, reason in barred.items():
            entry(tac).barred = Verdict(_B, R.TAC_BARRED, (f"TAC {tac}: {reason}",))
        for rule in svn_rules:
            e = entry(rule.tac)
            if e.svns is None:
                e.svns = {}
            for svn in sorted(rule.svns):
                # First rule listed wins for an SVN, like the lists' "first occurrence kept".
                e.svns.setdefault(svn, Verdict(rule.status, R.SVN_RULE, (
                    f"TAC {rule.tac} SVN {svn}" + (f": {rule.reason}" if rule.reason else ""),)))
        # Flag the TACs local range segments touch, so most IMEIs skip the bisect; segments
        # spanning too many TACs (e.g. "35*") make the bisect unconditional instead.
        touched = 0
        wide = False
        for first, last in zip(self._seg_starts, self._seg_ends, strict=True):
            lo, hi = int(first[:8]), int(last[:8])
            touched += hi - lo + 1
            if touched > _MAX_RANGE_TACS:
                wide = True
                break
            for n in range(lo, hi + 1):
                entry(f"{n:08d}").ranges = True
        self._ranges_everywhere = wide
        self._tac_index = index

    # -- identity -------------------------------------------------------------------------

    def normalize(self, raw: str) -> NormalizedImei | Malformed:
        """`normalize_imei` with this policy's Luhn, spare-digit and test-TAC settings."""
        r = normalize_imei(raw, check_luhn=self._check_luhn, accept_zero_spare=self._zero_spare)
        if type(r) is NormalizedImei and r.imei14.startswith(self._test_tacs):
            return Malformed("test_tac", r.imei14)
        return r

    def identify(self, raw: str) -> Identified:
        """Parse a received IMEI/IMEISV once per request: (14-digit body or None when unusable,
        the IMEISV's SVN, the malformed verdict or None). The body is the store key when the
        verdict is None; otherwise `decide_identified` ignores the record, so there is nothing
        to fetch."""
        if len(raw) == 15 and raw.isascii() and raw.isdigit():
            # parse_imei's 15-digit case inlined (nearly every request; a call and a tuple
            # less); tests/policy/test_imei.py holds the two to the same answers
            key = raw[:14]
            cd = raw[14]
            if self._check_luhn and cd != _check_digit(key) and not (
                    self._zero_spare and cd == "0"):
                return key, None, self._v_malformed["bad_check_digit"]
            if key.startswith(ZERO_TAC):
                return key, None, self._v_malformed["zero_tac"]
            if self._test_tacs and key.startswith(self._test_tacs):
                return key, None, self._v_malformed["test_tac"]
            return key, None, None
        reason, body, _, svn = parse_imei(raw, self._check_luhn, self._zero_spare)
        if reason is None and body is not None and self._test_tacs \
                and body.startswith(self._test_tacs):
            reason = "test_tac"
        return body, svn, (self._v_malformed[reason] if reason is not None else None)

    def imei_key(self, raw: str) -> str | None:
        """The 14-digit store key for a received IMEI/IMEISV, or None when malformed."""
        body, _, bad = self.identify(raw)
        return body if bad is None else None

    # -- decision -------------------------------------------------------------------------

    def decide(self, req: CheckRequest, record: ImeiRecord | None, today: str) -> Verdict:
        """Verdict for `req`, given the register's record for `imei_key(req.imei)` (None if
        unlisted) and today's date as YYYYMMDD (read only when there is a record: callers may
        pass "" without one). Pure: same inputs, same (often shared) Verdict."""
        return self.decide_identified(req, self.identify(req.imei), record, today)

    def decide_identified(self, req: CheckRequest, identified: Identified,
                          record: ImeiRecord | None, today: str) -> Verdict:
        """`decide` for a request whose IMEI `identify` has already parsed (the checker parses
        once, looks the body up, then decides)."""
        body, parsed_svn, bad = identified
        if body is None:
            assert bad is not None
            return bad  # 1. unusable identity
        svn = req.software_version if req.software_version is not None else parsed_svn
        te = self._tac_index.get(body[:8])

        # 2. operator-local lists
        exact = self._local_exact
        if exact:
            v = exact.get(body)
            if v is not None:
                return v
        if (te is not None and te.ranges) or self._ranges_everywhere:
            i = bisect_right(self._seg_starts, body) - 1
            if i >= 0 and body <= self._seg_ends[i]:
                return self._seg_verdicts[i]
        # 3. malformed but with a readable body
        if bad is not None:
            return bad
        if record is None:
            if te is _PLAIN:
                return self._v_default
            return self._tac_or_default(te, svn)
        # 5-10, then 4 if they would not whitelist
        under = self._national(req, record, today) or self._tac_or_default(te, svn)
        if under.status is not _W and record.exceptions and req.imsi:
            imsi, msisdn = req.imsi, req.msisdn
            for e in record.exceptions:
                # MSISDN narrows the pair only when both the entry and the request carry one
                # (S13 ECRs usually have no MSISDN).
                if e.imsi == imsi and (not e.msisdn or not msisdn or e.msisdn == msisdn):
                    return self._v_pair[under.rule]
        return under

    def _tac_or_default(self, te: _TacEntry | None, svn: str | None) -> Verdict:
        if te is not None:
            if te.barred is not None:
                return te.barred  # 7. tac_barred
            if svn and te.svns is not None:
                v = te.svns.get(svn)
                if v is not None:
                    return v  # 8. svn_rule
            if te.allocated or not self._unalloc_on:
                return self._v_default
        elif not self._unalloc_on:
            return self._v_default
        return self._v_unalloc  # 9. tac_unallocated

    def _national(self, req: CheckRequest, record: ImeiRecord, today: str) -> Verdict | None:
        bl = record.blacklist
        if bl is not None and bl.block_date <= today:
            key = (bl.block_date, bl.reasons)
            v = self._v_blacklist.get(key)
            if v is None:
                if len(self._v_blacklist) >= BLACKLIST_VERDICTS_MAX:
                    self._v_blacklist.clear()
                v = self._v_blacklist[key] = Verdict(
                    _B, R.NATIONAL_BLACKLIST, (f"block_date {bl.block_date}", *bl.reasons))
            return v
        if not record.notifications:
            return None
        first: NotificationEntry | None = None
        for note in record.notifications:
            if self._notif_imsi and note.imsi != req.imsi:
                continue
            if note.block_date <= today:
                return Verdict(self._blocked_status, R.NOTIFICATION_BLOCKED,
                               (f"block_date {note.block_date} reached", *note.reasons,
                                *(("amnesty granted",) if note.amnesty_granted else ())))
            if first is None or note.block_date < first.block_date:
                first = note
        if first is None:
            return None
        return Verdict(self._grace_status, R.NOTIFICATION_GRACE,
                       (f"grace period until {first.block_date}", *first.reasons,
                        *(("amnesty granted",) if first.amnesty_granted else ())))


def load_policy(config: PolicyConfig) -> Policy:
    """Build a Policy, loading `config.local_lists_file` (strict: LoadError on any bad line)
    and `config.tac_database_file` (lenient: inspect `policy.tacs.bad_lines` and log them)."""
    local = LocalLists.load_csv(config.local_lists_file) if config.local_lists_file else None
    tacs = TacDatabase.load_gsma(config.tac_database_file) if config.tac_database_file else None
    return Policy(config, local, tacs)

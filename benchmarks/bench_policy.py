"""Micro-benchmark of the pure verdict decision (`Policy.decide`).

Run: .venv/bin/python benchmarks/bench_policy.py [--n 200000] [--hot 2000] [--repeat 5]

All sources are in memory: ~200k-TAC GSMA database, 20k exact local entries + 2k ranges,
barred TACs and SVN rules, unallocated-TAC rule on. Each scenario decides lists of distinct
requests (distinct IMEIs, so no accidental caching) and reports the best of `repeat` runs in
ns per call, loop overhead subtracted:
  hot   `--hot` distinct requests decided over and over (request objects and the TAC entries
        they touch stay in CPU caches: a network whose traffic is dominated by popular TACs);
  cold  `--n` distinct requests, each decided once per run (working set far beyond the caches:
        a pessimistic bound).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eir_server.policy import (  # noqa: E402
    BlacklistEntry,
    CheckRequest,
    EquipmentStatus,
    ExceptionEntry,
    ImeiRecord,
    LocalLists,
    NotificationEntry,
    Policy,
    PolicyConfig,
    SvnRule,
    TacDatabase,
    TacInfo,
    luhn_check_digit,
    make_entry,
)

TODAY = "20250615"


def build_policy(rng: random.Random, n_tacs: int = 200_000) -> tuple[Policy, list[str]]:
    tacs = sorted({f"{rng.randrange(1_000_000, 99_999_999):08d}" for _ in range(n_tacs)})
    tacs = [t for t in tacs if not t.startswith("00")]
    db = TacDatabase({t: TacInfo("Maker", f"Model {t}") for t in tacs},
                     barred=[tacs[1], tacs[2]],
                     svn_rules=[SvnRule(tacs[3], frozenset({"01", "02"}),
                                        EquipmentStatus.GREYLISTED, "old firmware")])
    entries = [make_entry(rng.choice(("black", "grey", "white")),
                          f"{rng.choice(tacs)}{rng.randrange(1_000_000):06d}", reason="x")
               for _ in range(20_000)]
    for _ in range(2_000):
        start = rng.randrange(10**13, 10**14 - 10**6)
        entries.append(make_entry("grey", f"{start:014d}", f"{start + rng.randrange(10**6):014d}"))
    # De-duplicate exact IMEIs (random collisions would be load errors).
    seen: set[str] = set()
    uniq = [e for e in entries if not (e.exact and (e.start in seen or seen.add(e.start)))]
    config = PolicyConfig(unallocated_tac=EquipmentStatus.GREYLISTED)
    return Policy(config, LocalLists(uniq), db), tacs


def bench(fn, reqs: list, records: list, repeat: int, total: int) -> float:
    """Best ns per call over `repeat` runs of `total` calls cycling through `reqs`."""
    rounds = max(1, total // len(reqs))
    pairs = list(zip(reqs, records, strict=True))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for _ in range(rounds):
            for req, rec in pairs:
                fn(req, rec, TODAY)
        best = min(best, (time.perf_counter_ns() - t0) / (rounds * len(pairs)))
    return best


def _noop(req, rec, today) -> None:
    return None


def measure(n: int, hot: int, repeat: int, show: bool = False,
            n_tacs: int = 200_000) -> dict[str, tuple[float, float]]:
    """ns per decision (hot, cold) by scenario, loop overhead subtracted."""
    args = argparse.Namespace(n=n, hot=hot, repeat=repeat)
    rng = random.Random(42)
    policy, tacs = build_policy(rng, n_tacs)
    n = args.n

    def bodies(k: int) -> list[str]:
        return [f"{rng.choice(tacs)}{rng.randrange(1_000_000):06d}" for _ in range(k)]

    b = bodies(n)
    none = [None] * n
    local_body = next(iter(policy.local.exact)) if policy.local else b[0]
    bl = ImeiRecord(blacklist=BlacklistEntry("20240101", ("stolen",)))
    grace = ImeiRecord(notifications=(NotificationEntry("001010000000001", "", "20991231",
                                                        ("duplicate",)),))
    paired = ImeiRecord(blacklist=BlacklistEntry("20240101", ("stolen",)),
                        exceptions=(ExceptionEntry("001010000000001"),))
    scenarios = [
        ("14-digit IMEI, no record (common case)", [CheckRequest(x) for x in b], none),
        ("15-digit IMEI (Luhn checked), no record",
         [CheckRequest(x + luhn_check_digit(x)) for x in b], none),
        ("14-digit IMEI + SVN, no record", [CheckRequest(x, "07") for x in b], none),
        ("16-digit IMEISV, no record", [CheckRequest(x + "07") for x in b], none),
        ("TAC unallocated, no record",
         [CheckRequest(f"99{rng.randrange(10**12):012d}") for _ in range(n)], none),
        ("local exact list hit", [CheckRequest(local_body)] * n, none),
        ("malformed: bad check digit",
         [CheckRequest(x + str((int(luhn_check_digit(x)) + 1) % 10 or 1)) for x in b], none),
        ("malformed: non-digit", [CheckRequest("35209900x76148")] * n, none),
        ("national blacklist record", [CheckRequest(x) for x in b], [bl] * n),
        ("notification grace record", [CheckRequest(x, None, "001010000000001") for x in b],
         [grace] * n),
        ("blacklisted + exception pair", [CheckRequest(x, None, "001010000000001") for x in b],
         [paired] * n),
    ]
    hot = args.hot
    base_hot = bench(_noop, scenarios[0][1][:hot], none[:hot], args.repeat, n)
    base_cold = bench(_noop, scenarios[0][1], none, args.repeat, n)
    out: dict[str, tuple[float, float]] = {}
    if show:
        print(f"Python {sys.version.split()[0]}; best of {args.repeat}; ns per call, "
              f"minus an empty call ({base_hot:.0f} / {base_cold:.0f} ns)")
        print(f"{'scenario':<44} {'hot':>7} {'cold':>7}")
    for label, reqs, recs in scenarios:
        h = bench(policy.decide, reqs[:hot], recs[:hot], args.repeat, n) - base_hot
        c = bench(policy.decide, reqs, recs, args.repeat, n) - base_cold
        out[label] = (h, c)
        if show:
            print(f"{label:<44} {h:7.0f} {c:7.0f}")
    if not show:
        return out
    keyreqs = [r.imei for r in scenarios[1][1]]
    for label, keys in (("imei_key(15-digit)", keyreqs), ("imei_key(14-digit)",
                                                          [r.imei for r in scenarios[0][1]])):
        h = bench(lambda k, _r, _t: policy.imei_key(k), keys[:hot], none[:hot], args.repeat, n)
        c = bench(lambda k, _r, _t: policy.imei_key(k), keys, none, args.repeat, n)
        print(f"{label + ' (+ lambda)':<44} {h - base_hot:7.0f} {c - base_cold:7.0f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--hot", type=int, default=2_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    measure(args.n, args.hot, args.repeat, show=True)


if __name__ == "__main__":
    main()

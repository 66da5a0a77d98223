"""The JSON report, the exit code and the plot of a load run (pure, apart from writing files)."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from .client import LoadConfig, Stats
from .hist import Histogram
from .imeis import NOT_CHECKED, STATUS_NAMES, UNKNOWN_EQUIPMENT

# Exit codes: a script can tell what went wrong without parsing the report.
EXIT_OK = 0
EXIT_MISMATCH = 1  # answers that contradict the expected status, or malformed answers
EXIT_USAGE = 2  # bad flags or IMEI file (argparse's own code)
EXIT_CONNECTION = 3  # could not connect, CEA not 2001, or a connection lost during the run
EXIT_TIMEOUTS = 4  # timeouts above --max-timeouts (share of requests)
EXIT_NO_ANSWERS = 5  # connected but not a single answer in the measured window

PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))


def describe(value: int, rc: int, exp: int) -> str:
    if value == -2:
        return "malformed"
    if rc >= 0:
        return f"Result-Code {rc}"
    return f"Experimental-Result {exp}"


def latency_ms(h: Histogram) -> dict[str, float]:
    out = {name: h.percentile(p) / 1000 for name, p in PERCENTILES}
    out["max"] = h.max / 1000
    out["mean"] = round(h.mean() / 1000, 3)
    return out


def build(cfg: LoadConfig, st: Stats, *, mode: str, imei_source: str, listed: str | None,
          listed_share: float, max_mismatches: int, max_timeouts: float) -> dict[str, Any]:
    results: dict[str, int] = {}
    statuses: dict[str, int] = {}
    problems: dict[str, int] = {}
    malformed = 0
    for (value, rc, exp, problem), n in sorted(st.classes.items(), key=lambda kv: -kv[1]):
        key = describe(value, rc, exp)
        results[key] = results.get(key, 0) + n
        if value == -2:
            malformed += n
            problems[problem] = problems.get(problem, 0) + n
        elif rc == 2001:
            name = STATUS_NAMES.get(value, str(value))
            statuses[name] = statuses.get(name, 0) + n
    measured = sum(st.classes.values())
    # answers that carry a verdict: 2001 with Equipment-Status, or Experimental-Result 5422
    verdicts = sum(n for (value, rc, exp, _), n in st.classes.items()
                   if value != -2 and (rc == 2001 or exp == UNKNOWN_EQUIPMENT))
    elapsed = max(st.elapsed, 1e-9)
    code, reason = EXIT_OK, "ok"
    sent_measured = measured + st.timeouts
    if st.conn_failures:
        code, reason = EXIT_CONNECTION, st.conn_failures[0]
    elif st.mismatches + malformed > max_mismatches:
        code, reason = EXIT_MISMATCH, (f"{st.mismatches} mismatches and {malformed} malformed "
                                       f"answers (allowed {max_mismatches})")
    elif st.timeouts > max_timeouts * max(sent_measured, 1):
        code, reason = EXIT_TIMEOUTS, (f"{st.timeouts} timeouts of {sent_measured} requests "
                                       f"(allowed share {max_timeouts:g})")
    elif measured == 0:
        code, reason = EXIT_NO_ANSWERS, "no answers in the measured window"
    elif verdicts == 0 and all(e.expected == NOT_CHECKED for e in cfg.entries):
        # Nothing to compare with when no expected statuses are given, but a run in which
        # the EIR only ever answered errors (a wrong realm: 3003; a fallback of too_busy: 3004)
        # is no passing test. (Expected Result-Codes, e.g. 5004, make errors the verdicts.)
        code, reason = EXIT_MISMATCH, (f"no answer was a verdict (2001 or 5422): all {measured} "
                                       "were errors (see results)")
    rate = cfg.rate
    return {
        "tool": "eir-server load",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - elapsed)),
        "config": {
            "target": f"{cfg.host}:{cfg.port}", "protocol": "s13",
            "connections": cfg.connections,
            "mode": mode,
            "inflight": cfg.inflight if rate is None else None,
            "rate": None if rate is None else {"start": rate[0], "end": rate[1]},
            "duration_s": cfg.duration, "warmup_s": cfg.warmup, "timeout_s": cfg.timeout,
            "origin_host": cfg.me.origin_host, "origin_realm": cfg.me.origin_realm,
            "destination_realm": cfg.me.destination_realm,
            "destination_host": cfg.me.destination_host,
            "imeis": imei_source, "imei_count": len(cfg.entries),
            "listed": listed, "listed_share": listed_share if listed else 0.0,
            "max_mismatches": max_mismatches, "max_timeouts": max_timeouts,
        },
        "duration_s": round(st.elapsed, 3),
        "t0_unix": round(st.t0_unix, 3),
        "stopped_early": st.stopped_early,
        "requests": sent_measured,
        "answers": measured,
        "throughput_per_s": round(measured / elapsed, 1),
        "latency_ms": latency_ms(st.total),
        "latency_histogram_us": st.total.to_pairs(),
        "results": results,
        "statuses": statuses,
        "expected_checked": any(e.expected >= 0 for e in cfg.entries),
        "mismatches": st.mismatches,
        "mismatch_examples": st.mismatch_examples,
        "malformed": malformed,
        "malformed_reasons": problems,
        "timeouts": st.timeouts,
        "late_or_unknown_answers": st.late,
        "warmup_answers": st.warmup_answers,
        "connections": {"requested": cfg.connections, "up": st.conn_up,
                        "lost": st.conn_lost, "failures": st.conn_failures[:20],
                        "dwr_answered": st.dwr_answered, "dpa_received": st.dpa_received},
        "generator": {
            "cpu_s": round(st.cpu, 3),
            # per request sent in the measured window (answered or timed out)
            "cpu_us_per_request": round(st.cpu / max(sent_measured, 1) * 1e6, 2),
            "cpu_share_of_one_core": round(st.cpu / elapsed, 3),
            "open_loop_max_lag_ms": round(st.open_loop_late_ms, 2) if rate else None,
            "python": platform.python_version(), "uvloop": _uvloop_version(),
        },
        "machine": {"cpus": os.cpu_count(), "busy_cpus_during_run": round(st.busy_cpus, 2),
                    "loadavg": [round(x, 2) for x in os.getloadavg()],
                    "platform": platform.platform()},
        "timeline": [{"t": round(s.t, 3), "sent": s.sent, "answers": s.answers,
                      "errors": s.errors, "timeouts": s.timeouts,
                      "p50_ms": s.hist.percentile(50) / 1000,
                      "p99_ms": s.hist.percentile(99) / 1000,
                      "p99.9_ms": s.hist.percentile(99.9) / 1000,
                      "max_ms": s.hist.max / 1000, "warmup": s.t < cfg.warmup}
                     for s in st.timeline],
        "exit_code": code,
        "exit_reason": reason,
    }


def _uvloop_version() -> str | None:
    try:
        import uvloop
    except ImportError:
        return None
    return str(uvloop.__version__)


def summary(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    gen = r["generator"]
    lines = [
        f"target {r['config']['target']}  {r['config']['connections']} connections  "
        f"{r['config']['mode']}  {r['duration_s']:.1f} s measured",
        f"answers {r['answers']:,}  ({r['throughput_per_s']:,.0f}/s)  timeouts {r['timeouts']:,}"
        f"  mismatches {r['mismatches']:,}  malformed {r['malformed']:,}",
        "latency ms  " + "  ".join(f"{k} {lat[k]:.2f}" for k in ("p50", "p90", "p99", "p99.9",
                                                                  "max")),
        "results     " + ", ".join(f"{k}: {v:,}" for k, v in r["results"].items()),
        "statuses    " + ", ".join(f"{k}: {v:,}" for k, v in r["statuses"].items()),
        f"generator   {gen['cpu_us_per_request']:.1f} µs CPU per request, "
        f"{gen['cpu_share_of_one_core'] * 100:.0f} % of one core; machine busy "
        f"{r['machine']['busy_cpus_during_run']:.2f} of {r['machine']['cpus']} CPUs",
        f"exit {r['exit_code']}: {r['exit_reason']}",
    ]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path, title: str | None = None,
         spans: list[tuple[float, float, str]] | None = None) -> None:
    """Throughput and latency percentiles per second (needs matplotlib); `spans` shade
    intervals of the run (seconds, label), e.g. when a register load ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = r["timeline"]
    t = [s["t"] + 0.5 for s in tl]  # the middle of each second
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a1.plot(t, [s["answers"] for s in tl], label="answers/s")
    a1.plot(t, [s["sent"] for s in tl], label="sent/s", linestyle=":")
    errs = [s["errors"] + s["timeouts"] for s in tl]
    if any(errs):
        a1.plot(t, errs, label="errors + timeouts /s", color="red")
    a1.set_ylabel("per second")
    a1.legend(loc="lower right", fontsize=8)
    for key in ("p50_ms", "p99_ms", "p99.9_ms", "max_ms"):
        a2.plot(t, [max(s[key], 0.001) for s in tl], label=key.replace("_ms", ""))
    a2.set_yscale("log")
    a2.set_ylabel("latency ms")
    a2.set_xlabel("seconds into the run")
    a2.legend(loc="upper right", fontsize=8)
    warm = r["config"]["warmup_s"]
    if warm:
        for a in (a1, a2):
            a.axvspan(0, warm, color="grey", alpha=0.15)
    for start, end, label in spans or []:
        for a in (a1, a2):
            a.axvspan(start, end, color="orange", alpha=0.2, label=label if a is a1 else None)
        a1.legend(loc="lower right", fontsize=8)
    fig.suptitle(title or f"eir-server load → {r['config']['target']} ({r['config']['mode']})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def eprint(*a: object) -> None:
    print(*a, file=sys.stderr)

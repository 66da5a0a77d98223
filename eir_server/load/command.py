"""`eir-server load`: argument parsing and the run (exit codes in report.py)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from .imeis import MAX_RANGE, load_source, mix

EPILOG = """Exit codes: 0 ok; 1 answers contradicting an expected status (or malformed answers)
above --max-mismatches, or with no expected statuses given, not one answer a verdict; 2 usage;
3 a connection failed (refused, CEA not 2001, lost or DPR'd during the run); 4 timeouts above
--max-timeouts (share of requests); 5 no answer at all.

IMEI file lines: imei[,expected[,sv[,imsi]]], expected one of whitelisted|blacklisted|greylisted
|unknown|0|1|2 or a Result-Code (e.g. 5004); '#' starts a comment. N5g-eir (HTTP/2): use h2load
(see README, Performance)."""


def _rate(text: str) -> tuple[float, float]:
    parts = text.split(":")
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"rate {text!r}: R or START:END per second") from None
    if len(vals) not in (1, 2) or min(vals) <= 0 or not all(map(math.isfinite, vals)):
        raise argparse.ArgumentTypeError(f"rate {text!r}: R or START:END, positive")
    return (vals[0], vals[-1])


def _positive(kind: type) -> Any:
    def conv(text: str) -> Any:
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{text}: must be > 0")
        return v
    return conv


def add_load_parser(sub: Any) -> None:
    p = sub.add_parser("load", help="S13 load generator for any EIR (closed or open loop, "
                       "answers checked, JSON report)", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="127.0.0.1:3868", metavar="HOST:PORT",
                   help="the EIR's S13 address (default 127.0.0.1:3868)")
    p.add_argument("--connections", type=_positive(int), default=4, metavar="N",
                   help="Diameter connections, one Origin-Host each (default 4)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--inflight", type=_positive(int), default=None, metavar="K",
                      help="closed loop: K requests outstanding per connection (default 64)")
    mode.add_argument("--rate", type=_rate, default=None, metavar="R|START:END",
                      help="open loop: requests per second over all connections, or a linear "
                      "ramp START:END over warmup + duration; latency from the scheduled time")
    p.add_argument("--pacing", choices=("tick", "exact"), default="tick",
                   help="open loop: tick sends what is due every 1 ms, one write per tick (the "
                   "default, cheap); exact sends each request at its scheduled time, spinning a "
                   "CPU (smooth arrivals, as from many devices; pin it with --pin)")
    p.add_argument("--duration", type=_positive(float), default=10.0, metavar="S",
                   help="measured seconds (default 10)")
    p.add_argument("--warmup", type=float, default=1.0, metavar="S",
                   help="seconds of load before measuring (default 1)")
    p.add_argument("--timeout", type=_positive(float), default=2.0, metavar="S",
                   help="an answer later than this is a timeout (default 2)")
    p.add_argument("--imeis", default="range:35209900000000:100000",
                   metavar="FILE|range:START:COUNT",
                   help="IMEIs to send, in order (default range:35209900000000:100000)")
    p.add_argument("--listed", metavar="FILE",
                   help="second IMEI file (e.g. register entries with expected statuses) mixed "
                   "in at --listed-share")
    p.add_argument("--listed-share", type=float, default=0.1, metavar="F",
                   help="share of requests drawn from --listed (default 0.1)")
    p.add_argument("--origin-host", default="mme{n}.load.localdomain",
                   help="our Origin-Host; {n} becomes the connection number "
                   "(default mme{n}.load.localdomain)")
    p.add_argument("--origin-realm", default="load.localdomain")
    p.add_argument("--destination-realm", default="localdomain",
                   help="the EIR's realm (default localdomain)")
    p.add_argument("--destination-host", default=None, help="the EIR's Origin-Host (optional)")
    p.add_argument("--json", metavar="FILE", help="write the JSON report here ('-': stdout)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="latency percentiles and throughput over time (needs matplotlib)")
    p.add_argument("--max-mismatches", type=int, default=0, metavar="N",
                   help="mismatches + malformed answers tolerated before exit 1 (default 0)")
    p.add_argument("--max-timeouts", type=float, default=0.001, metavar="SHARE",
                   help="share of requests allowed to time out before exit 4 (default 0.001)")
    p.add_argument("--pin", type=int, default=None, metavar="CPU",
                   help="pin the generator to this CPU")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="live progress line on stderr (auto: when stderr is a terminal)")


def run_load(args: argparse.Namespace) -> int:
    from ..diameter.dictionary import load_dictionary
    from . import report
    from .client import LoadConfig, _stderr_progress, run
    from .s13 import Identity

    host, _, port_s = args.target.rpartition(":")
    if not host or not port_s.isdigit():
        print(f"eir-server load: --target {args.target!r}: expected HOST:PORT", file=sys.stderr)
        return report.EXIT_USAGE
    if args.connections > 1 and "{n}" not in args.origin_host:
        print("eir-server load: --origin-host needs {n} with several connections (one "
              "Origin-Host per connection)", file=sys.stderr)
        return report.EXIT_USAGE
    if not 0 <= args.listed_share <= 1:
        print("eir-server load: --listed-share must be within 0..1", file=sys.stderr)
        return report.EXIT_USAGE
    if args.pacing == "exact" and args.rate is None:
        print("eir-server load: --pacing exact is for the open loop (--rate)", file=sys.stderr)
        return report.EXIT_USAGE
    progress = {"on": True, "off": False, "auto": sys.stderr.isatty()}[args.progress]
    if progress:  # a range of millions takes a minute to build before the first connection
        sys.stderr.write(f"preparing the requests of {args.imeis} ...\n")
        sys.stderr.flush()
    try:
        base = load_source(args.imeis)
        listed = load_source(args.listed) if args.listed else []
    except ValueError as e:
        print(f"eir-server load: {e}", file=sys.stderr)
        return report.EXIT_USAGE
    share = args.listed_share if listed else 0.0
    n = len(listed) if share >= 1 else min(MAX_RANGE, math.ceil(len(base) / (1 - share)))
    entries = mix(base, listed, share, max(n, 1))
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})
    cfg = LoadConfig(
        host=host.strip("[]"), port=int(port_s),
        me=Identity(args.origin_host, args.origin_realm, args.destination_realm,
                    args.destination_host),
        entries=entries, connections=args.connections, inflight=args.inflight or 64,
        rate=args.rate, pacing=args.pacing, duration=args.duration, warmup=max(args.warmup, 0.0),
        timeout=min(args.timeout, 3600.0),
        progress=_stderr_progress if progress else None)
    mode = (f"closed loop, {cfg.inflight} in flight per connection" if args.rate is None
            else f"open loop, {args.rate[0]:g}" + (f" to {args.rate[1]:g}" if args.rate[1] !=
                                                   args.rate[0] else "") + " requests/s"
            + (", exact pacing" if args.pacing == "exact" else ""))
    t0 = time.monotonic()
    stats = run(cfg, load_dictionary())
    if progress:
        sys.stderr.write("\n")
    r = report.build(cfg, stats, mode=mode, imei_source=args.imeis, listed=args.listed,
                     listed_share=share, max_mismatches=args.max_mismatches,
                     max_timeouts=args.max_timeouts)
    r["wall_s"] = round(time.monotonic() - t0, 3)
    if args.json == "-":
        json.dump(r, sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif args.json:
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
    print(report.summary(r), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.plot:
        try:
            report.plot(r, Path(args.plot))
        except ImportError:
            print("eir-server load: --plot needs matplotlib (pip install matplotlib)",
                  file=sys.stderr)
    return int(r["exit_code"])

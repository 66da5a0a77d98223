"""`eir-server sync`: feed the Redis register from a DIRBS-style national register."""

from __future__ import annotations

import argparse
import os
import signal
import ssl
import time
from pathlib import Path
from typing import Any

import structlog

from eir_server.store.register import MAX_LINE, MAX_REASONS, Limits, RegisterError
from eir_server.store.urls import parse_store_url

from .engine import SyncOptions, run_once
from .progress import LAST_DURATION, LAST_SUCCESS, RUNS, Progress
from .redis_db import RegisterDB, StoreBusy, SwitchConflict
from .source import SourceError, open_source, tls_context

log = structlog.get_logger("eir.sync")

EXIT_OK = 0
EXIT_REFUSED = 1  # bad input: a file was refused; its list (or the whole run) kept its version
EXIT_USAGE = 2
EXIT_STORE = 3  # Redis unreachable or another sync running / raced: retry later
EXIT_SOURCE = 4  # source unreadable (network, permissions): retry later


def add_sync_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sync",
        help="load the national register (DIRBS lists) into the Redis store",
        description=(
            "Ingest DIRBS-style register zips (blacklist, notifications_<op>, exceptions_<op>) "
            "into Redis as a new version and switch to it atomically. Deltas are applied when "
            "they follow the served run id; any gap triggers a full load. Exit codes: 0 ok or "
            "nothing to do, 1 input refused, 2 usage, 3 store busy/unreachable, 4 source unreadable."
        ),
    )
    p.add_argument(
        "--source",
        required=True,
        metavar="PATH_OR_URL",
        help="directory holding the zips, or http(s) URL of an index page or one zip",
    )
    p.add_argument(
        "--store",
        # From the environment by default: the URL carries the Redis password, which should
        # not show in process listings.
        default=os.environ.get("EIR_STORE") or None,
        required=not os.environ.get("EIR_STORE"),
        metavar="URL",
        help="redis://, rediss://, unix://, redis+sentinel://, redis+cluster:// URL "
        "(default: $EIR_STORE)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="run once and exit (default)")
    mode.add_argument(
        "--interval",
        type=float,
        metavar="S",
        help="keep running, checking the source every S seconds",
    )
    p.add_argument(
        "--max-bad-share",
        type=float,
        default=0.01,
        metavar="F",
        help="refuse a file when more than this share of its rows is malformed (default 0.01)",
    )
    p.add_argument(
        "--max-shrink",
        type=float,
        default=0.10,
        metavar="F",
        help="refuse a list whose entries drop by more than this share versus the served "
        "version; an empty or header-only full list is refused too (default 0.10)",
    )
    p.add_argument(
        "--allow-shrink",
        action="store_true",
        help="accept a list that shrank past --max-shrink, or an empty list",
    )
    p.add_argument(
        "--max-line-bytes",
        type=int,
        default=MAX_LINE,
        metavar="N",
        help=f"refuse a file at its first line longer than this (default {MAX_LINE})",
    )
    p.add_argument(
        "--max-reasons-bytes",
        type=int,
        default=MAX_REASONS,
        metavar="N",
        help=f"a row whose reasons field is longer is a bad row (default {MAX_REASONS})",
    )
    p.add_argument(
        "--max-member-bytes",
        type=int,
        default=16 << 30,
        metavar="N",
        help="refuse a zip whose member inflates to more than this (default 16 GiB)",
    )
    p.add_argument("--force-full", action="store_true", help="do a full load even if deltas apply")
    p.add_argument(
        "--allow-missing-lists",
        action="store_true",
        help="drop served lists that the source no longer publishes (default: refuse)",
    )
    p.add_argument(
        "--compact-threshold",
        type=int,
        default=200_000,
        metavar="N",
        help="overlay entries (IMEIs changed since the last full load) beyond which a "
        "delta run becomes a full load (default 200000)",
    )
    p.add_argument(
        "--bucket-size",
        type=int,
        default=None,
        metavar="N",
        help="target IMEIs per Redis hash bucket (default: 3/4 of the server's "
        "hash-max-listpack-entries, i.e. 96 with Redis' default 128)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=2.0,
        metavar="S",
        help="wait between the switch and deleting the old version (default 2)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="where HTTP downloads are kept for conditional GETs "
        "(default $XDG_CACHE_HOME/eir-server/sync)",
    )
    p.add_argument("--http-timeout", type=float, default=60.0, metavar="S", help="default 60")
    p.add_argument(
        "--ca-file",
        default=None,
        metavar="PEM",
        help="verify https:// sources against only the CA certificates in this PEM file "
        "(a private CA); default: the system trust store",
    )
    p.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="progress bar on a terminal (auto), or log lines every 10 s otherwise",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics of the sync process on this port",
    )
    p.set_defaults(func=run_sync)


def _cache_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "eir-server" / "sync"


def _one(
    args: argparse.Namespace,
    db: RegisterDB,
    opts: SyncOptions,
    tls: ssl.SSLContext | None = None,
) -> int:
    try:
        source = open_source(args.source, _cache_dir(args.cache_dir), args.http_timeout, tls)
        result = run_once(source, db, opts)
    except RegisterError as e:
        RUNS.labels("refused").inc()
        log.error("sync refused input; previous version keeps serving", error=str(e))
        return EXIT_REFUSED
    except SourceError as e:
        RUNS.labels("source_error").inc()
        log.error("sync source unreadable; previous version keeps serving", error=str(e))
        return EXIT_SOURCE
    except (StoreBusy, SwitchConflict) as e:
        RUNS.labels("busy").inc()
        log.error("sync not applied", error=str(e))
        return EXIT_STORE
    except Exception as e:  # noqa: BLE001 - report, never a traceback (--interval goes on)
        from redis.exceptions import RedisError

        if isinstance(e, RedisError | OSError):
            RUNS.labels("store_error").inc()
            log.error(
                "sync failed talking to the store; previous version keeps serving", error=repr(e)
            )
            return EXIT_STORE
        # Nothing was switched (the switch is the run's last step); say where it broke.
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else "?"
        RUNS.labels("failed").inc()
        log.error(
            "sync failed (unexpected error, most likely on odd input); previous version keeps "
            "serving",
            error=repr(e),
            where=where,
        )
        return EXIT_REFUSED
    # One run, one count: a run that refused a list is `refused` (as serve exports it).
    RUNS.labels("refused" if result.refused else result.mode).inc()
    LAST_DURATION.set(result.duration_s)
    if result.version is None and not result.refused:
        # Nothing served and nothing found to serve: an empty directory, a wrong path or an
        # index page without register links. Not "nothing to do": no register exists.
        log.error(
            "sync source publishes no register files and the store has no register; "
            "nothing is served",
            source=args.source,
        )
        return EXIT_SOURCE
    if result.refused:
        log.error(
            "sync refused some list files; those lists keep their previous version",
            mode=result.mode,
            version=result.version,
            refused=result.refused,
        )
        return EXIT_REFUSED
    LAST_SUCCESS.set(time.time())
    log.info(
        "sync run done",
        **{k: v for k, v in result.as_dict().items() if k != "lists"},
        lists={k: v.get("run_id") for k, v in result.lists.items()},
    )
    return EXIT_OK


def run_sync(args: argparse.Namespace) -> int:
    if not args.store or args.store.startswith("memory"):
        log.error("sync needs a Redis store URL (the embedded store loads --register at serve)")
        return EXIT_USAGE
    try:
        target = parse_store_url(args.store)
    except ValueError as e:
        log.error("bad --store URL", error=str(e))
        return EXIT_USAGE
    tls = None
    if args.ca_file:
        try:
            tls = tls_context(args.ca_file)
        except (OSError, ssl.SSLError) as e:
            log.error("bad --ca-file: not a readable PEM file of CA certificates", error=str(e))
            return EXIT_USAGE
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port)
    if not 0 <= args.max_shrink <= 1:
        log.error("--max-shrink must be between 0 and 1", value=args.max_shrink)
        return EXIT_USAGE
    if not (
        64 <= args.max_line_bytes and 0 <= args.max_reasons_bytes and args.max_member_bytes > 0
    ):
        log.error("--max-line-bytes must be >= 64, the other bounds >= 0")
        return EXIT_USAGE
    opts = SyncOptions(
        max_shrink=args.max_shrink,
        allow_shrink=args.allow_shrink,
        limits=Limits(args.max_line_bytes, args.max_reasons_bytes),
        max_member_bytes=args.max_member_bytes,
        max_bad_share=args.max_bad_share,
        bucket_size=args.bucket_size,
        compact_threshold=args.compact_threshold,
        grace=args.grace,
        force_full=args.force_full,
        allow_missing_lists=args.allow_missing_lists,
        progress=Progress(args.progress),
    )
    db = RegisterDB(target, target.options.get("namespace", "eir"))
    try:
        if not args.interval:
            return _one(args, db, opts, tls)
        stop = False

        def _stop(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, _stop)
        rc = EXIT_OK
        while not stop:
            started = time.monotonic()
            rc = _one(args, db, opts, tls)
            opts.force_full = False  # only the first run is forced
            while not stop and time.monotonic() - started < args.interval:
                time.sleep(min(0.5, args.interval))
        return rc
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        db.close()

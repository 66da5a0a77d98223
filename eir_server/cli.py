"""`eir-server` command line: serve, check, sync, export, load, dictionary."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import __version__, build_kind
from .config import OPTIONS, load_config

EPILOG = """Every serve option is also a TOML key in --config FILE (dashes -> underscores, e.g.
diameter_listen = "0.0.0.0:3868") and an environment variable EIR_<NAME> (e.g.
EIR_DIAMETER_LISTEN). Precedence: flag > environment > file > default. The [policy] table of the
TOML file configures the verdict policy (see README)."""


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the EIR (S13 Diameter)", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    for f in OPTIONS:
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"help": f.metadata["help"], "default": None,
                                  "dest": f.name}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        kwargs["type"] = {"int": int, "float": float}.get(str(f.type), str)
        kwargs["help"] += f" (default: {f.default!r})"
        p.add_argument(flag, **kwargs)


# `eir-server check` exit codes: 0-3 are verdicts, so failures use codes no verdict has.
CHECK_EXIT_USAGE = 4  # bad arguments or configuration
CHECK_EXIT_STORE = 5  # the store (Redis, or the embedded register files) cannot answer


def _add_check(sub: Any) -> None:
    p = sub.add_parser("check", help="print the verdict for an IMEI and why; exit code = status "
                       "(0 whitelisted, 1 blacklisted, 2 greylisted, 3 unknown; "
                       "4 usage or configuration error, 5 store unavailable)")
    p.add_argument("imei", help="IMEI (14 or 15 digits) or IMEISV (16 digits)")
    p.add_argument("--imsi", help="IMSI used with the device (exception pairing)")
    p.add_argument("--msisdn")
    p.add_argument("--software-version", help="2-digit SVN")
    p.add_argument("--date", help="evaluate as of this date (YYYYMMDD, default today UTC)")
    p.add_argument("--config", metavar="FILE", help="TOML configuration file ([policy], store)")
    p.add_argument("--store", metavar="URL", help="store URL (default memory://)")
    p.add_argument("--register", metavar="DIR", help="register directory for the embedded store")
    p.add_argument("--unknown-equipment", choices=("whitelisted", "greylisted", "blacklisted",
                                                   "unknown"))


def _add_log_options(p: argparse.ArgumentParser) -> None:
    """--log-format / --log-level with the same EIR_* environment defaults as `serve`."""
    p.add_argument("--log-format", choices=("auto", "json", "console"),
                   default=os.environ.get("EIR_LOG_FORMAT", "auto"),
                   help="log format: json, console, or auto (console on a TTY; default "
                   "$EIR_LOG_FORMAT or auto)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   default=os.environ.get("EIR_LOG_LEVEL", "info"),
                   help="log level (default $EIR_LOG_LEVEL or info)")


STATUS_READY, STATUS_NOT_READY, STATUS_USAGE, STATUS_UNREACHABLE = 0, 1, 2, 3


def _add_status(sub: Any) -> None:
    p = sub.add_parser("status", help="show a running node: readiness, register, store, sync, "
                       "peers (Origin-Host, state, rates), workers; exit 0 ready, 1 not ready, "
                       "3 unreachable")
    listen = os.environ.get("EIR_METRICS_LISTEN", "127.0.0.1:9868") or "127.0.0.1:9868"
    host, _, port = listen.rpartition(":")
    host = "127.0.0.1" if host in ("", "0.0.0.0", "[::]", "::") else host.strip("[]")
    p.add_argument("--url", default=f"http://{host}:{port}",
                   help="the node's metrics listener (default from $EIR_METRICS_LISTEN, "
                   "else http://127.0.0.1:9868)")
    p.add_argument("--json", action="store_true", help="print the /status JSON document")


def _status(args: argparse.Namespace) -> int:
    import json
    import urllib.error
    import urllib.request

    from .obs.status import render_text
    url = args.url.rstrip("/") + "/status"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            doc = json.loads(r.read())
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        print(f"eir-server status: {url} unreachable: {reason}", file=sys.stderr)
        return STATUS_UNREACHABLE
    sys.stdout.write(json.dumps(doc, indent=1) + "\n" if args.json else render_text(doc))
    return STATUS_READY if doc["ready"]["ok"] else STATUS_NOT_READY


def _add_dictionary(sub: Any) -> None:
    sub.add_parser("dictionary", help="print the compiled Diameter dictionary as XML")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eir-server", description=(
        "Equipment Identity Register: answers S13 ME-Identity-Check (TS 29.272) from the "
        "national device register."))
    parser.add_argument("--version", action="version",
                        version=f"eir-server {__version__} ({build_kind()})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve(sub)
    _add_check(sub)
    _add_status(sub)
    try:
        from .sync.command import add_sync_parser, run_sync
    except ImportError:  # pragma: no cover - only while the sync package is incomplete
        run_sync = None
    else:
        add_sync_parser(sub)
        _add_log_options(sub.choices["sync"])
    from .obs.export import add_export_parser, run_export
    add_export_parser(sub)
    from .load.command import add_load_parser, run_load
    add_load_parser(sub)
    _add_dictionary(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        # argparse exits 2 on a usage error, which for `check` would read as GREYLISTED.
        if e.code == 2 and _command_of(argv) == "check":
            return CHECK_EXIT_USAGE
        raise
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "serve":
        return _serve(args)
    if args.command == "check":
        return _check(args)
    if args.command == "status":
        return _status(args)
    if args.command == "sync" and run_sync is not None:
        import structlog

        from .obs.logging import configure_logging
        if not structlog.is_configured():  # an embedding program (or a test) may have done it
            configure_logging(args.log_format, args.log_level)
        return run_sync(args)
    if args.command == "export":
        return run_export(args)
    if args.command == "load":
        return run_load(args)
    if args.command == "dictionary":
        from .diameter.dictionary import emit_xml, load_dictionary
        sys.stdout.write(emit_xml(load_dictionary()))
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


def _command_of(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _serve(args: argparse.Namespace) -> int:
    from .io.app import serve
    from .obs.logging import configure_logging
    overrides = {f.name: getattr(args, f.name) for f in OPTIONS}
    try:
        cfg = load_config(args.config, overrides=overrides)
    except (OSError, ValueError) as e:
        print(f"eir-server: configuration error: {e}", file=sys.stderr)
        return 2
    configure_logging(cfg.log_format, cfg.log_level)
    from .store.register import RegisterError
    try:
        # SIGHUP reads the file and the environment again; the flags stay as given.
        return serve(cfg, reload=lambda: load_config(args.config, overrides=overrides))
    except (OSError, ValueError, RegisterError) as e:  # e.g. a refused --register file
        print(f"eir-server: {e}", file=sys.stderr)
        return 1


def _check(args: argparse.Namespace) -> int:
    from .io.app import build_policy
    from .obs.logging import configure_logging
    configure_logging("console", "error", stream=sys.stderr)  # stdout is the explanation
    from .policy import exit_code_for, explain
    from .policy.types import CheckRequest
    from .store import MISSING, StoreUnavailable, open_store
    from .store.register import RegisterError
    overrides: dict[str, Any] = {"store": args.store, "register": args.register,
                                 "unknown_equipment": args.unknown_equipment}
    try:
        cfg = load_config(args.config, overrides=overrides)
        policy = build_policy(cfg)
    except (OSError, ValueError) as e:
        print(f"eir-server check: configuration error: {e}", file=sys.stderr)
        return CHECK_EXIT_USAGE
    today = args.date or time.strftime("%Y%m%d", time.gmtime())
    from .store.register import valid_date
    if not valid_date(today):  # the policy compares YYYYMMDD strings: others give wrong verdicts
        print(f"eir-server check: --date {today!r}: expected YYYYMMDD", file=sys.stderr)
        return CHECK_EXIT_USAGE
    req = CheckRequest(args.imei, args.software_version, args.imsi, args.msisdn)

    async def lookup() -> Any:
        store = open_store(cfg.store if cfg.store != "memory://" else None, cfg.register or None)
        await store.start()
        try:
            key = policy.imei_key(req.imei)
            if key is None:
                return None
            if not store.ready:
                raise StoreUnavailable(f"{store.name} store not reachable")
            if store.name != "memory" and store.version is None:
                raise StoreUnavailable("no register version in the store (run eir-server sync)")
            record = store.get_nowait(key)
            if record is MISSING:
                record = await store.fetch(key)
            return record
        finally:
            await store.close()

    try:
        record = asyncio.run(lookup())
    except ValueError as e:  # e.g. --register with a Redis URL
        print(f"eir-server check: configuration error: {e}", file=sys.stderr)
        return CHECK_EXIT_USAGE
    except (StoreUnavailable, RegisterError, OSError) as e:
        print(f"eir-server check: store unavailable: {e}", file=sys.stderr)
        return CHECK_EXIT_STORE
    verdict = policy.decide(req, record, today)
    print(explain(verdict, req, tacs=policy.tacs))
    return exit_code_for(verdict)


if __name__ == "__main__":
    sys.exit(main())

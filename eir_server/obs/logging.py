"""structlog set-up: JSON lines on stdout by default, a readable console format on a TTY.

House rules (docs/operations.md): one line per peer event, sync run, state change and error;
never one line per successful request at INFO. Errors about a message carry the peer, the
command, the hop-by-hop id and the Result-Code sent (`log_protocol_error`). Per-connection
loggers are bound once when the connection opens (`connection_logger`), so the hot path pays
nothing for context; debug calls are no-ops when the level is above debug.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import Processor

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def _rename_logger_name(logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    name = event.pop("logger_name_", None)
    if name is not None:
        event["logger"] = name
    elif "logger" not in event:
        # structlog.get_logger("eir.store") style: the name the module passed positionally
        event["logger"] = getattr(logger, "name", None) or "eir_server"
    return event


class _NamedWriteLoggerFactory(structlog.WriteLoggerFactory):
    """WriteLoggers that remember the name given to `structlog.get_logger(name)`, so every
    line carries a `logger` field whichever way the module asked for its logger."""

    def __call__(self, *args: Any) -> structlog.WriteLogger:
        logger = super().__call__()
        logger.name = str(args[0]) if args else ""  # type: ignore[attr-defined]
        return logger


def _renderer(fmt: str, stream: TextIO) -> tuple[list[Processor], Processor]:
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    if fmt == "json":
        return [structlog.processors.format_exc_info], structlog.processors.JSONRenderer()
    if fmt == "console":
        return [], structlog.dev.ConsoleRenderer(colors=stream.isatty())
    raise ValueError(f"log format must be auto, json or console, not {fmt!r}")


def configure_logging(
    fmt: str = "auto",
    level: str = "info",
    *,
    stream: TextIO | None = None,
    cache_loggers: bool = True,
) -> None:
    """Configure structlog and route the standard library's logging (redis, asyncio) the same way.

    fmt: "auto" (console on a TTY, else JSON), "json" or "console". level: debug..critical.
    Each record is one `write` of one line, so lines from forked workers sharing stdout do not
    interleave (lines stay under PIPE_BUF).
    """
    stream = stream if stream is not None else sys.stdout
    try:
        lvl = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}") from None
    extra, renderer = _renderer(fmt, stream)
    shared: list[Processor] = [
        _rename_logger_name,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, *extra, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=_NamedWriteLoggerFactory(file=stream),
        cache_logger_on_first_use=cache_loggers,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *extra,
                renderer,
            ],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)


def get_logger(name: str, **initial: Any) -> Any:
    """A structlog logger carrying `logger=name` (the stdlib-style logger name)."""
    # `logger` is a reserved keyword of structlog.get_logger(); pass it under another key and
    # rename it in the processor chain, so the logger stays lazy (configured on first use).
    return structlog.get_logger(logger_name_=name, **initial)


def connection_logger(peer: str, *, transport: str = "tcp", **context: Any) -> Any:
    """Bind once per connection: `peer` is "ip:port"; rebind origin_host after CER."""
    return get_logger("eir_server.diameter", peer=peer, transport=transport, **context)


def log_protocol_error(
    log: Any,
    event: str,
    *,
    command: str,
    hop_by_hop: int,
    result_code: int,
    level: str = "warning",
    **context: Any,
) -> None:
    """One line for an error answer or a dropped message, with the fields NOC tickets need."""
    getattr(log, level)(
        event,
        command=command,
        hop_by_hop=f"0x{hop_by_hop:08x}",
        result_code=result_code,
        **context,
    )

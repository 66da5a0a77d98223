from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from datetime import datetime

import pytest
import structlog

from eir_server.obs.logging import (
    configure_logging,
    connection_logger,
    get_logger,
    log_protocol_error,
)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_lines_with_iso_timestamp_level_and_logger() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", stream=buf, cache_loggers=False)
    log = get_logger("eir_server.sync")
    log.info("sync_done", version=42, rows=1000)
    log.debug("not shown at info")
    [rec] = lines(buf)
    assert rec["event"] == "sync_done"
    assert rec["level"] == "info"
    assert rec["logger"] == "eir_server.sync"
    assert rec["version"] == 42 and rec["rows"] == 1000
    assert datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).tzinfo is not None


def test_auto_is_json_when_not_a_tty() -> None:
    buf = io.StringIO()
    configure_logging("auto", "info", stream=buf, cache_loggers=False)
    get_logger("x").warning("hello")
    assert lines(buf)[0]["event"] == "hello"


def test_auto_is_console_on_a_tty() -> None:
    master, slave = os.openpty()
    with open(slave, "w", closefd=True) as tty:
        configure_logging("auto", "info", stream=tty, cache_loggers=False)
        get_logger("x").info("peer_up", peer="10.0.0.1:3868")
        tty.flush()
        out = os.read(master, 4096).decode()
    os.close(master)
    assert "peer_up" in out and "peer" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.strip())


def test_stdlib_loggers_come_out_in_the_same_format() -> None:
    buf = io.StringIO()
    configure_logging("json", "warning", stream=buf, cache_loggers=False)
    logging.getLogger("redis.connection").warning("reconnecting to %s", "redis:6379")
    logging.getLogger("redis.connection").info("dropped below warning")
    [rec] = lines(buf)
    assert rec["event"] == "reconnecting to redis:6379"
    assert rec["logger"] == "redis.connection"
    assert rec["level"] == "warning"


def test_protocol_error_line_carries_peer_command_hop_by_hop_and_result_code() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", stream=buf, cache_loggers=False)
    log = connection_logger("192.0.2.7:40123").bind(origin_host="mme1.example.net")
    log_protocol_error(log, "answer_error", command="ECR", hop_by_hop=0x1A2B, result_code=5005)
    [rec] = lines(buf)
    assert rec["peer"] == "192.0.2.7:40123"
    assert rec["origin_host"] == "mme1.example.net"
    assert rec["command"] == "ECR"
    assert rec["hop_by_hop"] == "0x00001a2b"
    assert rec["result_code"] == 5005
    assert rec["level"] == "warning"


def test_exceptions_are_rendered_into_the_json_line() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", stream=buf, cache_loggers=False)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger("x").exception("handler_crashed")
    [rec] = lines(buf)
    assert "RuntimeError: boom" in rec["exception"]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        configure_logging("xml", "info", stream=io.StringIO())
    with pytest.raises(ValueError):
        configure_logging("json", "loud", stream=io.StringIO())


def test_loggers_created_before_configuration_use_it() -> None:
    log = get_logger("early")  # e.g. created at import time
    buf = io.StringIO()
    configure_logging("json", "info", stream=buf, cache_loggers=False)
    log.info("late_event")
    [rec] = lines(buf)
    assert rec["logger"] == "early" and rec["event"] == "late_event"

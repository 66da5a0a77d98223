"""The standard `/readyz` check: listening, store usable, register loaded and fresh enough."""

from __future__ import annotations

import time
from collections.abc import Callable


def make_readiness(
    *,
    listening: Callable[[], bool],
    store_reachable: Callable[[], bool],
    fallback_allowed: bool,
    register_timestamp: Callable[[], float | None],
    max_register_age: float | None,
    register_required: bool = True,
    clock: Callable[[], float] = time.time,
) -> Callable[[], tuple[bool, str]]:
    """Build a readiness callable for `start_metrics_server` / `start_worker_snapshot_server`.

    listening: e.g. `server.is_serving` of the Diameter server.
    store_reachable: cheap, non-blocking (e.g. the store's last health-probe result).
    fallback_allowed: answers may come from `--unknown-equipment` when the store is down.
    register_timestamp: the register's own date (its newest list file's run timestamp, unix
        seconds), or None when no register is served.
    register_required: without a register, not ready (else a lab node serving only the
        default verdict is ready).
    max_register_age: `--max-register-age` seconds; None or <= 0 disables the age check.
    """

    def readiness() -> tuple[bool, str]:
        if not listening():
            return False, "diameter listener not serving"
        if not store_reachable() and not fallback_allowed:
            return False, "store unreachable and fallback not allowed"
        loaded_at = register_timestamp()
        if loaded_at is None:
            if register_required:
                return False, "register not loaded"
            return True, "ready (no register: default verdicts only)"
        if max_register_age is not None and max_register_age > 0:
            age = clock() - loaded_at
            if age > max_register_age:
                return False, f"register is {age:.0f} s old (max {max_register_age:.0f} s)"
        return True, "ready"

    return readiness

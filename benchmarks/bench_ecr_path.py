"""CPU cost of the ECR hot path without sockets: bytes in -> Connection -> S13Handler (checker,
duplicate cache, counters, audit hook with the device-signal detector, as `serve` wires them)
-> ECA bytes out, in batches as a pipelined peer delivers them: the production code of the
shell's data_received minus the socket, on the event loop the worker uses (uvloop), so the
audit task drains as it does there. Optionally profiles it.

    .venv/bin/python benchmarks/bench_ecr_path.py [--batch 64] [--n 200000] [--profile]

--devices is how many distinct devices (IMEI, IMSI pairs) the ECRs cycle through: 100,000 by
default, as `eir-server load` sends; more than the detector's per-period skip holds, so every
sighting is checked in full, as in a network where a device comes back minutes later. Each
device is seen once before the clock starts.
For counts that do not depend on the machine's load, run it under
`valgrind --tool=callgrind --callgrind-out-file=/dev/null` with --n 20000 and --n 40000 (and
`--refresh 1e9`: see bench_n5g_path.py) and take the difference over 20,000.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eir_server.checker import EquipmentChecker  # noqa: E402
from eir_server.diameter.answers import Identity  # noqa: E402
from eir_server.diameter.codec import decode, validate  # noqa: E402
from eir_server.diameter.connection import AppRequest, Connection, PeerConfig  # noqa: E402
from eir_server.diameter.dedup import DuplicateCache  # noqa: E402
from eir_server.diameter.dictionary import load_dictionary  # noqa: E402
from eir_server.load.imeis import parse_range  # noqa: E402
from eir_server.load.s13 import EcrTemplates, entry_block  # noqa: E402
from eir_server.load.s13 import Identity as PeerIdentity  # noqa: E402
from eir_server.load.s13 import cer as peer_cer  # noqa: E402
from eir_server.obs import audit as audit_module  # noqa: E402
from eir_server.obs.audit import AuditRecorder, DeviceChangeDetector  # noqa: E402
from eir_server.obs.metrics import Metrics  # noqa: E402
from eir_server.policy import Policy, PolicyConfig  # noqa: E402
from eir_server.s13.handler import S13Handler  # noqa: E402
from eir_server.service import CheckService  # noqa: E402
from eir_server.store import MemoryStore  # noqa: E402

MME = PeerIdentity("mme0.bench", "bench", "localdomain")


def ecrs(n: int) -> list[bytes]:
    """n distinct ECRs as `eir-server load` sends them (IMEIs with check digits, one IMSI per
    device)."""
    tpl = EcrTemplates(MME, 0, [entry_block(e) for e in
                                parse_range(f"range:35209900000000:{n}")])
    return [tpl.request(i, i + 1, i + 1) for i in range(n)]


def setup(batch: int, devices: int = 0) -> tuple:
    d = load_dictionary()
    me = Identity("eir.localdomain", "localdomain", 1)
    conn = Connection(PeerConfig(me), d, 0.0, "127.0.0.1", rng=random.Random(0))
    conn.receive_data(peer_cer(MME), 0.0)
    conn.data_to_send()
    conn.events()
    checker = EquipmentChecker(Policy(PolicyConfig()), MemoryStore(), today=lambda: "20260101")
    metrics = Metrics()
    audit = AuditRecorder(metrics, None, detector=DeviceChangeDetector(metrics))
    handler = S13Handler(me, d, CheckService(checker, metrics, audit.record_now),
                         DuplicateCache(), metrics)
    n = max(devices, batch)
    reqs = ecrs(n)
    batches = [b"".join(reqs[i * batch:(i + 1) * batch]) for i in range(n // batch)]
    return d, conn, handler, batches, audit


def eca_for(ecr: bytes) -> bytes:
    """Our server's answer to one ECR (for the cost of the load generator's answer check)."""
    _d, conn, handler, _, _ = setup(1)
    conn.receive_data(ecr, 1.0)
    for ev in conn.events():
        if type(ev) is AppRequest:
            answer = handler.handle(ev.message, 1.0, MME.origin_host)
            assert type(answer) is bytes
            return answer
    raise AssertionError("the ECR produced no request event")


def runner(batch: int, devices: int):  # noqa: ANN201
    _d, conn, handler, batches, audit = setup(batch, devices)

    async def run(n_batches: int) -> int:
        audit.start()
        out = 0
        for i in range(n_batches):
            conn.receive_data(batches[i % len(batches)], float(i))
            now = float(i)
            for ev in conn.events():
                if type(ev) is AppRequest:
                    answer = handler.handle(ev.message, now, "mme0.bench")
                    assert type(answer) is bytes
                    conn.send(answer)
            handler.observe_latency(0.0001)
            out += len(conn.data_to_send())
            await asyncio.sleep(0)  # the audit task's turn, as between reads in the worker
        return out

    return run, batches


def loop_run(coro: Any) -> Any:
    try:
        import uvloop
        return uvloop.run(coro)
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)


async def timed(run: Any, batches: list[bytes], n_batches: int, profile: bool = False) -> float:
    """CPU seconds of `n_batches` batches, after every device was seen once (as after a few
    seconds of load); with `profile`, prints where they went."""
    await run(len(batches))
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    t0 = time.process_time()
    await run(n_batches)
    dt = time.process_time() - t0
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    return dt


def measure(batch: int, n: int, devices: int = 100_000) -> dict[str, float]:
    run, batches = runner(batch, devices)
    n_batches = max(1, n // batch)
    return {"per_ecr_us": loop_run(timed(run, batches, n_batches)) / (n_batches * batch) * 1e6}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--devices", type=int, default=100_000,
                    help="distinct devices the ECRs cycle through")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--refresh", type=float, default=audit_module.REFRESH,
                    help="the device-signal detector's period, seconds")
    args = ap.parse_args()
    audit_module.REFRESH = args.refresh
    run, batches = runner(args.batch, args.devices)
    d = load_dictionary()
    n_batches = args.n // args.batch
    dt = loop_run(timed(run, batches, n_batches, args.profile))
    if args.profile:
        return 0
    per = dt / (n_batches * args.batch) * 1e6
    # Parts, for the table in the README.
    one = ecrs(1)[0]
    reps = 50_000
    t0 = time.process_time()
    for _ in range(reps):
        m = decode(one, d)
    t_decode = (time.process_time() - t0) / reps * 1e6
    grammar = d.compiled.request(16777252, 324)
    t0 = time.process_time()
    for _ in range(reps):
        m = decode(one, d)
        validate(m, grammar)  # type: ignore[arg-type]
    t_validate = (time.process_time() - t0) / reps * 1e6 - t_decode
    print(f"{'ECR in -> ECA out (batch ' + str(args.batch) + ')':<36}{per:6.2f} µs/ECR")
    # The general path runs only for requests the fast path does not accept (errors, unusual
    # shapes): shown for comparison.
    print(f"{'general path: decode':<36}{t_decode:6.2f} µs")
    print(f"{'general path: grammar validation':<36}{t_validate:6.2f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

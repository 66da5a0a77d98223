"""Former pipelined S13 load client, now `eir-server load` (eir_server/load/).

Kept as a thin shim: `cer(i)` and `ecr(conn, i, realm)` for scripts that build single messages,
and the old command line mapped onto `eir-server load` (closed loop, batch x depth in flight):

    .venv/bin/python benchmarks/bench_s13_load.py --target 127.0.0.1:3868 --connections 4
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eir_server.load.imeis import ImeiEntry  # noqa: E402
from eir_server.load.s13 import EcrTemplates, Identity, entry_block  # noqa: E402
from eir_server.load.s13 import cer as _cer  # noqa: E402


def cer(i: int) -> bytes:
    return _cer(Identity(f"mme{i}.bench", "bench", "localdomain"))


def ecr(conn: int, i: int, realm: str) -> bytes:
    imei = f"{35209900000000 + (i * 7919) % 10_000_000:014d}"
    tpl = EcrTemplates(Identity(f"mme{conn}.bench", "bench", realm), conn,
                       [entry_block(ImeiEntry(imei))])
    return tpl.request(0, i, i)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="127.0.0.1:3868")
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--realm", default="localdomain")
    a = ap.parse_args()
    exe = str(Path(sys.executable).parent / "eir-server")
    os.execv(exe, [exe, "load", "--target", a.target, "--connections", str(a.connections),
                   "--inflight", str(a.batch * a.depth), "--duration", str(a.seconds),
                   "--destination-realm", a.realm])
    return 0


if __name__ == "__main__":
    sys.exit(main())

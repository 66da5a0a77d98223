"""Build hook. The project's metadata is in pyproject.toml; this file only adds the optional
compiled build: with EIR_MYPYC=1, the request path's modules (listed below, all checked by
`mypy --strict`) are compiled to C extensions by mypyc. The .py sources ship beside them, and
everything else stays interpreted. Without EIR_MYPYC=1 the build is pure Python.

The compiled build needs a C compiler, the Python headers and mypy in the build environment:
    pip install 'mypy>=1.10' 'setuptools>=77'
    EIR_MYPYC=1 pip install --no-build-isolation .
Not for editable installs: the extensions would sit beside the sources and shadow every edit
(`make test` builds and tests it in a copy of the tree instead; see docs/operations.md).
"""

from __future__ import annotations

import os

from setuptools import setup

# The ECR and N5g-eir request paths. A module here must not be subclassed by an interpreted
# module (mypyc refuses that at run time): tests/test_compiled.py checks the list.
COMPILED = [
    "eir_server/checker.py",
    "eir_server/overload.py",
    "eir_server/obs/audit.py",
    "eir_server/io/diameter_server.py",
    "eir_server/io/http_server.py",
    "eir_server/recent.py",
    "eir_server/service.py",
    "eir_server/diameter/answers.py",
    "eir_server/diameter/codec.py",
    "eir_server/diameter/compiled.py",
    "eir_server/diameter/connection.py",
    "eir_server/diameter/dedup.py",
    "eir_server/diameter/doic.py",
    "eir_server/diameter/errors.py",
    "eir_server/diameter/shed.py",
    "eir_server/n5g_eir/app.py",
    "eir_server/n5g_eir/h2conn.py",
    "eir_server/n5g_eir/hpack.py",
    "eir_server/n5g_eir/oauth.py",
    "eir_server/policy/common.py",
    "eir_server/policy/engine.py",
    "eir_server/policy/imei.py",
    "eir_server/policy/lists.py",
    "eir_server/policy/rules.py",
    "eir_server/policy/tac.py",
    "eir_server/policy/types.py",
    "eir_server/s13/app.py",
    "eir_server/s13/handler.py",
    # The Redis store's RESP client, lean lookups and in-process tiers, record decoding, and
    # both snapshots.
    # Interpreted: memory.py (tests subclass MemoryStore), base.py (a runtime-checkable
    # Protocol, which mypyc cannot compile) and redis_store.py (compiled, its poller did not
    # recover from a Redis restart in tests/store/test_resp.py: not understood yet).
    "eir_server/store/codec.py",
    "eir_server/store/layout.py",
    "eir_server/store/lean.py",
    "eir_server/store/register_snapshot.py",
    "eir_server/store/resp.py",
    "eir_server/store/snapshot.py",
    "eir_server/store/tiers.py",
]

ext_modules = []
if os.environ.get("EIR_MYPYC") == "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(COMPILED, opt_level="3")

setup(ext_modules=ext_modules)

"""eir-server: an Equipment Identity Register answering S13 ECR and N5g-eir checks."""

import functools

__version__ = "0.1.0"


@functools.cache
def build_kind() -> str:
    """"mypyc" when the request path runs compiled (setup.py with EIR_MYPYC=1), else "python".
    One module stands for all: a build compiles the whole list or nothing. Found, not imported:
    every CLI command asks (its --version), and most never load the codec."""
    from importlib.machinery import EXTENSION_SUFFIXES
    from importlib.util import find_spec

    spec = find_spec("eir_server.diameter.codec")
    origin = (spec.origin if spec else None) or ""
    return "mypyc" if origin.endswith(tuple(EXTENSION_SUFFIXES)) else "python"

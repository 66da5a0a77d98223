"""eir-server: an Equipment Identity Register answering S13 ECR and N5g-eir checks."""

__version__ = "0.1.0"


def build_kind() -> str:
    """"mypyc" when the request path runs compiled (setup.py with EIR_MYPYC=1), else "python".
    One module stands for all: a build compiles the whole list or nothing."""
    from importlib.machinery import EXTENSION_SUFFIXES

    from eir_server.diameter import codec

    return "mypyc" if (codec.__file__ or "").endswith(tuple(EXTENSION_SUFFIXES)) else "python"

"""DOIC (RFC 7683) as a reporting node, loss algorithm: the AVPs answers carry.

A request that carries OC-Supported-Features announces a reacting node; every answer to it then
carries our OC-Supported-Features (the algorithm we selected, 5.2) and, while we have an overload
report, the OC-OLR (5.5): sequence number, HOST_REPORT, reduction percentage, validity. The
report's values come from the interface-neutral overload signal; this module only encodes them
(once per sequence number: answers copy the bytes).
"""

from __future__ import annotations

from .codec import U64, avp, grouped_avp, u32_avp

OC_SUPPORTED_FEATURES = 621
OC_FEATURE_VECTOR = 622
OC_OLR = 623
OC_SEQUENCE_NUMBER = 624
OC_VALIDITY_DURATION = 625
OC_REPORT_TYPE = 626
OC_REDUCTION_PERCENTAGE = 627
OLR_DEFAULT_ALGO = 1  # the loss algorithm (RFC 7683 6.3, OC-Feature-Vector bit 0)
HOST_REPORT = 0

# Sent with the M bit clear (the dictionary allows either): a node without DOIC ignores them.
SUPPORTED = grouped_avp(OC_SUPPORTED_FEATURES,
                        [avp(OC_FEATURE_VECTOR, U64.pack(OLR_DEFAULT_ALGO), mandatory=False)],
                        mandatory=False)


def olr(sequence: int, reduction: int, validity: int) -> bytes:
    """OC-OLR; validity 0 withdraws the report with that sequence number's predecessors."""
    return grouped_avp(OC_OLR, [
        avp(OC_SEQUENCE_NUMBER, U64.pack(sequence), mandatory=False),
        u32_avp(OC_REPORT_TYPE, HOST_REPORT, mandatory=False),
        u32_avp(OC_REDUCTION_PERCENTAGE, reduction, mandatory=False),
        u32_avp(OC_VALIDITY_DURATION, validity, mandatory=False),
    ], mandatory=False)


class OlrBytes:
    """The AVP bytes a DOIC answer adds for the current report, re-encoded only when the
    report changes."""

    __slots__ = ("_report", "_bytes")

    def __init__(self) -> None:
        self._report: tuple[int, int, int] | None = None
        self._bytes = SUPPORTED

    def get(self, report: tuple[int, int, int] | None) -> bytes:
        if report is not self._report:
            self._report = report
            self._bytes = SUPPORTED + (olr(*report) if report is not None else b"")
        return self._bytes

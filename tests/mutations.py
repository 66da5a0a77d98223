"""Hypothesis inputs for the fuzz harnesses' suite versions: seed frames with a few bytes
overwritten, then cut short or followed by another seed."""

from __future__ import annotations

from hypothesis import strategies as st


def mutated(seeds: dict[str, bytes], reach: int) -> st.SearchStrategy[bytes]:
    """Up to 6 bytes overwritten at offsets below `reach`; cut anywhere below `reach` + 100, or
    whole and followed by another seed."""
    names = sorted(seeds)

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        data = bytearray(seeds[draw(st.sampled_from(names))])
        for i, v in draw(st.lists(st.tuples(st.integers(0, reach), st.integers(0, 255)),
                                  max_size=6)):
            if i < len(data):
                data[i] = v
        cut = draw(st.integers(0, reach + 100))
        if cut < len(data):
            return bytes(data[:cut])
        return bytes(data) + seeds[draw(st.sampled_from(names))]

    return build()

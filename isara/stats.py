"""Intervals for rates measured on a sample: shared by the report, the judges' held-out figures and the data card.

A module of its own (no imports) so that the stages that judge need not depend on the report stage's code.
"""

from __future__ import annotations


def wilson(rate: float | None, n: int | None, z: float = 1.96) -> tuple[float, float] | None:
    """95% Wilson score interval of a rate measured on n items (it stays inside [0, 1] at 0% and 100%)."""
    if rate is None or not n:
        return None
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((rate * (1 - rate) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)

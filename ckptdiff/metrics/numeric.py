"""Small numeric facts every figure shares."""

from __future__ import annotations

import math
from typing import Literal


def ratio(num: float, den: float) -> float:
    """num / den, or NaN when the denominator is 0 or NaN: the one safe division of counts and sums."""
    return num / den if den and not math.isnan(den) else math.nan


# "No effect" bands: a ratio to its baseline within 1 ± band is read as no effect in summary sentences and verdicts
# (the numbers are always printed beside the words).
OVERLAP_BAND = 0.02  # overlap with the principal / low-magnitude weights against its baseline
AGREEMENT_BAND = 0.05  # Jaccard between runs against its magnitude-matched baseline

Side = Literal["below", "within", "above", "undefined"]


def against_one(value: float, band: float) -> Side:
    """Where a ratio to a baseline lies: below 1 − band, within the band, above 1 + band, or undefined (NaN)."""
    if math.isnan(value):
        return "undefined"
    if value < 1 - band:
        return "below"
    if value > 1 + band:
        return "above"
    return "within"

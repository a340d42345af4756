"""Percentiles of measured latencies, one definition for every benchmark's report."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], p: float, *, empty: float = 0.0) -> float:
    """The p-th percentile of ascending values, interpolated linearly between the two
    nearest ranks (numpy's default method); `empty` when there are no values."""
    if not sorted_values:
        return empty
    rank = (len(sorted_values) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)

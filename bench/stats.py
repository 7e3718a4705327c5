"""Percentiles and medians for the benchmark's results."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def summary(values: Sequence[float]) -> dict[str, float]:
    """p50, p99, p99.9 and max (µs in, ms out) and the sample count."""
    ordered = sorted(values)
    return {
        "p50_ms": round(percentile(ordered, 50) / 1000, 3),
        "p99_ms": round(percentile(ordered, 99) / 1000, 3),
        "p999_ms": round(percentile(ordered, 99.9) / 1000, 3),
        "max_ms": round(ordered[-1] / 1000, 3) if ordered else math.nan,
        "n": len(ordered),
    }


def median_of(runs: Sequence[Any]) -> Any:
    """The runs merged leaf by leaf: the median of numbers, the first run's value for anything else."""
    first = runs[0]
    if isinstance(first, dict):
        return {key: median_of([run[key] for run in runs if isinstance(run, dict) and key in run]) for key in first}
    if isinstance(first, bool) or not isinstance(first, int | float):
        return first
    numbers = [run for run in runs if isinstance(run, int | float) and not math.isnan(run)]
    if not numbers:
        return math.nan
    middle = statistics.median(numbers)
    return round(middle, 3) if isinstance(middle, float) else middle

"""Statistics over seeds for the experiment reports: mean ± standard deviation, and paired
differences (the same seed with and without a change) with how consistent their sign is."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample standard deviation (n - 1); 0 for a single value
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f}" if self.n > 1 else f"{self.mean:.3f}"


def summarize(values: Sequence[float]) -> Summary:
    n = len(values)
    if n == 0:
        return Summary(math.nan, math.nan, 0)
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return Summary(mean, math.sqrt(variance), n)


@dataclass(frozen=True)
class PairedDifference:
    difference: Summary  # of b - a, seed by seed
    sign_consistency: float  # share of seeds whose difference has the sign of the mean (0 if mean is 0)

    def __str__(self) -> str:
        d = self.difference
        return f"{d.mean:+.3f} ± {d.std:.3f} ({self.sign_consistency:.0%} same sign)"


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    """b - a for each seed (a[i] and b[i] come from the same seed)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same seeds: {len(a)} vs {len(b)}")
    differences = [y - x for x, y in zip(a, b, strict=True)]
    summary = summarize(differences)
    if not differences or summary.mean == 0:
        return PairedDifference(summary, 0.0)
    same = sum(1 for d in differences if d * summary.mean > 0)
    return PairedDifference(summary, same / len(differences))

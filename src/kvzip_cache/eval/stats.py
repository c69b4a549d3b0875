"""Confidence intervals for the evaluation's cells: a percentile bootstrap over questions."""

from __future__ import annotations

from collections.abc import Sequence

import torch

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_LEVEL = 0.95


def bootstrap_interval(
    values: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES, level: float = BOOTSTRAP_LEVEL, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one score per question).

    ``resamples`` resamples of ``n`` values drawn with replacement (a seeded generator: the same values give the same
    interval); the interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of their means (linear
    interpolation). A constant vector gives a zero-width interval; one value gives ``(v, v)``.
    """
    if not values:
        raise ValueError("bootstrap_interval needs at least one value")
    if not 0.0 < level < 1.0 or resamples < 1:
        raise ValueError(f"level must be in (0, 1) and resamples >= 1; got {level}, {resamples}")
    data = torch.as_tensor(list(values), dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(data), (resamples, len(data)), generator=generator)  # [resamples, n]
    means = data[picks].mean(dim=1)
    tails = torch.tensor([(1.0 - level) / 2, (1.0 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(means, tails).tolist()
    return lo, hi

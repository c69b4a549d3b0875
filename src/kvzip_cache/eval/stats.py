"""Confidence intervals for the evaluation's cells: percentile bootstraps that resample contexts, not questions.

The questions of one context are not independent (the 3 needles of one document, the questions of one SQuAD
paragraph are answered from the same compressed cache), so a bootstrap that draws questions one by one gives
intervals that are too narrow. `cluster_bootstrap_interval` draws whole contexts; `paired_difference` does the same
for the per-question difference of two methods that answered the same questions.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_LEVEL = 0.95


def cluster_bootstrap_interval(
    values: Sequence[float], clusters: Sequence[Hashable], *, resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = BOOTSTRAP_LEVEL, seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``, resampling clusters (contexts) with replacement.

    ``values[i]`` is the score of question ``i`` and ``clusters[i]`` the id of its context (any hashable), both of
    length ``n``. The ``k`` distinct clusters are numbered in order of first appearance; each of ``resamples``
    resamples draws ``k`` cluster numbers with replacement (``torch.randint(k, (resamples, k))`` from a generator
    seeded with ``seed``: the same inputs give the same interval) and takes the mean over all questions of the drawn
    clusters, a cluster drawn twice counting twice (sum of their sums / sum of their sizes). The interval is the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of those means (linear interpolation).

    With one question per cluster this is the per-question bootstrap (`bootstrap_interval`, the same draws).
    Constant values give a zero-width interval; a single cluster gives ``(mean, mean)``.

    Returns:
        ``(lo, hi)``.
    """
    values, clusters = list(values), list(clusters)
    if len(values) != len(clusters):
        raise ValueError(f"values and clusters must have one entry per question; got {len(values)} values and "
                         f"{len(clusters)} cluster ids")
    if not values:
        raise ValueError("cluster_bootstrap_interval needs at least one value")
    if not 0.0 < level < 1.0 or resamples < 1:
        raise ValueError(f"level must be in (0, 1) and resamples >= 1; got {level}, {resamples}")
    numbers: dict[Hashable, int] = {}
    index = torch.tensor([numbers.setdefault(c, len(numbers)) for c in clusters])  # [n]: cluster number
    k = len(numbers)
    data = torch.as_tensor(values, dtype=torch.float64)  # [n]
    sums = torch.zeros(k, dtype=torch.float64).index_add_(0, index, data)  # [k]: score sum per cluster
    sizes = torch.zeros(k, dtype=torch.float64).index_add_(0, index, torch.ones_like(data))  # [k]: questions
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(k, (resamples, k), generator=generator)  # [resamples, k]
    # A ratio of totals, not a mean of cluster means: every drawn question weighs the same, as in the cell's mean.
    means = sums[picks].sum(dim=1) / sizes[picks].sum(dim=1)  # [resamples]
    tails = torch.tensor([(1.0 - level) / 2, (1.0 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(means, tails).tolist()
    return lo, hi


def bootstrap_interval(
    values: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES, level: float = BOOTSTRAP_LEVEL, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``, treating them as independent (one per cluster).

    ``resamples`` resamples of ``n`` values drawn with replacement (a seeded generator: the same values give the same
    interval); the interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of their means (linear
    interpolation). A constant vector gives a zero-width interval; one value gives ``(v, v)``. The evaluation's
    questions cluster by context: use `cluster_bootstrap_interval` for them.
    """
    if len(values) == 0:
        raise ValueError("bootstrap_interval needs at least one value")
    return cluster_bootstrap_interval(values, range(len(values)), resamples=resamples, level=level, seed=seed)


def paired_difference(
    a: Sequence[float], b: Sequence[float], clusters: Sequence[Hashable], *, resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = BOOTSTRAP_LEVEL, seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of the per-question differences ``a[i] - b[i]`` and its context-clustered bootstrap interval.

    ``a`` and ``b`` are two methods' scores on the SAME ``n`` questions, aligned (``a[i]`` and ``b[i]`` answer
    question ``i``; the caller matches them by question identity), and ``clusters[i]`` is question ``i``'s context.
    The interval is `cluster_bootstrap_interval` of the differences: both methods are resampled together, so what
    the questions share (an easy context is easy for both) cancels, and the interval is usually narrower than the
    two methods' own intervals suggest.

    Returns:
        ``(mean, lo, hi)`` of ``a - b``.
    """
    if not len(a) == len(b) == len(clusters):
        raise ValueError(f"a, b and clusters must be aligned, one entry per question; got lengths {len(a)}, {len(b)} "
                         f"and {len(clusters)}")
    if len(a) == 0:
        raise ValueError("paired_difference needs at least one question")
    differences = (torch.as_tensor(list(a), dtype=torch.float64) - torch.as_tensor(list(b), dtype=torch.float64))
    lo, hi = cluster_bootstrap_interval(differences.tolist(), clusters, resamples=resamples, level=level, seed=seed)
    return differences.mean().item(), lo, hi

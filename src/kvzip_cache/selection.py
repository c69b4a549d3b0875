"""Turning scores into a keep mask: which context pairs survive.

``ratio`` is the fraction of context pairs KEPT (the paper's convention; kvpress's "compression_ratio" is the
fraction removed). Scores are ``[layers, batch, kv_heads, context_len]`` with NaN where a pair is not selectable
(sliding layers, padding, the protected prefix); each row of the batch gets its own selection. Ties are broken
deterministically by a stable sort: the earlier (layer, head, position) wins.
"""

from __future__ import annotations

import math

import torch

LEVELS = ("pair", "pair-uniform", "head")


def kept_count(ratio: float, n: int) -> int:
    """``round(ratio * n)`` with halves rounded up (Python's round would round half to even)."""
    return min(n, int(math.floor(ratio * n + 0.5)))


def _top_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries along the last dim (NaN never selected, stable ties)."""
    order = torch.sort(values.nan_to_num(float("-inf")), dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(values, dtype=torch.bool)
    return mask.scatter_(-1, order[..., :k], True)


def select_pairs(scores: torch.Tensor, ratio: float, level: str = "pair") -> torch.Tensor:
    """Keep mask for pair-level selection.

    Args:
        scores: ``[L, B, H, C]`` float, NaN = not selectable.
        ratio: fraction of selectable pairs kept, in (0, 1].
        level: ``"pair"``: one top-k per row over all layers x heads x positions (non-uniform budgets);
            ``"pair-uniform"``: the same number kept in every (layer, head) of a row.

    Returns:
        ``[L, B, H, C]`` bool: exactly ``round(ratio * n)`` True per row for "pair" (n = selectable pairs of the row),
        ``round(ratio * c)`` per (layer, head) for "pair-uniform" (c = selectable positions of the row).
    """
    return select_among(scores, ~torch.isnan(scores), ratio, level)


def select_among(scores: torch.Tensor, candidates: torch.Tensor, ratio: float, level: str = "pair") -> torch.Tensor:
    """Keep as many pairs as `select_pairs` of ``scores`` would, but choose them only among ``candidates``.

    What a budget carried across prefill chunks needs: ``ratio`` of every pair rated so far, among those still held.

    Args:
        scores: ``[L, B, H, C]`` float, NaN = not selectable (the budget counts every non-NaN entry).
        candidates: ``[L, B, H, C]`` bool, the pairs that may be kept.
        ratio: fraction of the selectable pairs kept, in (0, 1].
        level: ``"pair"`` or ``"pair-uniform"`` (see `select_pairs`).

    Returns:
        ``[L, B, H, C]`` bool, True only on selectable candidates (fewer than the budget if they are too few).
    """
    num_layers, batch, num_heads, length = scores.shape
    valid = ~torch.isnan(scores)
    ranked = scores.masked_fill(~candidates, float("nan"))
    keep = torch.zeros_like(valid)
    for row in range(batch):
        row_scores = ranked[:, row]
        if level == "pair":
            k = kept_count(ratio, int(valid[:, row].sum()))
            keep[:, row] = _top_mask(row_scores.flatten(), k).view(num_layers, num_heads, length)
        elif level == "pair-uniform":
            layer_valid = valid[:, row].any(dim=-1)  # [L, H]: heads that have anything to select
            if not bool(layer_valid.any()):
                continue
            per_head = int(valid[:, row][layer_valid][0].sum())
            k = kept_count(ratio, per_head)
            keep[:, row] = _top_mask(row_scores, k) & valid[:, row]
        else:
            raise ValueError(f"unknown pair level {level!r}; choose one of {LEVELS}")
    return keep & valid & candidates


def select(scores: torch.Tensor, ratio: float, level: str = "pair") -> torch.Tensor:
    """Keep mask at any level: `select_pairs` for ``"pair"`` and ``"pair-uniform"``, `select_heads_by_scores` for
    ``"head"``.

    Args:
        scores: ``[L, B, H, C]`` float, NaN = not selectable.
        ratio: fraction kept, in (0, 1].
        level: one of `LEVELS`.

    Returns:
        ``[L, B, H, C]`` bool, never True where ``scores`` is NaN.
    """
    if level == "head":
        return select_heads_by_scores(scores, ratio)
    return select_pairs(scores, ratio, level)


def select_heads_by_scores(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Head-level keep mask from pair scores: each row ranks its KV heads by their best pair (`select_heads`).

    Head scores broadcast over positions (`kvzip_cache.scorers.HeadScorer`) rank by the heads' own scores; pair
    scores (KVzip's reconstruction) rank by each head's maximum over the row's context, KVzip's recipe for head
    scores, per context.

    Returns:
        ``[L, B, H, C]`` bool: in each row, the top ``round(ratio * heads)`` compressible heads keep every selectable
        pair, the others none.
    """
    valid = ~torch.isnan(scores)
    keep = torch.zeros_like(valid)
    for row in range(scores.shape[1]):
        heads = head_scores_from_pairs(scores[:, row : row + 1])  # [L, H]; -inf where nothing is selectable
        keep[:, row : row + 1] = select_heads(valid[:, row : row + 1], heads, ratio)
    return keep


def head_scores_from_pairs(scores: torch.Tensor) -> torch.Tensor:
    """KVzip head scores from pair scores: the maximum over rows and positions of each (layer, KV head).

    Args:
        scores: ``[L, B, H, C]`` pair scores, NaN where not scored.

    Returns:
        ``[L, H]`` float32; -inf for heads with no scored pair (sliding layers).
    """
    return scores.float().nan_to_num(float("-inf")).amax(dim=(1, 3))


def select_heads(selectable: torch.Tensor, head_scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep mask for head-level (context-independent) selection.

    Args:
        selectable: ``[L, B, H, C]`` bool, the context pairs that may be kept.
        head_scores: ``[L, H]``, one score per KV head (higher = more important); layers with no selectable pair
            (sliding layers) are ignored.
        ratio: fraction of the compressible heads that keep their whole context.

    Returns:
        ``[L, B, H, C]`` bool: the top ``round(ratio * heads)`` heads keep every selectable pair, the others none.
    """
    num_layers, batch, num_heads, _ = selectable.shape
    if tuple(head_scores.shape) != (num_layers, num_heads):
        raise ValueError(
            f"head_scores has shape {tuple(head_scores.shape)} but this model needs [num_layers, num_kv_heads] = "
            f"{[num_layers, num_heads]}"
        )
    compressible = selectable.flatten(1).any(dim=1)  # [L]
    candidates = head_scores.float().to(selectable.device).clone()
    candidates[~compressible] = float("nan")
    k = kept_count(ratio, int(compressible.sum()) * num_heads)
    kept_heads = _top_mask(candidates.flatten(), k).view(num_layers, 1, num_heads, 1)
    return selectable & kept_heads

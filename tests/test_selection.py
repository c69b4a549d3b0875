"""Selection: exact budgets, deterministic ties, NaN never kept."""

import pytest
import torch

from kvzip_cache import select_heads, select_pairs
from kvzip_cache.selection import kept_count


def _scores(seed=0, shape=(3, 2, 4, 25)):
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    scores[1] = float("nan")  # a sliding layer
    scores[:, 1, :, :5] = float("nan")  # row 1: padding/prefix
    return scores


@pytest.mark.parametrize("ratio", [1.0, 0.7, 0.3, 0.01])
def test_pair_keeps_exactly_round_ratio_n_per_row(ratio):
    scores = _scores()
    keep = select_pairs(scores, ratio, "pair")
    for row in range(2):
        n = int((~scores[:, row].isnan()).sum())
        assert int(keep[:, row].sum()) == kept_count(ratio, n)
        kept, dropped = scores[:, row][keep[:, row]], scores[:, row][~keep[:, row] & ~scores[:, row].isnan()]
        if len(kept) and len(dropped):
            assert kept.min() >= dropped.max()
    assert not keep[1].any() and not keep[:, 1, :, :5].any()


def test_pair_budgets_are_non_uniform_and_uniform_is_uniform():
    scores = _scores(1)
    scores[0, :, 0] += 1.0  # head 0 of layer 0 dominates
    keep = select_pairs(scores, 0.3, "pair")
    per_head = keep[0, 0].sum(-1)
    assert per_head[0] > per_head[1:].max()
    uniform = select_pairs(scores, 0.3, "pair-uniform")
    for row, count in [(0, 25), (1, 20)]:
        assert (uniform[[0, 2], row].sum(-1) == kept_count(0.3, count)).all()


def test_ties_are_broken_deterministically_towards_earlier_pairs():
    scores = torch.ones(2, 1, 2, 10)
    keep = select_pairs(scores, 0.25, "pair")
    assert int(keep.sum()) == 10 and keep[0, 0, 0].all() and not keep[1].any()
    assert torch.equal(keep, select_pairs(scores.clone(), 0.25, "pair"))


def test_smaller_ratio_is_a_subset():
    scores = _scores(2)
    assert not (select_pairs(scores, 0.2) & ~select_pairs(scores, 0.5)).any()


def test_head_level_keeps_whole_heads():
    selectable = torch.ones(3, 2, 4, 10, dtype=torch.bool)
    selectable[1] = False  # sliding layer
    selectable[:, 1, :, :3] = False
    head_scores = torch.arange(12, dtype=torch.float32).view(3, 4)
    keep = select_heads(selectable, head_scores, 0.5)  # 8 compressible heads -> 4 kept
    kept_heads = keep.any(dim=(1, 3))
    assert int(kept_heads.sum()) == 4 and kept_heads[2].all() and not kept_heads[1].any()
    assert torch.equal(keep[2], selectable[2])
    with pytest.raises(ValueError, match="num_kv_heads"):
        select_heads(selectable, torch.ones(3, 5), 0.5)

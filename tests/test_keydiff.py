"""KeyDiff (arXiv 2504.15364), the scorer added through the seam: its scores, its selection, its place in the eval."""

import pytest
import torch

from conftest import make_pair
from kvzip_cache import KVzipCache
from kvzip_cache.eval.methods import DEFAULT_METHODS, method_scorer
from kvzip_cache.scorers import KeyDiffScorer
from references import compressed_keep


def keydiff(layer, keys, values, positions):
    """KeyDiff written out pair by pair: minus the cosine between a key and the mean of its head's unit keys."""
    out = torch.empty(keys.shape[:3], dtype=torch.float64)
    for b in range(keys.shape[0]):
        real = [t for t in range(keys.shape[2]) if positions[b, t] >= 0]
        for h in range(keys.shape[1]):
            units = [keys[b, h, t].double() / keys[b, h, t].double().norm() for t in real]
            anchor = sum(units) / len(units)
            for t in range(keys.shape[2]):
                k = keys[b, h, t].double()
                out[b, h, t] = -(k @ anchor) / (k.norm() * anchor.norm())
    return out


def test_scores_are_minus_the_cosine_to_the_mean_unit_key_of_real_pairs():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 7, 8, generator=gen) + 0.5  # a shared direction, so the anchor means something
    positions = torch.arange(7).expand(2, -1).clone()
    positions[1, :2] = -1  # left padding stays out of the anchor
    got = KeyDiffScorer().score_layer(0, keys, torch.randn(2, 3, 7, 8), positions)
    torch.testing.assert_close(got.double(), keydiff(0, keys, None, positions), atol=1e-6, rtol=0)
    assert got.shape == (2, 3, 7) and got.dtype == torch.float32


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_compress_keeps_the_same_share_of_every_head_by_keydiff(arch):
    model, reference = make_pair(arch)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 120, (2, 26), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    starts = torch.tensor([6, 2])
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=starts)
    cache.compress(model, 0.3, scorer="keydiff")
    assert cache.compressed_with == ("pair-uniform", 0.3) and cache.score_source == "keydiff"
    expected = compressed_keep(reference, keydiff, ids, mask, starts, 0.3, uniform=True)
    assert torch.equal(cache.keep_mask, expected)


def test_keydiff_is_an_eval_method():
    assert "keydiff" in DEFAULT_METHODS
    assert method_scorer("keydiff") == ("keydiff", "pair-uniform")

"""KVzip scores equal an independent recomputation from full attention probabilities.

The reference runs the reconstruction input through a dense DynamicCache with eager attention, takes the full
softmax probabilities, renormalises them over the restricted key set [protected prefix | chunk | repeat input], and
takes the max over query positions and each KV head's query group.
"""

import pytest
import torch
from transformers import DynamicCache

from conftest import ByteTokenizer, make_pair
from kvzip_cache import KVzipCache, reconstruction_inputs


def reference_scores(reference, row_ids, prefix_len, chunk_size, tokenizer):
    """{layer: [H, context_len]} scores of one unpadded row, from full eager attention probabilities."""
    num_heads = reference.config.num_key_value_heads
    length = row_ids.shape[0]
    context_len = length - prefix_len
    scores = {}
    for lo, hi, ids in reconstruction_inputs(tokenizer, row_ids[prefix_len:], chunk_size):
        cache = DynamicCache(config=reference.config)
        with torch.no_grad():
            reference(input_ids=row_ids[None], past_key_values=cache, use_cache=True)
            out = reference(input_ids=ids[None], past_key_values=cache, use_cache=True, output_attentions=True,
                            position_ids=torch.arange(length, length + ids.numel())[None])
        restricted = list(range(prefix_len)) + list(range(prefix_len + lo, prefix_len + hi))
        restricted += list(range(length, length + ids.numel()))
        for layer, probs in enumerate(out.attentions):
            if probs.shape[-1] != length + ids.numel():
                continue  # a sliding layer (its window is shorter than the sequence): never scored
            sub = probs[0][..., restricted]  # [Hq, n, R]
            sub = sub / sub.sum(-1, keepdim=True)
            chunk = sub[..., prefix_len : prefix_len + hi - lo]  # [Hq, n, C]
            best = chunk.view(num_heads, -1, chunk.shape[-1]).amax(dim=1)
            scores.setdefault(layer, torch.full((num_heads, context_len), float("nan"), dtype=torch.float64))
            scores[layer][:, lo:hi] = best
    return scores


@pytest.mark.parametrize("arch_name", ["llama", "gemma3", "qwen3"])
def test_scores_match_renormalised_full_attention(arch_name):
    model, reference = make_pair(arch_name)
    tokenizer = ByteTokenizer()
    g = torch.Generator().manual_seed(5)
    lengths, prefixes = [29, 23], [4, 3]
    rows = [torch.randint(3, 128, (n,), generator=g) for n in lengths]
    seq = max(lengths)
    ids = torch.zeros(2, seq, dtype=torch.long)
    mask = torch.zeros(2, seq, dtype=torch.long)
    starts = []
    for b, row in enumerate(rows):
        ids[b, seq - len(row):] = row
        mask[b, seq - len(row):] = 1
        starts.append(seq - len(row) + prefixes[b])
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=torch.tensor(starts), chunk_size=10)
    cache.compress(model, 0.5, tokenizer=tokenizer, chunk_size=9)
    base = min(starts)
    assert cache.scores.shape == (len(cache.layers), 2, 2, seq - base)
    for b, row in enumerate(rows):
        expected = reference_scores(reference, row, prefixes[b], 9, tokenizer)
        assert sorted(expected) == cache.compressible_layers
        for layer in range(len(cache.layers)):
            actual = cache.scores[layer, b, :, starts[b] - base:]
            if layer not in expected:
                assert torch.isnan(cache.scores[layer, b]).all()
                continue
            torch.testing.assert_close(actual.double(), expected[layer], atol=2e-6, rtol=1e-5)
            assert torch.isnan(cache.scores[layer, b, :, : starts[b] - base]).all()  # padding and prefix


def test_scoring_leaves_cache_untouched():
    model, _ = make_pair("gemma3")
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(1))
    cache = KVzipCache(model)
    cache.prefill(model, ids, context_start=2)
    before = [(layer.keys.clone(), layer.get_seq_length()) for layer in cache.layers]
    from kvzip_cache.scorers import ReconstructionScorer

    ReconstructionScorer(ByteTokenizer(), chunk_size=8).score_context(model, cache.prefilled_context())
    for layer, (keys, length) in zip(cache.layers, before):
        assert layer.get_seq_length() == length
        assert torch.equal(layer.keys, keys)

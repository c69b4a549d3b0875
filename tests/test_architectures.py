"""End-to-end equivalence on every supported architecture (tiny random models, float32).

- ratio 1.0: the compressed (ragged) cache gives the logits of a plain DynamicCache run.
- ratio < 1: the logits equal a dense reference in which exactly the evicted (layer, head, position) pairs are hidden
  from the query tokens.
"""

import pytest
import torch

from conftest import reference_logits
from kvzip_cache import KVzipCache

CONTEXT, PREFIX, QUERY = 37, 5, 6


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (1, CONTEXT), generator=g), torch.randint(3, 128, (1, QUERY), generator=g)


def _query_logits(model, cache, query_ids):
    n = cache.get_seq_length()
    with torch.no_grad():
        return model(input_ids=query_ids, past_key_values=cache, use_cache=True,
                     position_ids=torch.arange(n, n + query_ids.shape[1])[None]).logits


def test_ratio_one_matches_dynamic_cache(arch, byte_tokenizer):
    from conftest import make_pair

    model, reference = make_pair(arch)
    context, query = _inputs()
    cache = KVzipCache(model)
    cache.prefill(model, context, context_start=PREFIX, chunk_size=16)
    report = cache.compress(model, 1.0, tokenizer=byte_tokenizer, chunk_size=12)
    assert report.achieved_ratio == 1.0
    assert all(cache.layers[i].is_compressed for i in cache.compressible_layers)
    expected = reference_logits(reference, context, query)
    torch.testing.assert_close(_query_logits(model, cache, query), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("level", ["pair", "pair-uniform"])
def test_eviction_equals_masked_dense_reference(arch, byte_tokenizer, level):
    from conftest import make_pair

    model, reference = make_pair(arch)
    context, query = _inputs(2)
    cache = KVzipCache(model)
    cache.prefill(model, context, context_start=PREFIX, chunk_size=16)
    cache.compress(model, 0.4, tokenizer=byte_tokenizer, chunk_size=12, level=level)
    hidden = {}
    for idx in cache.compressible_layers:
        evicted = torch.zeros(1, cache.num_kv_heads, CONTEXT, dtype=torch.bool)
        evicted[..., PREFIX:] = ~cache.keep_mask[idx]
        assert evicted.any() and not evicted.all()
        hidden[idx] = evicted
    expected = reference_logits(reference, context, query, hidden=hidden)
    actual = _query_logits(model, cache, query)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    unmasked = reference_logits(reference, context, query)
    assert (unmasked - actual).abs().max() > 1e-3, "eviction should change the logits of a random model"


def test_greedy_generation_matches_dynamic_cache(arch, byte_tokenizer):
    from conftest import make_pair
    from transformers import DynamicCache

    model, reference = make_pair(arch)
    reference.set_attn_implementation("sdpa")
    context, query = _inputs(3)
    full = torch.cat([context, query], 1)
    cache = KVzipCache(model)
    cache.prefill(model, context, context_start=PREFIX)
    cache.compress(model, 1.0, tokenizer=byte_tokenizer)
    out = model.generate(full, past_key_values=cache, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    expected = reference.generate(full, past_key_values=DynamicCache(config=reference.config), max_new_tokens=8,
                                  do_sample=False, min_new_tokens=8)
    assert torch.equal(out, expected)
    assert cache.get_seq_length() == full.shape[1] + 7

"""KVzip scores equal an independent recomputation from full attention probabilities.

The reference runs the reconstruction input through a dense DynamicCache with eager attention, takes the full
softmax probabilities, renormalises them over the restricted key set [protected prefix | chunk | repeat input], and
takes the max over query positions and each KV head's query group.
"""

import pytest
import torch
from transformers import DynamicCache

from conftest import HIDDEN_PAIRS, ByteTokenizer, make_pair
from kvzip_cache import KVzipCache, reconstruction_inputs
from references import full_layers, round_cached


def reference_scores(reference, row_ids, prefix_len, chunk_size, tokenizer, hidden=None, fp8=False):
    """{layer: [H, context_len]} scores of one unpadded row, from full eager attention probabilities.

    ``hidden``: {full layer: [1, H, length] bool} cached pairs the reconstruction passes must not see (the pairs a
    compressed cache evicted): their probabilities, hence their scores, are 0. ``fp8``: the full layers' cached
    pairs are rounded to fp8 first (`references.fp8_round`), as a store of fp8 kept pairs holds them.
    """
    num_heads = reference.config.num_key_value_heads
    length = row_ids.shape[0]
    context_len = length - prefix_len
    scores = {}
    for lo, hi, ids in reconstruction_inputs(tokenizer, row_ids[prefix_len:], chunk_size):
        cache = DynamicCache(config=reference.config)
        with torch.no_grad():
            reference(input_ids=row_ids[None], past_key_values=cache, use_cache=True)
            if fp8:
                round_cached(cache, full_layers(reference.config), slice(None))
            HIDDEN_PAIRS.update(hidden or {})
            try:
                out = reference(input_ids=ids[None], past_key_values=cache, use_cache=True, output_attentions=True,
                                position_ids=torch.arange(length, length + ids.numel())[None])
            finally:
                HIDDEN_PAIRS.clear()
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


def _padded_rows(lengths, prefixes, seed=5):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 128, (n,), generator=g) for n in lengths]
    seq = max(lengths)
    ids = torch.zeros(len(rows), seq, dtype=torch.long)
    mask = torch.zeros(len(rows), seq, dtype=torch.long)
    starts = []
    for b, row in enumerate(rows):
        ids[b, seq - len(row):] = row
        mask[b, seq - len(row):] = 1
        starts.append(seq - len(row) + prefixes[b])
    return rows, ids, mask, starts


@pytest.mark.parametrize("arch_name", ["llama", "gemma3"])
@pytest.mark.parametrize("first", ["evict", "keydiff", "evict fp8"])
def test_rescoring_a_compressed_cache_scores_its_kept_pairs(arch_name, first):
    """compress(scorer="kvzip") on a cache compressed another way scores only the pairs it kept: KVzip's restricted
    softmax with the evicted pairs absent, as full eager attention that cannot see them gives it; then it keeps the
    top of those pairs."""
    model, reference = make_pair(arch_name)
    tokenizer = ByteTokenizer()
    lengths, prefixes = [29, 23], [4, 3]
    rows, ids, mask, starts = _padded_rows(lengths, prefixes)
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=torch.tensor(starts), chunk_size=10)
    base, seq = min(starts), ids.shape[1]
    if first.startswith("evict"):  # compressed without scores (fp8: the kept pairs stored as float8)
        keep = torch.rand(cache.selectable_pairs().shape, generator=torch.Generator().manual_seed(3)) < 0.6
        cache.evict(keep, kv_dtype="fp8" if first.endswith("fp8") else None)
    else:
        cache.compress(model, 0.6, scorer="keydiff")
    kept_before = cache.keep_mask.clone()
    cache.compress(model, 0.3, scorer="kvzip", tokenizer=tokenizer, chunk_size=9)
    assert cache.score_source == "kvzip" and cache.compressed_with == ("pair", 0.3)
    selectable = cache.selectable_pairs()
    for b, row in enumerate(rows):
        pad = seq - len(row)
        hidden = {}
        for layer in cache.compressible_layers:
            hide = torch.zeros(1, kept_before.shape[2], len(row), dtype=torch.bool)
            hide[0, :, prefixes[b]:] = ~kept_before[layer, b, :, starts[b] - base:]
            hidden[layer] = hide
        expected = reference_scores(reference, row, prefixes[b], 9, tokenizer, hidden, fp8=first.endswith("fp8"))
        for layer in cache.compressible_layers:
            actual = cache.scores[layer, b, :, starts[b] - base:]
            kept = kept_before[layer, b, :, starts[b] - base:]
            assert torch.equal(~torch.isnan(actual), kept), "scored other pairs than the kept ones"
            torch.testing.assert_close(actual[kept].double(), expected[layer][kept], atol=2e-6, rtol=1e-5)
            assert not bool(expected[layer][~kept].any())  # the reference's hidden pairs get no probability
        assert pad >= 0
    # the new selection: the top 30% of the context among the kept pairs, by the new scores
    keep = cache.keep_mask
    assert not bool((keep & ~kept_before).any())
    for b in range(len(rows)):
        count = round(0.3 * int(selectable[:, b].sum()))
        assert int(keep[:, b].sum()) == count
        ranked = cache.scores[:, b].nan_to_num(float("-inf"))
        assert ranked[keep[:, b]].min() >= ranked[kept_before[:, b] & ~keep[:, b]].max()


def test_rescoring_refuses_what_it_cannot_do():
    model, _ = make_pair("llama")
    tokenizer = ByteTokenizer()
    _, ids, mask, starts = _padded_rows([20], [3])
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=torch.tensor(starts))
    cache.compress(model, 0.5, scorer="keydiff")
    state = (cache.keep_mask.clone(), cache.scores.clone(), cache.kv_bytes())
    with pytest.raises(ValueError, match="can only keep fewer"):
        cache.compress(model, 0.7, scorer="kvzip", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="snapkv scores cannot rate what it kept"):
        cache.compress(model, 0.3, scorer="snapkv")
    assert torch.equal(cache.keep_mask, state[0]) and torch.equal(cache.scores, state[1], ) and cache.kv_bytes() == state[2]
    cache.compress(model, 0.3, scorer="kvzip", tokenizer=tokenizer)  # and then a re-selection of those scores
    cache.compress(model, 0.2)
    assert cache.score_source == "kvzip" and cache.compressed_with == ("pair", 0.2)


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

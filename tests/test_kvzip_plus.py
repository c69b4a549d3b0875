"""KVzip+ scores (KVzap, arXiv 2601.07891) equal an independent float64 recomputation.

score+[l, h, i] = max over reconstruction queries t and query heads j of KV head h's group of
p[j, t, i] * ||W_O^(j) v_i|| / ||h_t||. The reference follows tests/test_scores.py: the reconstruction input runs
through a dense DynamicCache with the float64 eager test attention, whose full softmax probabilities are
renormalised over [protected prefix | chunk | repeat input]. In addition it reads the cached values from the
DynamicCache, the attention modules' input hidden states h_t with a forward pre-hook on self_attn (what KVzap's data
collector reads as kwargs["hidden_states"]), and multiplies each query head's o_proj slice with the values
explicitly, all in float64. No library code is involved in the reference.
"""

import pytest
import torch
from transformers import DynamicCache

from conftest import HIDDEN_PAIRS, ByteTokenizer, make_pair
from kvzip_cache import KVzipCache, reconstruction_inputs
from kvzip_cache.backends import reference as ref
from kvzip_cache.scorers import ReconstructionScorer
from kvzip_cache.views import ScoringKV

CHUNK = 9


def score_by_reconstruction(cache, model, tokenizer, chunk_size=2048, target="kvzip"):
    """The reconstruction scorer's ``[L, B, H, C]`` scores of a prefilled cache (the cache is left as it was)."""
    return ReconstructionScorer(tokenizer, target, chunk_size).score_context(model, cache.prefilled_context())


def reference_plus_scores(reference, row_ids, prefix_len, chunk_size, tokenizer, hidden=None):
    """{layer: [H, context_len]} float64 KVzip+ scores of one unpadded row (full layers only). ``hidden``: as in
    test_scores.reference_scores (the pairs a compressed cache evicted, which the passes do not see)."""
    config = reference.config
    num_heads = config.num_key_value_heads
    group = config.num_attention_heads // num_heads
    length = row_ids.shape[0]
    context_len = length - prefix_len
    decoder_layers = reference.model.layers
    attn_inputs = {}

    def grab(index):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            attn_inputs[index] = hidden.detach().double()
        return hook

    handles = [layer.self_attn.register_forward_pre_hook(grab(i), with_kwargs=True)
               for i, layer in enumerate(decoder_layers)]
    scores = {}
    try:
        for lo, hi, ids in reconstruction_inputs(tokenizer, row_ids[prefix_len:], chunk_size):
            cache = DynamicCache(config=reference.config)
            with torch.no_grad():
                reference(input_ids=row_ids[None], past_key_values=cache, use_cache=True)
                values = [layer.values[0].double().clone() for layer in cache.layers]  # [H, length (or window), D]
                attn_inputs.clear()
                HIDDEN_PAIRS.update(hidden or {})
                try:
                    out = reference(input_ids=ids[None], past_key_values=cache, use_cache=True,
                                    output_attentions=True, position_ids=torch.arange(length, length + ids.numel())[None])
                finally:
                    HIDDEN_PAIRS.clear()
            n = ids.numel()
            restricted = list(range(prefix_len)) + list(range(prefix_len + lo, prefix_len + hi))
            restricted += list(range(length, length + n))
            for layer, probs in enumerate(out.attentions):
                if probs.shape[-1] != length + n:
                    continue  # a sliding layer: never scored
                sub = probs[0][..., restricted].double()  # [Hq, n, R]
                sub = sub / sub.sum(-1, keepdim=True)
                chunk_probs = sub[..., prefix_len : prefix_len + hi - lo]  # [Hq, n, C]
                weight = decoder_layers[layer].self_attn.o_proj.weight.detach().double()  # [hidden, Hq * D]
                chunk_values = values[layer][:, prefix_len + lo : prefix_len + hi]  # [H, C, D]
                head_dim = chunk_values.shape[-1]
                query_norm = attn_inputs[layer][0].norm(dim=-1)  # [n]
                weighted = torch.empty_like(chunk_probs)
                for j in range(num_heads * group):
                    written = chunk_values[j // group] @ weight[:, j * head_dim : (j + 1) * head_dim].T  # [C, hidden]
                    weighted[j] = chunk_probs[j] * written.norm(dim=-1)[None, :] / query_norm[:, None]
                best = weighted.view(num_heads, group, n, hi - lo).amax(dim=(1, 2))
                scores.setdefault(layer, torch.full((num_heads, context_len), float("nan"), dtype=torch.float64))
                scores[layer][:, lo:hi] = best
    finally:
        for handle in handles:
            handle.remove()
    return scores


def _pair(arch_name):
    """`make_pair` with random per-channel input_layernorm weights (the same in both models).

    Freshly initialised RMSNorm weights are uniform, which makes ||h_t|| nearly the same for every token; random
    ones make the 1/||h_t|| weight matter, so that a wrong query-norm weighting fails the comparison.
    """
    model, reference = make_pair(arch_name)
    gen = torch.Generator().manual_seed(17)
    with torch.no_grad():
        weights = {name: torch.rand(p.shape, generator=gen) * 1.8 + 0.2
                   for name, p in reference.named_parameters() if "input_layernorm" in name}
        for net in (model, reference):
            for name, param in net.named_parameters():
                if name in weights:
                    param.copy_(weights[name])
    return model, reference


def _padded_batch(model):
    """A KVzipCache prefilled with two left-padded rows of different lengths and protected prefixes."""
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
    return cache, rows, prefixes, starts


@pytest.mark.parametrize("arch_name", ["llama", "qwen3", "gemma3", "phi3"])
def test_plus_scores_match_float64_recomputation(arch_name):
    model, reference = _pair(arch_name)
    tokenizer = ByteTokenizer()
    cache, rows, prefixes, starts = _padded_batch(model)
    scores = score_by_reconstruction(cache, model, tokenizer, chunk_size=CHUNK, target="kvzip+")
    base = min(starts)
    assert scores.shape == (len(cache.layers), 2, 2, max(len(r) for r in rows) - base)
    assert scores.dtype == torch.float32
    for b, row in enumerate(rows):
        expected = reference_plus_scores(reference, row, prefixes[b], CHUNK, tokenizer)
        assert sorted(expected) == cache.compressible_layers
        for layer in range(len(cache.layers)):
            if layer not in expected:
                assert torch.isnan(scores[layer, b]).all()  # sliding layers stay unscored
                continue
            actual = scores[layer, b, :, starts[b] - base:].double()
            scale = expected[layer].abs().max().item()
            assert scale > 0
            torch.testing.assert_close(actual, expected[layer], atol=1e-5 * scale, rtol=1e-5)
            assert torch.isnan(scores[layer, b, :, : starts[b] - base]).all()  # padding and prefix


@pytest.mark.parametrize("arch_name", ["llama", "gemma3"])
def test_plus_rescoring_of_a_compressed_cache_matches_float64_recomputation(arch_name):
    """compress(scorer="kvzip+") on a cache compressed already scores its kept pairs: the reference's passes do not
    see the evicted pairs."""
    model, reference = _pair(arch_name)
    tokenizer = ByteTokenizer()
    cache, rows, prefixes, starts = _padded_batch(model)
    kept = torch.rand(cache.selectable_pairs().shape, generator=torch.Generator().manual_seed(4)) < 0.6
    cache.evict(kept)
    kept = cache.keep_mask.clone()
    cache.compress(model, 0.3, scorer="kvzip+", tokenizer=tokenizer, chunk_size=CHUNK)
    base = min(starts)
    for b, row in enumerate(rows):
        hidden = {}
        for layer in cache.compressible_layers:
            hide = torch.zeros(1, kept.shape[2], len(row), dtype=torch.bool)
            hide[0, :, prefixes[b]:] = ~kept[layer, b, :, starts[b] - base:]
            hidden[layer] = hide
        expected = reference_plus_scores(reference, row, prefixes[b], CHUNK, tokenizer, hidden)
        for layer in cache.compressible_layers:
            actual = cache.scores[layer, b, :, starts[b] - base:].double()
            row_kept = kept[layer, b, :, starts[b] - base:]
            assert torch.equal(~torch.isnan(actual), row_kept)
            scale = expected[layer].abs().max().item()
            torch.testing.assert_close(actual[row_kept], expected[layer][row_kept], atol=1e-5 * scale, rtol=1e-5)


def test_plus_differs_from_kvzip():
    """Not a rescaled KVzip: the per-pair and per-query weights change the ranking within every head."""
    model, _ = _pair("llama")
    tokenizer = ByteTokenizer()
    cache, _, _, starts = _padded_batch(model)
    kvzip = score_by_reconstruction(cache, model, tokenizer, chunk_size=CHUNK)
    plus = score_by_reconstruction(cache, model, tokenizer, chunk_size=CHUNK, target="kvzip+")
    assert torch.equal(torch.isnan(kvzip), torch.isnan(plus))
    base = min(starts)
    for layer in cache.compressible_layers:
        for b in range(2):
            for h in range(2):
                a, p = kvzip[layer, b, h, starts[b] - base:], plus[layer, b, h, starts[b] - base:]
                ratio = p / a
                assert ratio.std() / ratio.mean() > 1e-2
                assert not torch.equal(a.argsort(), p.argsort())


def test_unknown_target_is_refused():
    model, _ = make_pair("llama")
    cache = KVzipCache(model)
    cache.prefill(model, torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0)), context_start=2)
    with pytest.raises(ValueError, match=r"'kvzip', 'kvzip\+'"):
        score_by_reconstruction(cache, model, ByteTokenizer(), target="kvzap")
    with pytest.raises(ValueError, match=r"unknown scorer 'kvzap'.*kvzip, kvzip\+"):
        cache.compress(model, 0.5, scorer="kvzap", tokenizer=ByteTokenizer())


def test_plus_needs_input_layernorm():
    model, _ = make_pair("llama")
    cache = KVzipCache(model)
    cache.prefill(model, torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0)), context_start=2)
    del model.model.layers[1].input_layernorm
    with pytest.raises(ValueError, match="input_layernorm"):
        score_by_reconstruction(cache, model, ByteTokenizer(), target="kvzip+")


def _plus_view(gen, num_heads=2, group=3, head_dim=8, cached=40, n=23, chunk=(17, 33), hidden=20):
    keys = torch.randn(1, num_heads, cached + n, head_dim, generator=gen)
    values = torch.randn(1, num_heads, cached + n, head_dim, generator=gen)
    query = torch.randn(1, num_heads * group, n, head_dim, generator=gen)
    out_weight = torch.randn(hidden, num_heads * group * head_dim, generator=gen)
    query_norms = torch.rand(n, generator=gen) + 0.5
    prefix = torch.arange(4, 9)
    scores = torch.full((num_heads, chunk[1] - chunk[0]), float("nan"))
    kv = ScoringKV(keys, values, cached, prefix, chunk, scores, query_norms=query_norms)
    return query, kv, out_weight


@pytest.mark.parametrize("block_elements", [1 << 26, 2000])  # one block / many blocks of queries
def test_reference_plus_scores_match_naive(block_elements):
    gen = torch.Generator().manual_seed(11)
    query, kv, out_weight = _plus_view(gen)
    num_heads, group, head_dim = 2, 3, 8
    cached, n = kv.cached_length, kv.new_keys.shape[-2]
    start, end = kv.chunk
    cached_keys = kv.keys[0, :, :cached]
    got = ref.restricted_max_scores_plus(
        query[0], cached_keys[:, kv.prefix_positions], cached_keys[:, start:end], kv.new_keys[0], 0.4,
        ref.output_value_norms(out_weight, kv.values[0, :, start:end]), kv.query_norms, block_elements=block_elements,
    )
    out = ref.scoring_attention(query, kv, 0.4, None, out_weight=out_weight)
    assert out.shape == (1, n, num_heads * group, head_dim)
    torch.testing.assert_close(kv.scores_out, got, atol=0, rtol=0)  # the pass writes the same scores

    causal = torch.arange(cached + n)[None, :] <= torch.arange(cached, cached + n)[:, None]
    restricted = torch.cat([kv.prefix_positions, torch.arange(start, end), torch.arange(cached, cached + n)])
    for h in range(num_heads):
        best = torch.zeros(end - start, dtype=torch.float64)
        for j in range(group):
            qh = h * group + j
            logits = (query[0, qh].double() @ kv.keys[0, h].double().T * 0.4).masked_fill(~causal, float("-inf"))
            probs = torch.softmax(logits[:, restricted], -1)[:, len(kv.prefix_positions) :][:, : end - start]
            w = out_weight[:, qh * head_dim : (qh + 1) * head_dim].double()
            written = (kv.values[0, h, start:end].double() @ w.T).norm(dim=-1)  # [C]
            best = torch.maximum(best, (probs * written[None] / kv.query_norms.double()[:, None]).amax(0))
        torch.testing.assert_close(got[h].double(), best, atol=1e-5 * best.max().item(), rtol=1e-5)


def test_triton_backend_routes_plus_passes_to_the_reference():
    kernels = pytest.importorskip("kvzip_cache.kernels")
    if not kernels.TRITON_AVAILABLE:
        pytest.skip("Triton is not installed")
    from kvzip_cache.backends import triton_backend

    query, kv, out_weight = _plus_view(torch.Generator().manual_seed(3))
    expected_kv = ScoringKV(kv.keys, kv.values, kv.cached_length, kv.prefix_positions, kv.chunk,
                            kv.scores_out.clone(), query_norms=kv.query_norms)
    out = triton_backend.scoring_attention(query, kv, 0.4, None, out_weight=out_weight)
    expected = ref.scoring_attention(query, expected_kv, 0.4, None, out_weight=out_weight)
    assert torch.equal(out, expected)
    assert torch.equal(kv.scores_out, expected_kv.scores_out)

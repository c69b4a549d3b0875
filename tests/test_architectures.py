"""End-to-end equivalence on every supported architecture (tiny random models, float32).

- ratio 1.0: the compressed (ragged) cache gives the logits of a plain DynamicCache run.
- ratio < 1: the logits equal a dense reference in which exactly the evicted (layer, head, position) pairs are hidden
  from the query tokens.
"""

import pytest
import torch

from cache_state import assert_same_state, cache_state
from conftest import make_pair, reference_logits
from kvzip_cache import KVzipCache
from references import full_layers, hidden_from_keep, reference_generate

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


# --------------------------------------------------------------------- generation with evicted pairs, per architecture
# Batches, greedy decoding, sampling, beams, multi-turn, crop and save/load on every architecture, with pairs evicted
# (ratio 0.4), against the float64 dense reference that hides exactly those pairs from everything after the context
# (`references.reference_generate`, conftest's `reference_logits`). Tiny contexts: about a second per test.
def _compressed(arch, tokenizer, seed, batch):
    """(model, reference, cache compressed at 0.4, context ids, context mask, question, hidden pairs). With batch 2,
    row 1 is left-padded and each row has its own protected prefix; the questions have equal lengths (a padded
    question on a sliding layer is test_sliding_windows.py's business)."""
    model, reference = make_pair(arch)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, 30), generator=gen)
    mask = torch.ones_like(ids)
    starts = torch.tensor([4, 9][:batch])
    if batch > 1:
        ids[1, :5], mask[1, :5] = 0, 0
    question = torch.randint(3, 128, (batch, 4), generator=gen)
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=starts, chunk_size=16)
    cache.compress(model, 0.4, tokenizer=tokenizer, chunk_size=12)
    hidden = hidden_from_keep(cache.keep_mask, mask, cache.context_start, full_layers(model.config), ids.shape[1])
    assert all(pairs.any() for pairs in hidden.values())
    return model, reference, cache, ids, mask, question, hidden


def _generate(model, cache, question, **kwargs):
    out = model.generate(**cache.inputs_for(question), past_key_values=cache, return_dict_in_generate=True,
                         output_logits=True, **kwargs)
    cache.rollback()
    return out


def test_batch_greedy_and_sampled_answers_with_evicted_pairs_equal_the_masked_reference(arch, byte_tokenizer):
    """A left-padded batch of two contexts: greedy tokens and logits, and tokens sampled from a fixed seed."""
    model, reference, cache, ids, mask, question, hidden = _compressed(arch, byte_tokenizer, 11, batch=2)
    steps = dict(max_new_tokens=5, min_new_tokens=5, pad_token_id=0)
    greedy = _generate(model, cache, question, do_sample=False, **steps)
    expected = reference_generate(reference, ids, mask, hidden, question, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, **steps)
    assert torch.equal(greedy.sequences, expected.sequences)
    got, want = torch.stack(greedy.logits, 1), torch.stack(expected.logits, 1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    unmasked = reference_logits(reference, ids, question, context_mask=mask)[:, -1]  # nothing hidden
    assert (unmasked - got[:, 0]).abs().max() > 1e-3  # the evicted pairs matter to these answers

    torch.manual_seed(5)
    sampled = _generate(model, cache, question, do_sample=True, top_k=40, **steps).sequences
    expected = reference_generate(reference, ids, mask, hidden, question, seed=5, do_sample=True, top_k=40, **steps)
    assert torch.equal(sampled, expected)
    assert not torch.equal(sampled, greedy.sequences)  # sampling drew something else than the argmax somewhere


def test_beam_search_with_evicted_pairs_equals_the_masked_reference(arch, byte_tokenizer):
    """Three beams over the compressed context (repeated with batch_repeat_interleave, shared, not copied): the
    reference's beams and their scores; rollback returns to one row."""
    model, reference, cache, ids, mask, question, hidden = _compressed(arch, byte_tokenizer, 12, batch=1)
    context_bytes = cache.kv_bytes()
    stores = lambda: [cache.layers[idx].context.keys.data_ptr() for idx in cache.compressible_layers]  # noqa: E731
    before = stores()
    beams = dict(num_beams=3, num_return_sequences=3, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                 output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    cache.batch_repeat_interleave(3)
    assert stores() == before  # the beams read the one compressed context (sliding windows are per row)
    got = model.generate(torch.cat([ids, question], 1), past_key_values=cache, **beams)
    expected = reference_generate(reference, ids, mask, hidden, question, **beams)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores.to(got.sequences_scores.dtype),
                               atol=1e-4, rtol=0)
    hidden_first, plain_first = (reference_logits(reference, ids, question, hidden=pairs)[:, -1]
                                 for pairs in (hidden, None))
    assert (hidden_first - plain_first).abs().max() > 1e-3  # the evicted pairs matter to the beams
    cache.rollback()
    assert all(cache.layers[idx].src_rows == (0,) for idx in cache.compressible_layers)
    assert cache.kv_bytes() == context_bytes and stores() == before


def test_multi_turn_and_crop_with_evicted_pairs_equal_the_masked_reference(arch, byte_tokenizer):
    """Two turns kept in the cache (question, answer, follow-up); then the follow-up cropped and another asked.
    Sliding-window models cannot crop once a window has filled: they refuse, change nothing, and roll back."""
    model, reference, cache, ids, mask, question, hidden = _compressed(arch, byte_tokenizer, 13, batch=1)
    gen = torch.Generator().manual_seed(14)
    answer, follow_up, other = (torch.randint(3, 128, (1, n), generator=gen) for n in (3, 5, 2))
    _query_logits(model, cache, question)
    _query_logits(model, cache, answer)
    got = _query_logits(model, cache, follow_up)
    expected = reference_logits(reference, ids, question, answer, follow_up, hidden=hidden)
    torch.testing.assert_close(got, expected.float(), atol=1e-4, rtol=0)
    assert (reference_logits(reference, ids, question, answer, follow_up) - expected).abs().max() > 1e-3
    if any(kind != "full_attention" for kind in (getattr(model.config, "layer_types", None) or [])):
        before = cache_state(cache)
        with pytest.raises(ValueError, match="sliding-window layers keep only their last"):
            cache.crop(-follow_up.shape[1])
        assert_same_state(before, cache_state(cache))
        cache.rollback()
        got = _query_logits(model, cache, other)
        expected = reference_logits(reference, ids, other, hidden=hidden)
    else:
        cache.crop(-follow_up.shape[1])
        assert cache.get_seq_length() == ids.shape[1] + question.shape[1] + answer.shape[1]
        got = _query_logits(model, cache, other)
        expected = reference_logits(reference, ids, question, answer, other, hidden=hidden)
    torch.testing.assert_close(got, expected.float(), atol=1e-4, rtol=0)


def test_a_saved_and_loaded_batch_answers_as_the_masked_reference(arch, byte_tokenizer, tmp_path):
    """save -> load: the loaded cache holds the saved one bit for bit (every layer's pairs, windows, masks and
    scores) and answers a left-padded batch with the reference's greedy tokens."""
    model, reference, cache, ids, mask, question, hidden = _compressed(arch, byte_tokenizer, 15, batch=2)
    loaded = KVzipCache.load(cache.save(tmp_path / "c.kvzip"), model)
    assert_same_state(cache_state(cache), cache_state(loaded))
    steps = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    got = _generate(model, loaded, question, **steps).sequences
    assert torch.equal(got, reference_generate(reference, ids, mask, hidden, question, **steps))

"""Cache semantics: real memory savings, O(new) appends, rollback, multi-turn, crop, beams, sampling, batches."""

import pytest
import torch
from transformers import DynamicCache

from conftest import ByteTokenizer, make_pair, reference_logits
from kvzip_cache import KVzipCache

TOK = ByteTokenizer()


def _ids(n, seed, batch=1):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def _compressed(arch="llama", ratio=0.3, n=40, prefix=4, seed=0, level="pair"):
    model, reference = make_pair(arch)
    context = _ids(n, seed)
    cache = KVzipCache(model)
    cache.prefill(model, context, context_start=prefix)
    cache.compress(model, ratio, tokenizer=TOK, chunk_size=16, level=level)
    return model, reference, cache, context


def _hidden(cache, n):
    hidden = {}
    for idx in cache.compressible_layers:
        evicted = torch.zeros(cache.input_ids.shape[0], cache.num_kv_heads, n, dtype=torch.bool)
        evicted[..., cache.context_offset:] = ~cache.keep_mask[idx]
        hidden[idx] = evicted
    return hidden


def _forward(model, cache, ids):
    n = cache.get_seq_length()
    with torch.no_grad():
        return model(input_ids=ids, past_key_values=cache, use_cache=True,
                     position_ids=torch.arange(n, n + ids.shape[1])[None]).logits


@pytest.mark.parametrize("arch_name", ["llama", "gemma3"])
def test_kv_bytes_fall_with_the_ratio_exactly(arch_name):
    model, _ = make_pair(arch_name)
    context, prefix, n = _ids(200, 1), 8, 200
    cache = KVzipCache(model)
    cache.prefill(model, context, context_start=prefix)
    full_bytes = cache.kv_bytes()
    config = model.config
    pair_bytes = 2 * config.head_dim * 4  # key + value, float32
    full_layers = len(cache.compressible_layers)
    sliding_bytes = full_bytes - full_layers * config.num_key_value_heads * n * pair_bytes
    report = cache.compress(model, 0.3, tokenizer=TOK, chunk_size=64)
    kept = round(0.3 * full_layers * config.num_key_value_heads * (n - prefix))
    prefix_pairs = full_layers * config.num_key_value_heads * prefix
    assert int(cache.keep_mask.sum()) == kept
    assert cache.kv_bytes() == report.bytes_after == (kept + prefix_pairs) * pair_bytes + sliding_bytes
    context_bytes = full_layers * config.num_key_value_heads * (n - prefix) * pair_bytes
    assert cache.metadata_bytes() <= 0.02 * (context_bytes + prefix_pairs * pair_bytes) + 64 * full_layers
    for idx in cache.compressible_layers:
        assert cache.layers[idx].keys is None  # the dense copy is gone, not masked


def test_appending_never_copies_the_context():
    model, _, cache, context = _compressed()
    layer = cache.layers[cache.compressible_layers[0]]
    context_ptr = layer.context.keys.data_ptr()
    reallocations, last_ptr = 0, None
    for step in range(100):
        _forward(model, cache, _ids(1, 100 + step))
        ptr = layer.tail_keys.data_ptr()
        reallocations += ptr != last_ptr
        last_ptr = ptr
    assert layer.context.keys.data_ptr() == context_ptr
    assert reallocations <= 2  # 64 -> 128 slots: geometric growth, not a copy per token
    assert layer.tail_length == 100 and cache.get_seq_length() == context.shape[1] + 100


def test_scoring_passes_write_into_reserved_room_without_touching_the_cache():
    from kvzip_cache.layers import KVzipLayer

    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 3, 10, 4, generator=gen), torch.randn(2, 3, 10, 4, generator=gen)
    new_k, new_v = torch.randn(1, 3, 5, 4, generator=gen), torch.randn(1, 3, 5, 4, generator=gen)
    plain, roomy = KVzipLayer(), KVzipLayer()
    for layer in (plain, roomy):
        layer.update(keys.clone(), values.clone())
    roomy.reserve(6)
    assert roomy.kv_bytes() == 2 * 2 * 3 * 16 * 4 * 4  # the room counts as allocated memory
    storage = roomy.keys.data_ptr()
    for row in (1, 0):
        expected, _ = plain.peek(new_k, new_v, row, (0, 10), torch.arange(0), None)
        view, _ = roomy.peek(new_k, new_v, row, (0, 10), torch.arange(0), None)
        assert view.keys.data_ptr() == storage + row * roomy._spare_keys.stride(0) * 4  # a view, not a copy
        torch.testing.assert_close(view.keys, expected.keys, rtol=0, atol=0)
        torch.testing.assert_close(view.values, expected.values, rtol=0, atol=0)
        torch.testing.assert_close(view.new_keys, new_k, rtol=0, atol=0)
    torch.testing.assert_close(roomy.keys, keys, rtol=0, atol=0)  # the cached part is untouched
    torch.testing.assert_close(roomy.values, values, rtol=0, atol=0)
    roomy.update(new_k.expand(2, -1, -1, -1), new_v.expand(2, -1, -1, -1))  # a dense append drops the room
    assert roomy._spare_keys is None and roomy.keys.shape[-2] == 15


@pytest.mark.parametrize("compress_first", [False, True])
def test_reset_then_prefill_equals_a_new_cache(compress_first):
    model, reference, cache, _ = _compressed("gemma3", n=30)  # sliding layers must be emptied too
    if not compress_first:
        cache = KVzipCache(model)
        cache.prefill(model, _ids(30, 5), context_start=4)  # a dense cache
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.kv_bytes() == 0
    context, question = _ids(25, 7), _ids(5, 8)
    cache.prefill(model, context, context_start=4)
    torch.testing.assert_close(_forward(model, cache, question), reference_logits(reference, context, question),
                               atol=1e-4, rtol=0)


def test_rollback_serves_the_next_question_as_a_fresh_cache():
    model, _, cache, context = _compressed("gemma3", n=30)  # sliding layers must roll back too
    q1, q2 = _ids(5, 11), _ids(6, 12)
    fresh = _forward(model, cache, q2)
    cache.rollback()
    bytes_after_compress = cache.kv_bytes()
    model.generate(torch.cat([context, q1], 1), past_key_values=cache, max_new_tokens=10, do_sample=False)
    assert cache.get_seq_length() > context.shape[1]
    cache.rollback()
    assert cache.get_seq_length() == context.shape[1]
    assert cache.kv_bytes() == bytes_after_compress
    torch.testing.assert_close(_forward(model, cache, q2), fresh, atol=1e-6, rtol=0)


def test_multi_turn_equals_masked_dense_reference():
    model, reference, cache, context = _compressed(n=40)
    turn1, turn2 = _ids(7, 21), _ids(5, 22)
    _forward(model, cache, turn1)  # no rollback: the turn stays in the cache
    actual = _forward(model, cache, turn2)
    expected = reference_logits(reference, context, turn1, turn2, hidden=_hidden(cache, 40))
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_crop_drops_appended_tokens_only():
    model, _, cache, context = _compressed()
    keep, drop = _ids(3, 31), _ids(4, 32)
    _forward(model, cache, keep)
    expected = _forward(model, cache, _ids(2, 33))
    cache.crop(-2)
    _forward(model, cache, drop)
    cache.crop(-4)
    assert cache.get_seq_length() == context.shape[1] + 3
    torch.testing.assert_close(_forward(model, cache, _ids(2, 33)), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="compressed context"):
        cache.crop(-10)
    assert cache.get_seq_length() == context.shape[1] + 5  # the failed crop changed nothing


def test_beam_search_after_batch_repeat_interleave():
    model, reference, cache, context = _compressed(ratio=1.0)
    reference.set_attn_implementation("sdpa")
    full = torch.cat([context, _ids(5, 41)], 1)
    context_bytes = cache.layers[0].context.kv_bytes()
    cache.batch_repeat_interleave(3)
    out = model.generate(full, past_key_values=cache, num_beams=3, max_new_tokens=6, do_sample=False)
    expected = reference.generate(full, num_beams=3, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, expected)
    assert cache.layers[0].context.kv_bytes() == context_bytes  # beams share the compressed context
    cache.rollback()
    assert cache.layers[0].src_rows == (0,)


def test_sampling_matches_dynamic_cache_at_ratio_one():
    model, reference, cache, context = _compressed("qwen2", ratio=1.0)
    reference.set_attn_implementation("sdpa")
    full = torch.cat([context, _ids(4, 51)], 1)
    torch.manual_seed(123)
    out = model.generate(full, past_key_values=cache, do_sample=True, top_k=20, max_new_tokens=8)
    torch.manual_seed(123)
    expected = reference.generate(full, past_key_values=DynamicCache(config=reference.config), do_sample=True,
                                  top_k=20, max_new_tokens=8)
    assert torch.equal(out, expected)


def test_generation_stops_at_stop_tokens():
    model, _, cache, context = _compressed()
    full = torch.cat([context, _ids(4, 61)], 1)
    greedy = model.generate(full, past_key_values=cache, max_new_tokens=5, do_sample=False)
    cache.rollback()
    stop = int(greedy[0, full.shape[1] + 1])
    out = model.generate(full, past_key_values=cache, max_new_tokens=5, do_sample=False, eos_token_id=stop)
    assert out.shape[1] <= full.shape[1] + 2 and int(out[0, -1]) == stop


def _left_pad(rows):
    seq = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), seq, dtype=torch.long)
    mask = torch.zeros(len(rows), seq, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, seq - len(row):], mask[b, seq - len(row):] = row, 1
    return ids, mask


@pytest.mark.parametrize("arch_name", ["llama", "gemma3"])
def test_left_padded_batch_equals_rows_compressed_alone(arch_name):
    model, _ = make_pair(arch_name)
    rows, prefixes = [_ids(33, 71)[0], _ids(24, 72)[0]], [4, 3]
    ids, mask = _left_pad(rows)
    starts = torch.tensor([ids.shape[1] - len(r) + p for r, p in zip(rows, prefixes)])
    batched = KVzipCache(model)
    batched.prefill(model, ids, mask, context_start=starts, chunk_size=16)
    batched.compress(model, 0.5, tokenizer=TOK, chunk_size=12)
    question = _ids(5, 73)
    inputs = batched.inputs_for(question)
    out = model.generate(**inputs, past_key_values=batched, max_new_tokens=6, do_sample=False)
    batched.rollback()
    n = ids.shape[1]
    with torch.no_grad():
        batch_logits = model(**{"input_ids": question.expand(2, -1), "attention_mask": inputs["attention_mask"]},
                             past_key_values=batched,
                             position_ids=mask.sum(1, keepdim=True) + torch.arange(5)[None]).logits
    for b, (row, prefix) in enumerate(zip(rows, prefixes)):
        alone = KVzipCache(model)
        alone.prefill(model, row[None], context_start=prefix, chunk_size=16)
        alone.compress(model, 0.5, tokenizer=TOK, chunk_size=12)
        assert torch.equal(alone.keep_mask[:, 0], batched.keep_mask[:, b, :, starts[b] - batched.context_offset:])
        torch.testing.assert_close(batch_logits[b], _forward(model, alone, question)[0], atol=1e-4, rtol=0)
        alone.rollback()
        single = model.generate(torch.cat([row[None], question], 1), past_key_values=alone, max_new_tokens=6,
                                do_sample=False)
        assert torch.equal(out[b, n + 5:], single[0, len(row) + 5:])


def test_padded_batch_at_ratio_one_matches_dynamic_cache():
    model, reference = make_pair("mistral")
    reference.set_attn_implementation("sdpa")
    ids, mask = _left_pad([_ids(30, 81)[0], _ids(22, 82)[0]])
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=torch.tensor([2, 10]))
    cache.compress(model, 1.0, tokenizer=TOK)
    inputs = cache.inputs_for(_ids(4, 83))
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=6, do_sample=False)
    expected = reference.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, expected)


def test_second_compress_reselects_among_kept_pairs():
    model, _, cache, context = _compressed(ratio=0.5)
    report = cache.compress(model, 0.25)  # no tokenizer needed: the stored scores are reused
    fresh_model, _, fresh, _ = _compressed(ratio=0.25)
    assert torch.equal(cache.keep_mask, fresh.keep_mask)
    assert report.achieved_ratio == pytest.approx(0.25, abs=0.01)
    question = _ids(5, 91)
    torch.testing.assert_close(_forward(model, cache, question), _forward(fresh_model, fresh, question))
    cache.rollback()
    with pytest.raises(ValueError, match="already compressed"):
        cache.compress(model, 0.5)


def test_head_level_equals_masked_dense_reference():
    model, reference = make_pair("gemma3")
    context = _ids(30, 101)
    cache = KVzipCache(model)
    cache.prefill(model, context, context_start=3)
    head_scores = torch.tensor([[0.0, 0.0], [0.9, 0.1], [0.0, 0.0], [0.2, 0.8]])
    report = cache.compress(model, 0.5, level="head", head_scores=head_scores)
    kept_heads = cache.keep_mask.any(dim=(1, 3))
    assert kept_heads.tolist() == [[False, False], [True, False], [False, False], [False, True]]
    assert report.achieved_ratio == 0.5
    question = _ids(6, 102)
    expected = reference_logits(reference, context, question, hidden=_hidden(cache, 30))
    torch.testing.assert_close(_forward(model, cache, question), expected, atol=1e-4, rtol=0)


def test_custom_evict_keeps_exactly_the_given_pairs():
    """Every (layer, row, KV head) stores exactly the dense cache's pairs that its own slice of the mask selects (plus
    the protected prefix), in position order: a mask applied with heads, rows or layers swapped stores other pairs."""
    model, reference = make_pair("qwen3")
    context, mask = _ids(25, 111, batch=2), torch.ones(2, 25, dtype=torch.long)
    context[1, :3], mask[1, :3] = 0, 0
    starts = torch.tensor([5, 8])
    cache = KVzipCache(model)
    cache.prefill(model, context, mask, context_start=starts)
    dense = {idx: (cache.layers[idx].keys.clone(), cache.layers[idx].values.clone())
             for idx in cache.compressible_layers}
    offset = int(starts.min())
    selectable = (mask.bool() & (torch.arange(25)[None] >= starts[:, None]))[:, offset:]  # [B, 20]
    keep = (torch.rand(3, 2, 2, 20, generator=torch.Generator().manual_seed(113)) < 0.4) & selectable[None, :, None]
    assert not torch.equal(keep, keep.flip(2)) and not torch.equal(keep, keep.flip(1))  # every slice its own
    cache.evict(keep)
    assert torch.equal(cache.keep_mask, keep)
    for idx in cache.compressible_layers:
        context_store, (keys, values) = cache.layers[idx].context, dense[idx]
        for row in range(2):
            prefix = [p for p in range(int(starts[row])) if mask[row, p]]
            for head in range(2):
                segment = row * 2 + head
                lo, hi = context_store.offsets[segment], context_store.offsets[segment + 1]
                positions = prefix + (keep[idx, row, head].nonzero().flatten() + offset).tolist()
                assert context_store.positions[lo:hi].tolist() == positions, (idx, row, head)
                assert torch.equal(context_store.keys[lo:hi], keys[row, head, positions]), (idx, row, head)
                assert torch.equal(context_store.values[lo:hi], values[row, head, positions]), (idx, row, head)
    question = _ids(4, 112, batch=2)
    hidden = {}
    for idx in cache.compressible_layers:  # from the mask given, not the one the cache reports
        hidden[idx] = torch.zeros(2, 2, 25, dtype=torch.bool)
        hidden[idx][..., offset:] = ~keep[idx] & selectable[:, None]
    expected = reference_logits(reference, context, question, context_mask=mask, hidden=hidden)
    inputs = cache.inputs_for(question)
    with torch.no_grad():
        got = model(input_ids=question, attention_mask=inputs["attention_mask"], past_key_values=cache,
                    position_ids=(inputs["attention_mask"].cumsum(-1) - 1)[:, -4:]).logits
    torch.testing.assert_close(got, expected.float(), atol=1e-4, rtol=0)


def test_generate_accepts_the_cache_under_either_keyword():
    from kvzip_cache.compat import cache_kwarg

    model, _, cache, context = _compressed()
    full = torch.cat([context, _ids(4, 121)], 1)
    expected = model.generate(full, past_key_values=cache, max_new_tokens=4, do_sample=False)
    cache.rollback()
    out = model.generate(full, max_new_tokens=4, do_sample=False, **{cache_kwarg(model): cache})
    assert torch.equal(out, expected) and cache.get_seq_length() == full.shape[1] + 3

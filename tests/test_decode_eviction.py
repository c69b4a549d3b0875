"""Eviction while decoding (`KVzipCache.evict_while_decoding`): logits, memory bound, rollback, refusals.

The reference is independent of the library: a float64 eager model over a dense DynamicCache (conftest's reference
attention) that re-derives every decision itself (when the tail reaches 2 x window, the predictor's scores of the
oldest tokens from the reference's own keys, a top-k per row) and hides the evicted pairs from all later tokens.
"""

import copy

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from conftest import make_pair
from kvzip_cache import KVzipCache, ScorePredictor
from kvzip_cache.selection import kept_count
from references import decode_with_eviction, full_layers, hidden_from_keep, predictor_rating

WINDOW = 4


def _context(gen, batch):
    ids = torch.randint(3, 120, (batch, 29), generator=gen)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :4] = 0  # left padding
    return ids, mask, torch.tensor([2, 6][:batch])


def _compressed(arch, kind, seed, batch=2):
    """(model, reference, predictor, cache compressed at 0.5 by the predictor, (ids, mask, starts), generator)."""
    model, reference = make_pair(arch)
    predictor = ScorePredictor.init(model, kind, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    ids, mask, starts = _context(gen, batch)
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=starts)
    cache.compress(model, 0.5, predictor=predictor)
    return model, reference, predictor, cache, (ids, mask, starts), gen


@pytest.mark.parametrize("arch,batch", [("llama", 2), ("gemma3", 2), ("llama", 1)])
def test_generate_with_decode_eviction_equals_the_step_by_step_masked_reference(arch, batch):
    model, reference, predictor, cache, (ids, mask, _), gen = _compressed(arch, "mlp", 10, batch)
    question = torch.randint(3, 120, (batch, 5), generator=gen)
    question_mask = torch.ones_like(question)
    if batch > 1:
        question_mask[1, :2] = 0  # a left-padded question: its padding is never kept
    cache.evict_while_decoding(model, predictor, 0.4, window=WINDOW)
    out = model.generate(**cache.inputs_for(question, question_mask), past_key_values=cache, max_new_tokens=23,
                         min_new_tokens=23, do_sample=False, output_logits=True, return_dict_in_generate=True)
    generated = out.sequences[:, ids.shape[1] + question.shape[1]:]
    starts = cache.context_start
    context_hidden = hidden_from_keep(cache.keep_mask, mask, starts, full_layers(model.config), ids.shape[1])
    expected, decisions = decode_with_eviction(reference, predictor_rating(predictor, reference), context_hidden, ids,
                                               mask, question, question_mask, generated, 0.4, WINDOW)
    history = cache.decode_eviction.history
    assert len(history) == len(decisions) >= 4  # the question's 5 tokens, then every 4 generated ones
    for step, (start, keep) in zip(history, decisions):
        assert step.start == start and torch.equal(step.keep, keep)
    torch.testing.assert_close(torch.stack(out.logits).double(), expected.double(), atol=1e-4, rtol=0)
    # the appended tokens that stay: the kept pairs of every evicted window plus the dense tail
    layers = full_layers(model.config)
    tail = cache.layers[layers[0]].tail_length
    assert WINDOW <= tail < 2 * WINDOW + 1
    assert cache.get_seq_length() == out.sequences.shape[1] - 1
    for step in history:
        L = len(layers)
        per_row = step.keep.sum(dim=(0, 2, 3))
        real = torch.cat([question_mask, torch.ones_like(generated)], 1)[:, step.start - ids.shape[1]:][:, :step.count]
        for row in range(batch):
            assert int(per_row[row]) == kept_count(0.4, int(real[row].sum()) * L * model.config.num_key_value_heads)


def test_rollback_returns_to_the_compressed_context_and_answers_repeat():
    model, _, predictor, cache, _, gen = _compressed("gemma3", "linear", 2)
    compressed = copy.deepcopy(cache)
    cache.evict_while_decoding(model, predictor, 0.3, window=WINDOW)
    question = torch.randint(3, 120, (2, 3), generator=gen)
    inputs = cache.inputs_for(question)
    first = model.generate(**inputs, past_key_values=cache, max_new_tokens=20, do_sample=False)
    assert cache.decode_eviction.history
    cache.rollback()
    assert cache.kv_bytes() == compressed.kv_bytes() and not cache.decode_eviction.history
    for mine, theirs in zip(cache.layers, compressed.layers):
        if getattr(mine, "context", None) is not None:
            assert torch.equal(mine.context.keys, theirs.context.keys)
            assert mine.context.offsets == theirs.context.offsets
    assert torch.equal(model.generate(**inputs, past_key_values=cache, max_new_tokens=20, do_sample=False), first)
    # turned off: the next answer keeps every appended token, as without it
    cache.rollback()
    cache.evict_while_decoding(None)
    plain = model.generate(**inputs, past_key_values=cache, max_new_tokens=20, do_sample=False)
    without = model.generate(**inputs, past_key_values=compressed, max_new_tokens=20, do_sample=False)
    assert torch.equal(plain, without) and cache.kv_bytes() == compressed.kv_bytes()


def test_a_stop_token_ends_one_row_and_leaves_the_other_row_as_without_it():
    """Row 0 meets a stop token after evictions began; generate pads it from then on. Row 1 evicts by its own budget,
    so its answer is the one it gives when nothing stops; row 0's answer is the same up to its stop token."""
    model, _, predictor, cache, _, gen = _compressed("llama", "mlp", 6)
    inputs = cache.inputs_for(torch.randint(3, 120, (2, 5), generator=gen))
    prompt = inputs["input_ids"].shape[1]
    cache.evict_while_decoding(model, predictor, 0.4, window=WINDOW)
    free = model.generate(**inputs, past_key_values=cache, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    cache.rollback()
    answers = free[:, prompt:]
    # a token of row 0, past the first eviction, that row 1 never generates and row 0 has not generated before
    step = next(i for i in range(12, 24) if answers[0, i] not in answers[1] and answers[0, i] not in answers[0, :i])
    stop = int(answers[0, step])
    cache.evict_while_decoding(model, predictor, 0.4, window=WINDOW)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=24, do_sample=False, eos_token_id=stop,
                         pad_token_id=0)
    assert cache.decode_eviction.history
    stopped = out[:, prompt:]
    assert torch.equal(stopped[0, : step + 1], answers[0, : step + 1]) and (stopped[0, step + 1 :] == 0).all()
    assert torch.equal(stopped[1], answers[1])
    cache.rollback()  # back to the compressed context, ready for the next question
    again = model.generate(**inputs, past_key_values=cache, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert torch.equal(again, free)


def test_crop_cuts_the_tail_but_not_the_answer_tokens_that_joined_the_store():
    model, _, predictor, cache, _, gen = _compressed("llama", "linear", 3)
    cache.evict_while_decoding(model, predictor, 0.3, window=WINDOW)
    inputs = cache.inputs_for(torch.randint(3, 120, (2, 3), generator=gen))
    model.generate(**inputs, past_key_values=cache, max_new_tokens=20, do_sample=False)
    joined = cache.layers[cache.compressible_layers[0]].context_length
    assert joined > cache.context_length and cache.get_seq_length() > joined + 1
    cache.crop(-1)
    assert cache.get_seq_length() == inputs["input_ids"].shape[1] + 20 - 2
    before = (cache.get_seq_length(), cache.kv_bytes())
    with pytest.raises(ValueError, match=rf"evict_while_decoding\(\) moved tokens {cache.context_length}\.\.\.{joined - 1}"
                                         rf".*Crop to {joined} tokens or more.*rollback"):
        cache.crop(joined - 1)
    assert (cache.get_seq_length(), cache.kv_bytes()) == before
    cache.crop(joined)
    assert cache.get_seq_length() == joined


class _RecordBytes(StoppingCriteria):
    """Records ``cache.kv_bytes()`` after every step, and the reserved-room lease of layer 0's store (a new lease is
    a rebuilt store; the objects are kept, so no id is reused). Stops nothing."""

    def __init__(self, cache):
        self.cache, self.seen, self.leases = cache, [], []

    def __call__(self, input_ids, scores, **kwargs):
        self.seen.append(self.cache.kv_bytes())
        lease = self.cache.layers[0].context.lease
        if lease is not None and not any(lease[0] is seen for seen in self.leases):
            self.leases.append(lease[0])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_kv_bytes_stay_bounded_over_a_2000_token_sampled_multi_turn_generation():
    model, _ = make_pair("llama")
    predictor = ScorePredictor.init(model, "linear", seed=4)
    ids = torch.randint(3, 120, (1, 40), generator=torch.Generator().manual_seed(5))
    cache = KVzipCache(model)
    cache.prefill(model, ids, context_start=2)
    cache.compress(model, 0.5, predictor=predictor)
    compressed = cache.kv_bytes()
    window, ratio = 32, 0.25
    cache.evict_while_decoding(model, predictor, ratio, window=window)
    record = _RecordBytes(cache)
    torch.manual_seed(0)
    out = model.generate(**cache.inputs_for(torch.tensor([[7, 8, 9]])), past_key_values=cache, max_new_tokens=1900,
                         min_new_tokens=1900, do_sample=True, top_k=20, stopping_criteria=StoppingCriteriaList([record]))
    # a second turn on the same conversation (no rollback): 100 more tokens
    turn = torch.cat([out, torch.tensor([[10, 11]])], 1)
    out = model.generate(turn, attention_mask=torch.ones_like(turn), past_key_values=cache, max_new_tokens=98,
                         min_new_tokens=98, do_sample=True, stopping_criteria=StoppingCriteriaList([record]))
    appended = out.shape[1] - 1 - 40
    assert cache.get_seq_length() == out.shape[1] - 1 and appended == 1900 + 2 + 98 + 3 - 1
    config = model.config
    layers, heads, head_dim = config.num_hidden_layers, config.num_key_value_heads, 16
    pair_bytes = 2 * head_dim * 4  # key + value, float32
    evicted = sum(step.count for step in cache.decode_eviction.history)
    assert appended - evicted < 2 * window + 2
    # kept pairs: round(ratio x pairs) per eviction, in a store whose reserved room holds at most a quarter of them or
    # four appends of a window, plus the append that overflowed (CompressedContext.append); the tail's buffer: at most
    # 4 x window slots a (layer, head)
    kept_bound = sum(kept_count(ratio, step.count * layers * heads) for step in cache.decode_eviction.history)
    room_bound = kept_bound // 4 + layers * heads * 5 * window
    bound = compressed + (kept_bound + room_bound) * pair_bytes + layers * heads * 4 * window * pair_bytes
    assert max(record.seen) <= bound
    # vs keeping every token: a quarter kept, its room, and the tail's two to four windows of 32
    assert max(record.seen) < compressed + appended * layers * heads * pair_bytes / 2.5
    # the kept pairs joined the store in its reserved room: rebuilt (O(context)) at a few of the evictions only
    evictions = len(cache.decode_eviction.history)
    assert evictions > 50 and 1 <= len(record.leases) <= evictions // 3


def test_refusals_say_what_to_do_and_change_nothing():
    model, _ = make_pair("llama")
    predictor = ScorePredictor.init(model, "linear", seed=1)
    gen = torch.Generator().manual_seed(8)
    ids, mask, starts = _context(gen, 2)
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=starts)
    with pytest.raises(RuntimeError, match=r"needs a compressed cache.*compress"):
        cache.evict_while_decoding(model, predictor, 0.3)
    cache.compress(model, 0.5, predictor=predictor)
    with pytest.raises(ValueError, match="ratio is the fraction"):
        cache.evict_while_decoding(model, predictor, 1.5)
    with pytest.raises(ValueError, match="window must be a positive"):
        cache.evict_while_decoding(model, predictor, 0.3, window=0)
    with pytest.raises(ValueError, match="unknown level 'token'"):
        cache.evict_while_decoding(model, predictor, 0.3, level="token")
    with pytest.raises(ValueError, match="needs a layer scorer"):
        cache.evict_while_decoding(model, None, 0.3)
    with pytest.raises(TypeError, match="needs a layer scorer.*ReconstructionScorer scores a whole prefilled context"):
        cache.evict_while_decoding(model, "kvzip", 0.3)
    with pytest.raises(ValueError, match="another model object"):
        cache.evict_while_decoding(copy.deepcopy(model), predictor, 0.3)
    assert cache.decode_eviction is None
    cache.evict_while_decoding(model, predictor, 0.3, window=2)
    with pytest.raises(ValueError, match=r"needs level='pair-uniform'.*evict_while_decoding\(.*level='pair-uniform'"):
        cache.make_static(16)
    assert not cache.is_static
    # a batched multi-token step that inputs_for did not build: its padding is unknown
    question = torch.randint(3, 120, (2, 4), generator=gen)
    bytes_before = cache.kv_bytes()
    with pytest.raises(ValueError, match=r"which of these 4 tokens.*cache\.inputs_for"):
        model(input_ids=question, attention_mask=torch.cat([mask, torch.ones_like(question)], 1),
              past_key_values=cache)
    assert cache.get_seq_length() == 29 and cache.kv_bytes() == bytes_before
    # shared questions repeat the rows: one row's answer cannot join a context the others read
    with pytest.raises(RuntimeError, match="one row per stored context.*evict_while_decoding\\(None\\)"):
        model.generate(**cache.inputs_for(torch.cat([question, question]), shared=True), past_key_values=cache,
                       max_new_tokens=2)
    cache.rollback()
    assert cache.get_seq_length() == 29 and cache.kv_bytes() == bytes_before
    cache.evict_while_decoding(None)
    cache.make_static(16)  # allowed once it is off
    with pytest.raises(RuntimeError, match=r"sizes its tail from eviction.*before cache\.make_static"):
        cache.evict_while_decoding(model, predictor, 0.3)


def test_appending_into_reserved_room_gives_the_packed_store_in_place_and_spares_a_sibling():
    """`CompressedContext.append(..., room=True)` (what eviction while decoding does): the same pairs as the packed
    append, operation after operation (plain and fp8, bit for bit), written into the same buffers between rebuilds;
    a store that shares the buffers with a newer one (its lease is stale) rebuilds instead of writing over pairs the
    newer one reads; keep, drop_after and to() return the packed results."""
    from kvzip_cache.storage import CompressedContext

    gen = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, 3, 40, 8, generator=gen), torch.randn(2, 3, 40, 8, generator=gen)
    base = CompressedContext.from_dense(keys, values, torch.rand(2, 3, 40, generator=gen) < 0.5)

    def same(roomy, packed):
        got = roomy.compact()
        assert got.ends is None and got.offsets == packed.offsets and torch.equal(got.positions, packed.positions)
        for a, b in ((got.keys, packed.keys), (got.values, packed.values)):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        if packed.is_fp8:
            assert torch.equal(got.key_scales, packed.key_scales) and torch.equal(got.value_scales, packed.value_scales)
        assert roomy.max_seqlen == packed.max_seqlen and roomy.seqlens().tolist() == packed.seqlens().tolist()

    for store in (base, base.to_fp8()):
        roomy, packed, position, rebuilds = store, store, 40, 0
        for _ in range(24):
            new = torch.randn(2, 3, 6, 8, generator=gen), torch.randn(2, 3, 6, 8, generator=gen)
            keep = torch.rand(2, 3, 6, generator=gen) < 0.4
            before = roomy
            roomy, packed = roomy.append(*new, keep, position, room=True), packed.append(*new, keep, position)
            in_place = before.lease is not None and roomy.lease[0] is before.lease[0]
            rebuilds += not in_place
            if in_place:
                assert roomy.keys.data_ptr() == before.keys.data_ptr()
            same(roomy, packed)
            position += 6
        assert roomy.ends is not None and 2 <= rebuilds <= 10  # (24 appends)
        cut = torch.rand(2, 3, position, generator=gen) < 0.7
        same(roomy.keep(cut), packed.keep(cut))
        same(roomy.drop_after(50), packed.drop_after(50))
        same(roomy.to("cpu"), packed)
        # two stores on one buffer: the newer appends in place, the older one must not write into the same room
        new = torch.randn(2, 3, 2, 8, generator=gen), torch.randn(2, 3, 2, 8, generator=gen)
        keep = torch.ones(2, 3, 2, dtype=torch.bool)
        first = roomy.append(*new, keep, position, room=True)
        other = torch.randn(2, 3, 2, 8, generator=gen), torch.randn(2, 3, 2, 8, generator=gen)
        second = roomy.append(*other, keep, position, room=True)
        assert second.keys.data_ptr() != first.keys.data_ptr()
        same(first, packed.append(*new, keep, position))
        same(second, packed.append(*other, keep, position))

"""Eviction while decoding on a static cache (`KVzipCache.make_static` after `evict_while_decoding`): the packed
tail gives the tokens of eager eviction and of the float64 step-by-step reference, stays within its fixed room, and
evicts from the hook a compiled loop calls between steps (CPU, no compile; the compiled run is in test_gpu.py)."""

import pytest
import torch

from conftest import make_pair
from kvzip_cache import KVzipCache, ScorePredictor
from kvzip_cache.eviction import static_tail_room
from references import decode_with_eviction, full_layers, hidden_from_keep, predictor_rating

WINDOW, RATIO, NEW = 4, 0.4, 30


def _setup(arch, seed=10, batch=2, kind="linear"):
    """(model, reference, predictor, [eager cache, static cache], (ids, mask), question, question mask)."""
    model, reference = make_pair(arch)
    predictor = ScorePredictor.init(model, kind, seed=seed)  # (a random MLP rates layer 0 nearly flat: ties)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, 120, (batch, 29), generator=gen)
    mask = torch.ones_like(ids)
    mask[1:, :4] = 0  # left padding
    question = torch.randint(3, 120, (batch, 5), generator=gen)
    question_mask = torch.ones_like(question)
    question_mask[1:, :2] = 0  # a left-padded question: its padding is never kept
    caches = []
    for static in (False, True):
        cache = KVzipCache(model)
        cache.prefill(model, ids, mask, context_start=torch.tensor([2, 6][:batch]))
        cache.compress(model, 0.5, predictor=predictor)
        cache.evict_while_decoding(model, predictor, RATIO, window=WINDOW, level="pair-uniform")
        if static:
            cache.make_static(question.shape[1] + NEW)
        caches.append(cache)
    return model, reference, predictor, caches, (ids, mask), question, question_mask


def _generate(model, cache, question, question_mask, **kwargs):
    out = model.generate(**cache.inputs_for(question, question_mask), past_key_values=cache, max_new_tokens=NEW,
                         min_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         **kwargs)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])  # gemma3: sliding windows move to the front too
def test_a_static_tail_that_packs_gives_eager_eviction_and_the_float64_reference(arch):
    model, reference, predictor, (eager, static), (ids, mask), question, question_mask = _setup(arch)
    assert static.is_static and static.is_compileable
    room = static.layers[full_layers(model.config)[0]].tail_keys.shape[2]
    assert room == -(-static_tail_room(question.shape[1] + NEW, RATIO, WINDOW) // 16) * 16
    tokens, logits = _generate(model, eager, question, question_mask)
    static_tokens, static_logits = _generate(model, static, question, question_mask)
    eager_steps, static_steps = eager.decode_eviction.history, static.decode_eviction.history
    assert len(static_steps) == len(eager_steps) >= 5
    if arch != "gemma3":  # (the random Gemma3 repeats tokens whose predicted scores tie within float noise, so the
        # two paths may keep different pairs of them; the float64 replay below checks its path on its own choices)
        assert torch.equal(static_tokens, tokens)
        torch.testing.assert_close(static_logits, logits, atol=1e-5, rtol=0)
        for a, b in zip(eager_steps, static_steps):
            assert (a.start, a.count) == (b.start, b.count) and torch.equal(a.keep, b.keep)
    tokens = static_tokens
    # independent of the library's attention: the float64 replay that hides every evicted pair; it takes the keep
    # masks (the random model repeats tokens, whose pairs tie exactly) and checks when each eviction happens
    generated = tokens[:, ids.shape[1] + question.shape[1]:]
    context_hidden = hidden_from_keep(static.keep_mask, mask, static.context_start, full_layers(model.config),
                                      ids.shape[1])
    expected, decisions = decode_with_eviction(reference, predictor_rating(predictor, reference), context_hidden, ids,
                                               mask, question, question_mask, generated, RATIO, WINDOW, uniform=True,
                                               given=[step.keep for step in static_steps])
    assert [start for start, _ in decisions] == [step.start for step in static_steps]
    per_head = static_steps[0].keep.sum(-1)  # "pair-uniform": every (layer, head) of a row keeps as many
    assert bool((per_head == per_head[:, :, :1]).all())
    torch.testing.assert_close(static_logits.double(), expected.double(), atol=1e-4, rtol=0)
    assert int(static.get_seq_length()) == tokens.shape[1] - 1 == eager.get_seq_length()
    if arch == "gemma3":  # the sliding windows moved to the front at every eviction, within their fixed buffers
        sliding = static.layers[0]
        assert int(sliding.end) < model.config.sliding_window + 2 * WINDOW + 1


def test_the_packed_tail_holds_the_pairs_eager_eviction_moved_into_its_store():
    model, _, _, (eager, static), (ids, _), question, question_mask = _setup("llama")
    _generate(model, eager, question, question_mask)
    _generate(model, static, question, question_mask)
    prefilled = eager.context_length
    for idx in full_layers(model.config):
        layer, packed = eager.layers[idx], static.layers[idx]
        ctx = layer.context
        end = int(packed.tail_end)
        assert layer.tail_length == end - packed.packed_slots  # the same newest tokens, not yet rated
        for row in range(ids.shape[0]):
            for head in range(ctx.num_heads):
                segment = row * ctx.num_heads + head
                lo, hi = ctx.offsets[segment], ctx.offsets[segment + 1]
                answer = ctx.positions[lo:hi] >= prefilled  # the pairs eager eviction absorbed, in position order
                expected = torch.cat([ctx.keys[lo:hi][answer], layer.tail_keys[row, head, : layer.tail_length]])
                slots = packed.tail_valid[row, :end]
                torch.testing.assert_close(packed.tail_keys[row, head, :end][slots], expected, atol=1e-5, rtol=0)
    # bounded: the packed tail holds about RATIO of the appended tokens, in a room fixed in advance
    appended = int(static.get_seq_length()) - prefilled
    first = static.layers[full_layers(model.config)[0]]
    assert first.packed_slots <= RATIO * appended + appended / WINDOW
    assert first.tail_keys.shape[2] < question.shape[1] + NEW + 64  # below what a plain static tail would round to


def test_a_compiled_style_loop_evicts_only_through_the_between_steps_hook(monkeypatch):
    """What generate's compiled decode steps do: no Python runs inside a step (here: the cache's per-forward hook is
    skipped, as under torch.compile), so only `evict_between_steps` (or generate's `eviction_criteria`) evicts."""
    model, _, _, (eager, static), _, question, question_mask = _setup("llama", seed=3)
    expected, _ = _generate(model, eager, question, question_mask)
    inputs = static.inputs_for(question, question_mask)
    positions = (inputs["attention_mask"].cumsum(-1) - 1)[:, -question.shape[1]:]
    with torch.no_grad():  # the question: an eager forward, as generate's first step is
        logits = model(input_ids=question, attention_mask=inputs["attention_mask"], position_ids=positions,
                       past_key_values=static).logits
    token, position, attention = logits[:, -1:].argmax(-1), positions[:, -1:] + 1, inputs["attention_mask"]
    tokens = [token]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for _ in range(NEW - 1):
        static.evict_between_steps()
        attention = torch.cat([attention, torch.ones_like(token)], 1)
        with torch.no_grad():
            logits = model(input_ids=token, attention_mask=attention, position_ids=position,
                           past_key_values=static).logits
        token, position = logits[:, -1:].argmax(-1), position + 1
        tokens.append(token)
    monkeypatch.undo()
    assert torch.equal(torch.cat(tokens, 1), expected[:, -NEW:])
    assert len(static.decode_eviction.history) == len(eager.decode_eviction.history)
    # generate with the criteria (eager here): the same tokens, no eviction twice
    static.rollback()
    with_criteria, _ = _generate(model, static, question, question_mask,
                                 stopping_criteria=[static.eviction_criteria()])
    assert torch.equal(with_criteria, expected)
    assert len(static.decode_eviction.history) == len(eager.decode_eviction.history)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_rollback_reuses_the_buffers_and_the_answers_repeat(arch):
    model, _, _, (_, static), _, question, question_mask = _setup(arch, seed=5)
    first = static.layers[full_layers(model.config)[0]]
    buffers = (first.tail_keys.data_ptr(), first.tail_valid.data_ptr(), first.tail_dropped.data_ptr())
    answer, _ = _generate(model, static, question, question_mask)
    static.rollback()
    assert (first.packed_slots, first.dropped, int(first.tail_end), int(first.tail_dropped)) == (0, 0, 0, 0)
    assert bool(first.tail_valid.all()) and static.get_seq_length() == static.context_length
    again, _ = _generate(model, static, question, question_mask)
    assert torch.equal(again, answer)
    assert buffers == (first.tail_keys.data_ptr(), first.tail_valid.data_ptr(), first.tail_dropped.data_ptr())


def test_refusals_say_what_to_do_and_change_nothing():
    model, _, predictor, (eager, static), _, question, question_mask = _setup("llama", seed=7)
    # the room is fixed: generating past the tokens it was made for is refused before the step, not written past
    with pytest.raises(ValueError, match=r"room for .* more tokens.*larger max_new_tokens"):
        model.generate(**static.inputs_for(question, question_mask), past_key_values=static,
                       max_new_tokens=400, min_new_tokens=400, do_sample=False)
    # a crop into the packed answer pairs
    packed = static.context_length + static.layers[0].dropped + static.layers[0].packed_slots
    with pytest.raises(ValueError, match=r"packed the kept pairs.*rollback"):
        static.crop(packed - 1 - int(static.get_seq_length()))
    static.rollback()
    # with generate's criterion, a full room stops generation (with a warning) instead of failing mid-answer
    with pytest.warns(UserWarning, match=r"tail is full.*larger max_new_tokens"):
        out = model.generate(**static.inputs_for(question, question_mask), past_key_values=static,
                             max_new_tokens=400, do_sample=False, stopping_criteria=[static.eviction_criteria()])
    assert question.shape[1] + NEW <= out.shape[1] - static.context_length < question.shape[1] + 400
    assert static.static_room() == 0
    static.rollback()
    with pytest.raises(RuntimeError, match=r"sizes its tail from eviction.*before cache\.make_static"):
        static.evict_while_decoding(model, predictor, RATIO, window=WINDOW, level="pair-uniform")
    # a tail that already holds a question
    model.generate(**eager.inputs_for(question[:, :3]), past_key_values=eager, max_new_tokens=1)
    with pytest.raises(RuntimeError, match=r"starts from the compressed context.*rollback"):
        eager.make_static(64)
    assert not eager.is_static


def test_all_layers_pack_at_once_as_each_alone_and_a_refusal_changes_no_layer():
    """`compact_tails` packs several layers in one call, each by its own mask, also when the layers keep different
    numbers of pairs (each layer its own plan): per row and head the kept pairs in position order, masked slots
    where a row kept fewer, then the newer tokens with their padding; checked against the tail's contents before.
    A mask whose heads keep different counts in one layer is refused before any layer changes."""
    from kvzip_cache.layers import compact_tails

    model, _, _, (_, static), _, question, question_mask = _setup("llama", seed=12)
    static.evict_while_decoding(None)  # the test packs by hand
    model.generate(**static.inputs_for(question, question_mask), past_key_values=static, max_new_tokens=3,
                   do_sample=False)  # 5 + 2 tokens in the tail, nothing packed yet
    layers = [static.layers[idx] for idx in full_layers(model.config)]
    start, unrated = layers[0].recent_tail()
    count = 4
    assert unrated == 7 and all(layer.recent_tail() == (start, unrated) for layer in layers)
    heads = layers[0].tail_keys.shape[1]
    keep = torch.zeros(len(layers), 2, heads, count, dtype=torch.bool)
    keep[0, 0, :, [1, 3]] = True  # layer 0: row 0 keeps two, row 1 one (its second slot masked)
    keep[0, 1, :, 2] = True
    keep[1, :, 0, 2] = True  # layer 1: one pair in each row, head 1 another than head 0
    keep[1, :, 1, 3] = True
    before = [(layer.tail_keys.clone(), layer.tail_valid.clone(), int(layer.tail_end)) for layer in layers]

    uneven = keep.clone()
    uneven[1, 0, 0, 3] = True  # layer 1, row 0: head 0 keeps two, head 1 one
    with pytest.raises(ValueError, match=r"every head of a row must keep as many pairs"):
        compact_tails(layers, uneven, start)
    for layer, (keys, valid, end) in zip(layers, before):
        assert torch.equal(layer.tail_keys, keys) and torch.equal(layer.tail_valid, valid)
        assert int(layer.tail_end) == end and layer.packed_slots == 0

    compact_tails(layers, keep, start)
    for i, (layer, (keys, valid, end)) in enumerate(zip(layers, before)):
        slots = int(keep[i].sum(-1).max())
        assert int(layer.tail_end) == end - count + slots and layer.packed_slots == slots
        for row in range(2):
            for head in range(heads):
                kept = keep[i, row, head].nonzero().flatten().tolist()
                assert torch.equal(layer.tail_keys[row, head, : len(kept)], keys[row, head, kept])
                assert layer.tail_valid[row, :slots].tolist() == [j < len(kept) for j in range(slots)]
                assert torch.equal(layer.tail_keys[row, head, slots : end - count + slots], keys[row, head, count:end])
            assert torch.equal(layer.tail_valid[row, slots : end - count + slots], valid[row, count:end])
        assert layer.recent_tail() == (start + count, end - count)


def test_a_stop_token_and_a_second_turn_decode_as_eager_eviction_does():
    """A row that meets a stop token is padded from then on (its pad tokens still enter the tail, as in eager mode);
    without rollback, a second question continues the conversation on the packed tail (one row: no padding)."""
    model, _, _, (eager, static), _, question, question_mask = _setup("llama", seed=8)
    free, _ = _generate(model, eager, question, question_mask)
    eager.rollback()
    answers = free[:, -NEW:]
    stop = int(answers[0, 15])  # row 0 stops there, after evictions began
    outs = []
    for cache in (eager, static):
        out = model.generate(**cache.inputs_for(question, question_mask), past_key_values=cache, max_new_tokens=NEW,
                             do_sample=False, eos_token_id=stop, pad_token_id=0)
        assert cache.decode_eviction.history
        outs.append(out)
        cache.rollback()
    assert torch.equal(outs[0], outs[1])
    # one row, two turns without rollback
    model1, _, _, (eager1, static1), _, question1, _ = _setup("llama", seed=9, batch=1)
    turns = []
    for cache in (eager1, static1):
        ids = question1
        first = model1.generate(**cache.inputs_for(ids), past_key_values=cache, max_new_tokens=12, min_new_tokens=12,
                                do_sample=False)
        follow = torch.randint(3, 120, (1, 4), generator=torch.Generator().manual_seed(1))
        history = torch.cat([first, follow], 1)  # the whole conversation so far, as generate expects
        second = model1.generate(input_ids=history, attention_mask=torch.ones_like(history), past_key_values=cache,
                                 max_new_tokens=12, min_new_tokens=12, do_sample=False)
        turns.append((first, second, len(cache.decode_eviction.history)))
    assert torch.equal(turns[0][0], turns[1][0]) and torch.equal(turns[0][1], turns[1][1])
    assert turns[0][2] == turns[1][2] >= 4


def test_reset_forgets_the_static_packing_and_a_new_context_evicts_eagerly_again():
    """After reset, a new prefill of the same cache object decodes as a fresh cache (no stale packed counters)."""
    model, _, predictor, (eager, static), (ids, mask), question, question_mask = _setup("llama", seed=12)
    _generate(model, static, question, question_mask)
    assert static.layers[0].dropped > 0
    static.reset()
    static.prefill(model, ids, mask, context_start=torch.tensor([2, 6]))
    static.compress(model, 0.5, predictor=predictor)
    static.evict_while_decoding(model, predictor, RATIO, window=WINDOW, level="pair-uniform")
    assert not static.is_static
    again, _ = _generate(model, static, question, question_mask)
    expected, _ = _generate(model, eager, question, question_mask)
    assert torch.equal(again, expected)


def _compiled_setup(seed: int, new: int, evict_ratio: float | None = None):
    """A tiny Llama (dynamo reset), a 29-token context, a 5-token question and `_eager_and_static`'s two caches with
    room for the question and ``new`` tokens."""
    torch._dynamo.reset()
    model, _ = make_pair("llama")
    predictor = ScorePredictor.init(model, "linear", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    ids, question = torch.randint(3, 120, (1, 29), generator=gen), torch.randint(3, 120, (1, 5), generator=gen)
    return model, ids, question, _eager_and_static(model, predictor, ids, question.shape[1] + new, evict_ratio)


def _eager_and_static(model, predictor, ids, room: int, evict_ratio: float | None = None):
    """Two caches of ``ids`` compressed alike (and evicting while decoding at ``evict_ratio``), the second static."""
    caches = []
    for static in (False, True):
        cache = KVzipCache(model)
        cache.prefill(model, ids, context_start=2)
        cache.compress(model, 0.5, predictor=predictor)
        if evict_ratio is not None:
            cache.evict_while_decoding(model, predictor, evict_ratio, window=WINDOW, level="pair-uniform")
        if static:
            cache.make_static(room)
        caches.append(cache)
    return caches


def _compiled_greedy(model, static, ids, question, new: int, mask_for_step, evict: bool = False) -> torch.Tensor:
    """``[1, new]`` greedy tokens: the question eagerly, then ``new - 1`` steps through a compiled forward (the eager
    backend) that must never recompile; ``mask_for_step(attention, position)`` gives each step's mask from the
    growing 2D padding mask."""
    compiled = torch.compile(model.forward, backend="eager", fullgraph=True)
    attention = static.inputs_for(question)["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=question, attention_mask=attention, past_key_values=static,
                       position_ids=torch.arange(ids.shape[1], attention.shape[1])[None]).logits
    token, tokens = logits[:, -1:].argmax(-1), []
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for _ in range(new - 1):
            tokens.append(token)
            if evict:
                static.evict_between_steps()
            attention = torch.cat([attention, torch.ones_like(token)], 1)
            position = torch.tensor([[attention.shape[1] - 1]])
            logits = compiled(input_ids=token, attention_mask=mask_for_step(attention, position),
                              past_key_values=static, position_ids=position).logits
            token = logits[:, -1:].argmax(-1)
    tokens.append(token)
    return torch.cat(tokens, 1)


def test_a_compiled_step_is_not_recompiled_when_the_answer_outgrows_the_static_mask_width():
    """generate's padding mask keeps growing with the answer, past the static view's fixed width (the context's bucket
    plus the packed tail's room, smaller than the answer when it evicts): the compiled step must take no branch on
    that width (a recompilation of the whole model, 41 s for the 8B shape on an H100), and still give eager
    eviction's tokens."""
    new = 200
    model, ids, question, (eager, static) = _compiled_setup(4, new, evict_ratio=0.25)
    expected = model.generate(**eager.inputs_for(question), past_key_values=eager, max_new_tokens=new,
                              min_new_tokens=new, do_sample=False)[:, -new:]
    width = static.layers[0].static_mask_width
    assert ids.shape[1] + question.shape[1] + new > width + 8  # the mask outgrows the static width

    def growing(attention, position):  # the raw 2D mask, its length dynamic
        step_mask = attention.clone()
        torch._dynamo.mark_dynamic(step_mask, 1)
        return step_mask

    assert torch.equal(_compiled_greedy(model, static, ids, question, new, growing, evict=True), expected)
    assert len(static.decode_eviction.history) == len(eager.decode_eviction.history) > 20


def test_a_mask_built_outside_the_compiled_step_keeps_its_layout_as_the_answer_grows():
    """generate (transformers 5.17) builds a static cache's masks eagerly and hands them to the compiled step as
    they are. Their strides must not change as the 2D mask grows: dynamo would trace the stride as an integer input,
    and CUDA graphs record the step again for every new value (an 8K-token answer took 18.8 ms a step instead of ~10
    on an H100). Here the step must never recompile over 40 tokens and give eager generate's tokens."""
    from transformers.masking_utils import create_masks_for_generate

    from kvzip_cache.compat import cache_kwarg

    new = 40
    model, ids, question, (eager, static) = _compiled_setup(5, new)
    expected = model.generate(**eager.inputs_for(question), past_key_values=eager, max_new_tokens=new,
                              min_new_tokens=new, do_sample=False)[:, -new:]

    def built_eagerly(attention, position):  # as generate does for a compileable cache
        return create_masks_for_generate(config=model.config, inputs_embeds=torch.empty(1, 1, 0),
                                         attention_mask=attention, position_ids=position,
                                         **{cache_kwarg(model): static})

    assert torch.equal(_compiled_greedy(model, static, ids, question, new, built_eagerly), expected)


def test_a_static_mask_keeps_its_type_and_width_when_the_answer_fills_it():
    """transformers 5.17 builds a compileable cache's masks eagerly and hands them to the compiled step: a static
    cache's mask (its query offset is a device tensor) must stay a ``[B, width]`` tensor even once it has no padding
    left (an evicting answer fills the width, then outgrows it), or the step is recompiled (it was, on an H100)."""
    from kvzip_cache.attention import kvzip_mask

    offset = torch.tensor(40)
    for columns in (30, 48, 60):  # narrower than the fixed width, exactly as wide, wider (eviction while decoding)
        mask = torch.ones(2, columns, dtype=torch.long)
        mask[1, :3] = 0
        for full in (False, True):
            mask = torch.ones_like(mask) if full else mask
            out = kvzip_mask(2, 1, 48, q_offset=offset, attention_mask=mask)
            assert out is not None and out.shape == (2, 48) and out.dtype == torch.bool
            assert out.stride() == (48, 1)  # the same strides at every step (a stride is a compiled step's input)
            assert torch.equal(out[:, : min(columns, 48)], mask[:, :48].bool())  # position-indexed columns
            assert not out[:, columns:].any()  # slots not written yet
    one = kvzip_mask(1, 1, 48, q_offset=offset, attention_mask=torch.ones(1, 30, dtype=torch.long))
    assert one.stride() == (48, 1)  # a batch of one too (.contiguous() would keep the view's row stride)
    # a dynamic cache (an int offset) still drops a mask with no padding
    assert kvzip_mask(2, 1, 48, q_offset=40, attention_mask=torch.ones(2, 48, dtype=torch.long)) is None

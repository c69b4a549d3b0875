"""Compile-friendly decoding (`KVzipCache.make_static`): the same tokens as the dynamic compressed cache, fixed
shapes, no host reads inside a decode step (checked with torch.compile(fullgraph=True): a graph break or a
recompile fails the test), and clear errors."""

import pytest
import torch

from conftest import ByteTokenizer, make_pair
from kvzip_cache import KVzipCache

TOK = ByteTokenizer()


def _ids(n, seed, batch=1):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def _compressed(model, context, ratio=0.4, context_start=4, **prefill):
    cache = KVzipCache(model)
    cache.prefill(model, context, context_start=context_start, chunk_size=16, **prefill)
    cache.compress(model, ratio, tokenizer=TOK, chunk_size=16)
    return cache


@pytest.mark.parametrize("arch_name", ["llama", "qwen3", "phi3", "gemma3", "qwen2-sliding"])
def test_static_generate_equals_dynamic_compressed_cache(arch_name):
    model, _ = make_pair(arch_name)
    context = _ids(48, 1)
    dynamic, static = _compressed(model, context), _compressed(model, context)
    static.make_static(max_new_tokens=24)
    assert static.is_compileable and not dynamic.is_compileable
    bytes_static = static.kv_bytes()
    for seed in (2, 3):  # two questions: rollback empties the static tail in place
        inputs = dynamic.inputs_for(_ids(5, seed))
        expected = model.generate(**inputs, past_key_values=dynamic, max_new_tokens=12, do_sample=False)
        got = model.generate(**inputs, past_key_values=static, max_new_tokens=12, do_sample=False)
        assert torch.equal(got, expected)
        assert int(static.get_seq_length()) == dynamic.get_seq_length() == inputs["input_ids"].shape[1] + 11
        dynamic.rollback()
        static.rollback()
        assert int(static.get_seq_length()) == context.shape[1]
    assert static.kv_bytes() == bytes_static  # preallocated once, never regrown


def test_static_left_padded_batch_with_padded_questions_equals_dynamic():
    model, _ = make_pair("llama")
    ids, mask = _ids(40, 4, batch=2), torch.ones(2, 40, dtype=torch.long)
    ids[1, :9], mask[1, :9] = 0, 0
    starts = torch.tensor([4, 13])
    dynamic = _compressed(model, ids, attention_mask=mask, context_start=starts)
    static = _compressed(model, ids, attention_mask=mask, context_start=starts)
    static.make_static(max_new_tokens=20)
    question, question_mask = _ids(6, 5, batch=2), torch.ones(2, 6, dtype=torch.long)
    question_mask[0, :2] = 0  # padding inside the tail too
    inputs = dynamic.inputs_for(question, question_mask)
    expected = model.generate(**inputs, past_key_values=dynamic, max_new_tokens=8, do_sample=False)
    got = model.generate(**inputs, past_key_values=static, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("arch_name", ["llama", "gemma3"])
def test_compiled_decode_loop_has_no_graph_break_or_recompile(arch_name):
    """A plain ``torch.compile(model.forward, fullgraph=True)`` decode loop: one graph for every step (Gemma3: its
    sliding layers too)."""
    torch._dynamo.reset()
    model, _ = make_pair(arch_name)
    context = _ids(40, 6)
    dynamic, static = _compressed(model, context), _compressed(model, context)
    static.make_static(max_new_tokens=16)
    question = _ids(4, 7)

    def greedy(cache, forward, steps=8):
        with torch.no_grad():
            n = int(cache.get_seq_length())
            logits = model(input_ids=question, past_key_values=cache,
                           position_ids=torch.arange(n, n + question.shape[1])[None]).logits
            tokens = [logits[:, -1].argmax(-1, keepdim=True)]
            for _ in range(steps):
                position = cache.get_seq_length()
                position = position.view(1, 1) if isinstance(position, torch.Tensor) else torch.tensor([[position]])
                logits = forward(input_ids=tokens[-1], past_key_values=cache, position_ids=position).logits
                tokens.append(logits[:, -1].argmax(-1, keepdim=True))
        return torch.cat(tokens, 1)

    expected = greedy(dynamic, model)
    compiled = torch.compile(model.forward, backend="eager", fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = greedy(static, compiled)
    assert torch.equal(got, expected)


def test_static_errors_are_clear_and_leave_the_cache_usable():
    model, _ = make_pair("llama")
    cache = KVzipCache(model)
    cache.prefill(model, _ids(30, 8), context_start=4)
    with pytest.raises(RuntimeError, match="compress"):
        cache.make_static(16)
    cache.compress(model, 0.5, tokenizer=TOK, chunk_size=16)
    with pytest.raises(ValueError, match="positive int"):
        cache.make_static(0)
    cache.make_static(8)
    inputs = cache.inputs_for(_ids(70, 9))
    with pytest.raises(ValueError, match="room for 16 more tokens"):  # 8 rounded up to a multiple of 16
        model(**inputs, past_key_values=cache)
    assert int(cache.get_seq_length()) == 30  # nothing was written
    with pytest.raises(RuntimeError, match="re-compressed"):
        cache.compress(model, 0.3, tokenizer=TOK)
    with pytest.raises(RuntimeError, match="fixed batch"):
        cache.batch_repeat_interleave(2)
    out = model.generate(**cache.inputs_for(_ids(3, 10)), past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == 30 + 3 + 4

    sliding, _ = make_pair("gemma3")  # window 6: a 5-token context (4 of them protected) leaves it not full
    gemma = KVzipCache(sliding)
    gemma.prefill(sliding, _ids(5, 11), context_start=4)
    gemma.compress(sliding, 1.0, tokenizer=TOK)
    with pytest.raises(ValueError, match="sliding window"):
        gemma.make_static(8)
    assert not gemma.is_static and not any(layer.is_static for layer in gemma.layers)  # nothing half-done


def test_generate_past_the_room_stops_with_a_warning_through_the_criterion():
    """A static cache without eviction whose room is smaller than generate's max_new_tokens: with
    `eviction_criteria()` generation stops when the tail is full (a compiled step past it would write out of bounds:
    a device-side assert on CUDA), with the dynamic cache's tokens up to there, and the cache stays usable."""
    model, _ = make_pair("llama")
    context, question = _ids(40, 12), _ids(5, 13)
    dynamic, static = _compressed(model, context), _compressed(model, context)
    static.make_static(16)  # room for the question's 5 tokens and 11 more
    inputs = dynamic.inputs_for(question)
    expected = model.generate(**inputs, past_key_values=dynamic, max_new_tokens=30, do_sample=False)
    with pytest.warns(UserWarning, match="tail is full"):
        got = model.generate(**inputs, past_key_values=static, max_new_tokens=30, do_sample=False,
                             stopping_criteria=[static.eviction_criteria()])
    assert static.static_room() == 0
    assert got.shape[1] == 40 + 16 + 1  # the step that fills the room samples one token more, nothing is written
    assert torch.equal(got, expected[:, : got.shape[1]])
    static.rollback()
    again = model.generate(**inputs, past_key_values=static, max_new_tokens=8, do_sample=False)
    assert torch.equal(again, expected[:, : again.shape[1]])

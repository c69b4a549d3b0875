"""Many questions, one stored context (`KVzipCache.inputs_for(..., shared=True)`).

The shared batch must give the logits and tokens of each question asked alone (and of a dense reference that hides
the evicted pairs), store the context once, work with generate's stop tokens, sampling, rollback and several
documents per batch, and, made static, decode compiled; a second document in the same length buckets reuses the
compiled graph (checked with dynamo's recompile error, not by timing).
"""

import pytest
import torch

from conftest import make_pair, reference_logits
from kvzip_cache import KVzipCache
from kvzip_cache.templates import left_pad
from references import full_layers, hidden_from_keep, reference_generate
from test_cache_behaviour import _hidden
from test_static import TOK, _compressed, _ids

QUESTIONS = ((5, 2), (9, 3), (3, 4))  # (tokens, seed): different lengths, so the batch is left-padded


def _questions(specs=QUESTIONS):
    return left_pad([_ids(n, seed)[0] for n, seed in specs], pad_id=0)


def _generate(model, cache, ids, mask, shared=False, **kwargs):
    inputs = cache.inputs_for(ids, mask, shared=shared)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=6, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, **kwargs)
    cache.rollback()
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("arch_name", ["llama", "gemma3"])
def test_shared_questions_equal_each_question_alone_and_the_dense_reference(arch_name):
    model, reference = make_pair(arch_name)
    context = _ids(48, 1)
    cache = _compressed(model, context)
    contexts = [layer.context.keys.data_ptr() for layer in cache.layers if hasattr(layer, "context")]
    bytes_before = cache.kv_bytes()
    ids, mask = _questions()

    alone = [_generate(model, cache, ids[b : b + 1], mask[b : b + 1]) for b in range(len(ids))]
    tokens, logits = _generate(model, cache, ids, mask, shared=True)
    assert torch.equal(tokens, torch.cat([t for t, _ in alone]))
    torch.testing.assert_close(logits, torch.cat([lg for _, lg in alone]), atol=1e-5, rtol=1e-5)

    # The first step against a dense DynamicCache of the repeated context with exactly the evicted pairs hidden.
    inputs = cache.inputs_for(ids, mask, shared=True)
    assert all(layer.src_rows == (0, 0, 0) for layer in cache.layers if hasattr(layer, "src_rows"))
    positions = inputs["attention_mask"].cumsum(-1) - 1
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=inputs["attention_mask"], past_key_values=cache,
                    position_ids=positions[:, -ids.shape[1] :]).logits
    hidden = {layer: pairs.expand(len(ids), -1, -1) for layer, pairs in _hidden(cache, context.shape[1]).items()}
    expected = reference_logits(reference, context.expand(len(ids), -1), (ids, mask), hidden=hidden)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real].float(), atol=1e-4, rtol=1e-4)
    cache.rollback()

    # The context was neither copied nor moved; only the rows' tails (freed by rollback) were added.
    assert [layer.context.keys.data_ptr() for layer in cache.layers if hasattr(layer, "context")] == contexts
    assert cache.kv_bytes() == bytes_before
    assert all(layer.src_rows == (0,) for layer in cache.layers if hasattr(layer, "src_rows"))


def test_shared_batch_of_two_documents_with_stop_tokens_and_sampling():
    """Two left-padded documents, two questions each (rows 0-1 ask document 0, rows 2-3 document 1)."""
    model, reference = make_pair("llama")
    contexts, context_mask = _ids(40, 5, batch=2), torch.ones(2, 40, dtype=torch.long)
    contexts[1, :7], context_mask[1, :7] = 0, 0
    cache = _compressed(model, contexts, attention_mask=context_mask, context_start=torch.tensor([4, 11]))
    ids, mask = _questions(((4, 6), (7, 7), (6, 8), (2, 9)))
    first, _ = _generate(model, cache, ids[[0, 2]], mask[[0, 2]])
    stop = int(first[0, ids.shape[1] + 40 + 1])  # row 0's second answer token: row 0 stops there
    per_round = [_generate(model, cache, ids[[r, 2 + r]], mask[[r, 2 + r]], eos_token_id=stop) for r in (0, 1)]
    tokens, logits = _generate(model, cache, ids, mask, shared=True, eos_token_id=stop)
    for row, (r, c) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
        expected_tokens, expected_logits = per_round[r]
        width = min(tokens.shape[1], expected_tokens.shape[1])
        assert torch.equal(tokens[row, :width], expected_tokens[c, :width])
        steps = min(logits.shape[1], expected_logits.shape[1])
        torch.testing.assert_close(logits[row, :steps], expected_logits[c, :steps], atol=1e-5, rtol=1e-5)
    assert (tokens[0, ids.shape[1] + 40 + 2 :] == 0).all()  # stopped, then padded

    # Sampling, seeded: the tokens the dense reference samples from the same seed, each row reading its document
    # with that document's evicted pairs hidden (generate draws for the 4 rows at once on both sides).
    inputs = cache.inputs_for(ids, mask, shared=True)
    torch.manual_seed(0)
    sampled = model.generate(**inputs, past_key_values=cache, max_new_tokens=5, do_sample=True, top_k=20,
                             pad_token_id=0)
    assert sampled.shape == (4, inputs["input_ids"].shape[1] + 5)
    assert int(cache.get_seq_length()) == inputs["input_ids"].shape[1] + 4
    cache.rollback()
    rows = [0, 0, 1, 1]
    hidden = hidden_from_keep(cache.keep_mask, context_mask, cache.context_start, full_layers(model.config), 40)
    expected = reference_generate(reference, contexts[rows], context_mask[rows],
                                  {layer: pairs[rows] for layer, pairs in hidden.items()}, ids, mask, seed=0,
                                  max_new_tokens=5, do_sample=True, top_k=20, pad_token_id=0)
    assert torch.equal(sampled, expected)
    torch.manual_seed(1)  # another seed draws other tokens: the comparison above is not between constant answers
    other = model.generate(**cache.inputs_for(ids, mask, shared=True), past_key_values=cache, max_new_tokens=5,
                           do_sample=True, top_k=20, pad_token_id=0)
    assert not torch.equal(other, sampled)


def test_shared_inputs_are_refused_clearly_without_touching_the_cache():
    model, _ = make_pair("llama")
    cache = KVzipCache(model)
    cache.prefill(model, _ids(30, 10, batch=2), context_start=4)
    ids, mask = _questions(((3, 1), (3, 2), (3, 3), (3, 4)))
    with pytest.raises(RuntimeError, match="compressed cache"):
        cache.inputs_for(ids, mask, shared=True)
    cache.compress(model, 0.5, tokenizer=TOK, chunk_size=16)
    with pytest.raises(ValueError, match="same number R of questions"):
        cache.inputs_for(ids[:3], mask[:3], shared=True)
    inputs = cache.inputs_for(ids, mask, shared=True)
    model.generate(**inputs, past_key_values=cache, max_new_tokens=2, do_sample=False, pad_token_id=0)
    rows = cache.layers[0].src_rows
    with pytest.raises(RuntimeError, match="rollback"):
        cache.inputs_for(ids[:2], mask[:2], shared=True)
    assert cache.layers[0].src_rows == rows  # refused: nothing changed
    cache.rollback()
    assert cache.layers[0].src_rows == (0, 1)


def _decode(model, forward, cache, ids, mask, steps=5):
    """Greedy tokens of a shared batch: the question eagerly, then ``steps`` one-token steps through ``forward``.

    Each step passes the ``[context; tokens so far]`` padding mask, as generate does; its width is marked dynamic,
    so that a compiled step is not recompiled as it grows (generate gets there by dynamo's automatic dynamic shapes,
    after one recompilation).
    """
    rows = len(ids)
    repeats = rows // cache.input_ids.shape[0]
    context_mask = cache.attention_mask.long().repeat_interleave(repeats, 0)
    full = torch.cat([context_mask, mask, torch.ones(rows, steps, dtype=torch.long)], 1)
    positions = full.cumsum(-1) - 1
    end = cache.context_length + ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=full[:, :end], past_key_values=cache,
                       position_ids=positions[:, end - ids.shape[1] : end]).logits
        tokens = [logits[:, -1].argmax(-1, keepdim=True)]
        for step in range(steps):
            step_mask = full[:, : end + step + 1].clone()
            torch._dynamo.mark_dynamic(step_mask, 1)
            logits = forward(input_ids=tokens[-1], attention_mask=step_mask, past_key_values=cache,
                             position_ids=positions[:, end + step : end + step + 1].clone()).logits
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
    cache.rollback()
    return torch.cat(tokens, 1)


@pytest.mark.parametrize("arch_name", ["llama", "gemma3"])
def test_static_shared_decoding_compiles_once_for_a_second_document(arch_name):
    """Static + shared + torch.compile(fullgraph=True): the eager tokens, for two question rounds and a second document
    of another length in the same buckets, with no recompilation; a document in another bucket does recompile (so the
    check can fail)."""
    torch._dynamo.reset()
    model, _ = make_pair(arch_name)
    compiled = torch.compile(model.forward, backend="eager", fullgraph=True)
    rounds = [_questions(((4, 11), (6, 12))), _questions(((5, 13), (2, 14)))]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n, seed in ((48, 15), (60, 16)):  # both in the 64-token bucket, with different kept-pair counts
            context = _ids(n, seed)
            dynamic, static = _compressed(model, context), _compressed(model, context)
            static.inputs_for(*rounds[0], shared=True)
            static.make_static(max_new_tokens=12)
            for ids, mask in rounds:
                dynamic.inputs_for(ids, mask, shared=True)
                expected = _decode(model, model, dynamic, ids, mask)
                static.inputs_for(ids, mask, shared=True)
                got = _decode(model, compiled, static, ids, mask)
                assert torch.equal(got, expected)
        longer = _compressed(model, _ids(100, 17))  # the 128-token bucket: another graph
        longer.inputs_for(*rounds[0], shared=True)
        longer.make_static(max_new_tokens=12)
        with pytest.raises(torch._dynamo.exc.RecompileError):
            _decode(model, compiled, longer, *rounds[0])


def test_the_benchmark_splits_a_shared_static_cache_into_its_context_and_the_rows_tails():
    """`bench.shared.context_kv_bytes`: what 64 rows read once (the kept context) vs what each row adds (its static
    tail), counted from the shapes alone."""
    from kvzip_cache.bench.shared import context_kv_bytes

    model, _ = make_pair("llama")
    cache = _compressed(model, _ids(48, 1))
    alone = cache.kv_bytes()
    ids, mask = _questions()
    cache.inputs_for(ids, mask, shared=True)
    cache.make_static(12)
    config = model.config
    element = next(model.parameters()).element_size()
    room = 16  # make_static rounds the tail's room (12 tokens) up to a multiple of 16
    tails = 2 * len(QUESTIONS) * config.num_hidden_layers * config.num_key_value_heads * room * config.head_dim * element
    assert context_kv_bytes(cache) == alone  # compressed, nothing appended: the context is all of it
    assert cache.kv_bytes() - context_kv_bytes(cache) == tails

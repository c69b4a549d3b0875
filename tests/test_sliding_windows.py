"""Sliding-window layers count only real tokens: a padded row answers as it would alone.

A batch of questions of different lengths is left-padded, so padding sits between the context and each short
question. transformers counts window slots, so there the padding would push real context tokens out of a short
row's window. Here every check is against the same question asked alone (no padding at all, fp32): per-row and
shared batches, dynamic and static caches, multi-turn, on Gemma3, a sliding Qwen2 and an all-sliding Mistral, with
windows much shorter than the context.
"""

import copy

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from conftest import COMMON, _configs
from kvzip_cache import KVzipCache
from kvzip_cache.layers import KVzipSlidingLayer
from kvzip_cache.templates import left_pad
from test_static import TOK, _ids

WINDOW = 16
QUESTIONS = ((5, 2), (19, 3), (3, 4))  # (tokens, seed): the short rows get 14 and 16 padding slots, about a window
NEW = 6


def _model(arch: str):
    if arch == "mistral-sliding":  # every layer slides: nothing to evict, the cache stays dense
        config, cls = MistralConfig(**COMMON, head_dim=16, sliding_window=WINDOW), MistralForCausalLM
    else:
        config, cls = _configs()[arch]
        config = copy.deepcopy(config)
        config.sliding_window = WINDOW
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # sharper attention, so that a lost window token shows in the logits
        for name, param in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                param.mul_(4.0)
    model.set_attn_implementation("kvzip")
    return model


def _cache(model, rows: int, compress: bool = True, static: bool = False) -> KVzipCache:
    cache = KVzipCache(model)
    cache.prefill(model, _ids(120, 1).expand(rows, -1), context_start=4, chunk_size=32)
    if compress:
        cache.compress(model, 0.4, tokenizer=TOK, chunk_size=32)
    if static:
        cache.make_static(32)
    return cache


def _ask(model, cache, ids, mask=None, shared=False):
    """(greedy tokens [B, NEW], logits [B, NEW, V]); the cache returns to its context."""
    inputs = cache.inputs_for(ids, mask, shared=shared)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    cache.rollback()
    return out.sequences[:, -NEW:], torch.stack(out.logits, 1)


def _alone(model, compress=True):
    cache = _cache(model, 1, compress)
    return [_ask(model, cache, _ids(n, seed)) for n, seed in QUESTIONS]


def _assert_each_row_as_alone(tokens, logits, alone):
    for row, (alone_tokens, alone_logits) in enumerate(alone):
        torch.testing.assert_close(logits[row], alone_logits[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(tokens[row], alone_tokens[0]), f"row {row}"


@pytest.mark.parametrize("arch", ["gemma3", "qwen2-sliding"])
@pytest.mark.parametrize("layout", ["rows", "shared", "static rows", "static shared"])
def test_padded_questions_answer_as_alone(arch, layout):
    model = _model(arch)
    alone = _alone(model)
    ids, mask = left_pad([_ids(n, seed)[0] for n, seed in QUESTIONS], pad_id=0)
    shared = layout.endswith("shared")
    if shared:
        cache = _cache(model, 1)
        cache.inputs_for(ids, mask, shared=True)  # lay the rows out first: a static cache's batch is fixed
    else:
        cache = _cache(model, len(ids))
    if layout.startswith("static"):
        cache.make_static(32)
    _assert_each_row_as_alone(*_ask(model, cache, ids, mask, shared=shared), alone)
    # Asked twice: rollback restored every window (static: only the device-side ends moved back).
    _assert_each_row_as_alone(*_ask(model, cache, ids, mask, shared=shared), alone)


def test_padding_without_compression_and_on_an_all_sliding_model():
    model = _model("mistral-sliding")
    alone = _alone(model, compress=False)
    ids, mask = left_pad([_ids(n, seed)[0] for n, seed in QUESTIONS], pad_id=0)
    cache = _cache(model, len(ids), compress=False)
    _assert_each_row_as_alone(*_ask(model, cache, ids, mask), alone)


def test_a_padded_follow_up_question_answers_as_alone():
    """Multi-turn: the second turn's question is padded too; the first turn's padding is still in reach."""
    model = _model("gemma3")
    first = _ids(4, 7)
    follow_ups = [_ids(n, seed)[0] for n, seed in QUESTIONS]

    def two_turns(cache, ids, mask):
        rows = ids.shape[0]
        inputs = cache.inputs_for(first.expand(rows, -1))
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=3, do_sample=False, pad_token_id=0)
        full = torch.cat([out, ids], 1)
        full_mask = torch.cat([torch.ones_like(out), torch.ones_like(ids) if mask is None else mask], 1)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=full_mask, past_key_values=cache,
                           position_ids=(full_mask.cumsum(-1) - 1)[:, -ids.shape[1]:]).logits[:, -1]
        cache.rollback()
        return logits

    single = _cache(model, 1)
    alone = [two_turns(single, question[None], None) for question in follow_ups]
    ids, mask = left_pad(follow_ups, pad_id=0)
    batched = two_turns(_cache(model, len(ids)), ids, mask)
    for row, expected in enumerate(alone):
        torch.testing.assert_close(batched[row], expected[0], atol=1e-5, rtol=1e-5)


def test_the_window_keeps_padded_slots_only_while_they_are_in_reach():
    """Memory stays bounded: the slots of a padded question are kept on top of the window until they slide out."""
    model = _model("gemma3")
    ids, mask = left_pad([_ids(n, seed)[0] for n, seed in QUESTIONS], pad_id=0)
    cache = _cache(model, len(ids))
    sliding = [layer for layer in cache.layers if isinstance(layer, KVzipSlidingLayer)]
    assert {layer.keys.shape[2] for layer in sliding} == {WINDOW - 1}
    inputs = cache.inputs_for(ids, mask)
    model.generate(**inputs, past_key_values=cache, max_new_tokens=2, do_sample=False, pad_token_id=0)
    question = ids.shape[1]
    assert {layer.keys.shape[2] for layer in sliding} == {WINDOW - 1 + question}
    cache.rollback()
    inputs = cache.inputs_for(ids, mask)
    model.generate(**inputs, past_key_values=cache, max_new_tokens=WINDOW + 2, min_new_tokens=WINDOW + 2,
                   do_sample=False, pad_token_id=0)
    # WINDOW + 1 decode steps later the question is out of every row's window: back to the plain window.
    assert {layer.keys.shape[2] for layer in sliding} == {WINDOW - 1}

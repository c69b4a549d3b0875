"""Bad input gets a clear error that says what to do, and never corrupts the cache."""

import copy

import pytest
import torch
from transformers import Gemma2Config, MistralConfig, MistralForCausalLM

from conftest import COMMON, ByteTokenizer, make_pair
from kvzip_cache import KVzipCache

TOK = ByteTokenizer()


def _ids(n, seed=0, batch=1):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def prefilled():
    model, _ = make_pair("llama")
    cache = KVzipCache(model)
    cache.prefill(model, _ids(30), context_start=3)
    return model, cache


def _assert_intact(model, cache, compressed=False):
    """The cache still holds its 30-token context and answers a question."""
    assert cache.get_seq_length() == 30
    assert cache.is_compressed == compressed
    with torch.no_grad():
        logits = model(_ids(3, 9), past_key_values=cache, position_ids=torch.arange(30, 33)[None]).logits
    assert torch.isfinite(logits).all()
    cache.rollback()


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan"), "0.3", None, True])
def test_ratio_outside_zero_one(prefilled, ratio):
    model, cache = prefilled
    with pytest.raises(ValueError, match=r"fraction of context pairs KEPT.*\(0, 1\]"):
        cache.compress(model, ratio, tokenizer=TOK)
    _assert_intact(model, cache)


def test_compress_before_prefill():
    model, _ = make_pair("llama")
    with pytest.raises(RuntimeError, match="call cache.prefill"):
        KVzipCache(model).compress(model, 0.3, tokenizer=TOK)
    with pytest.raises(RuntimeError, match="call cache.prefill"):
        KVzipCache(model).evict(torch.ones(3, 1, 2, 4, dtype=torch.bool))


def test_model_not_loaded_with_kvzip_attention():
    model, reference = make_pair("llama")
    reference.set_attn_implementation("sdpa")
    cache = KVzipCache(reference)
    with pytest.raises(ValueError, match="attn_implementation='kvzip'"):
        cache.prefill(reference, _ids(10))
    assert cache.get_seq_length() == 0 and cache.input_ids is None
    cache.prefill(model, _ids(10))  # still usable with the right model


def test_unsupported_architectures():
    with pytest.raises(ValueError, match="soft-capping"):
        KVzipCache(Gemma2Config(**COMMON))
    with pytest.raises(TypeError, match="model or config"):
        KVzipCache("llama")
    config = MistralConfig(**COMMON, head_dim=16, sliding_window=16)  # every layer sliding
    torch.manual_seed(0)
    model = MistralForCausalLM(copy.deepcopy(config)).eval()
    model.set_attn_implementation("kvzip")
    cache = KVzipCache(model)
    cache.prefill(model, _ids(12), context_start=2)
    with pytest.raises(ValueError, match="every layer of this model uses sliding-window"):
        cache.compress(model, 0.5, tokenizer=TOK)


def test_mismatched_batch(prefilled):
    model, cache = prefilled
    cache.compress(model, 0.5, tokenizer=TOK)
    full = torch.cat([_ids(30), _ids(4, 1)], 1).expand(2, -1)
    with pytest.raises(ValueError, match="batch_repeat_interleave"):
        model.generate(full, past_key_values=cache, max_new_tokens=2)
    cache.rollback()
    _assert_intact(model, cache, compressed=True)
    with pytest.raises(ValueError, match="rows but the cache holds 1"):
        cache.inputs_for(_ids(4, 1, batch=3))


def test_bad_prefill_inputs():
    model, _ = make_pair("llama")
    cache = KVzipCache(model)
    with pytest.raises(ValueError, match="context_start has 3 entries for a batch of 2"):
        cache.prefill(model, _ids(10, batch=2), context_start=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="does not match input_ids"):
        cache.prefill(model, _ids(10), torch.ones(1, 9))
    right_padded = torch.ones(2, 10, dtype=torch.long)
    right_padded[1, -3:] = 0
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        cache.prefill(model, _ids(10, batch=2), right_padded)
    left_padded = torch.ones(2, 10, dtype=torch.long)
    left_padded[1, :4] = 0
    with pytest.raises(ValueError, match="context_start points at padding"):
        cache.prefill(model, _ids(10, batch=2), left_padded, context_start=2)
    with pytest.raises(ValueError, match=r"context_start must lie in \[0, 10\)"):
        cache.prefill(model, _ids(10), context_start=10)
    assert cache.get_seq_length() == 0
    cache.prefill(model, _ids(10))
    with pytest.raises(RuntimeError, match="needs an empty cache"):
        cache.prefill(model, _ids(10))


def test_bad_compress_arguments(prefilled):
    model, cache = prefilled
    with pytest.raises(ValueError, match="unknown level 'token'"):
        cache.compress(model, 0.5, level="token", tokenizer=TOK)
    with pytest.raises(ValueError, match="level='head' needs head_scores"):
        cache.compress(model, 0.5, level="head")
    with pytest.raises(ValueError, match=r"\[num_layers, num_kv_heads\]"):
        cache.compress(model, 0.5, level="head", head_scores=torch.ones(3, 5))
    model.config.name_or_path = "/nonexistent/model/dir"
    with pytest.raises(ValueError, match="pass tokenizer="):
        cache.compress(model, 0.5)
    _assert_intact(model, cache)


def test_failure_during_scoring_leaves_a_usable_cache(prefilled):
    model, cache = prefilled

    class FailsOnSecondPass:
        """The model, except that its second forward pass raises (as an out-of-memory error would)."""

        config, forward, calls = model.config, model.forward, 0

        def __call__(self, **kwargs):
            FailsOnSecondPass.calls += 1
            if FailsOnSecondPass.calls == 2:
                raise RuntimeError("out of memory")
            return model(**kwargs)

    with pytest.raises(RuntimeError, match="out of memory"):
        cache.compress(FailsOnSecondPass(), 0.5, tokenizer=TOK, chunk_size=8)
    assert FailsOnSecondPass.calls == 2 and cache.scores is None and cache._scoring is None
    _assert_intact(model, cache)
    cache.compress(model, 0.5, tokenizer=TOK)
    _assert_intact(model, cache, compressed=True)


def test_compress_after_appending_needs_rollback(prefilled):
    model, cache = prefilled
    with torch.no_grad():
        model(_ids(2, 5), past_key_values=cache, position_ids=torch.arange(30, 32)[None])
    with pytest.raises(RuntimeError, match="rollback"):
        cache.compress(model, 0.5, tokenizer=TOK)
    cache.rollback()
    cache.compress(model, 0.5, tokenizer=TOK)


def test_bad_keep_masks(prefilled):
    model, cache = prefilled
    with pytest.raises(ValueError, match=r"bool tensor of shape \[3, 1, 2, 27\]"):
        cache.evict(torch.ones(3, 1, 2, 30, dtype=torch.bool))
    keep = torch.zeros(3, 1, 2, 27, dtype=torch.bool)
    keep[..., :10] = True
    cache.evict(keep)
    keep[..., 10] = True
    with pytest.raises(ValueError, match="re-admits pairs"):
        cache.evict(keep)
    _assert_intact(model, cache, compressed=True)


def test_attention_mask_must_cover_the_whole_sequence(prefilled):
    model, cache = prefilled
    cache.compress(model, 0.5, tokenizer=TOK)
    with pytest.raises(ValueError, match=r"must cover the whole sequence \[context; new tokens\]"):
        with torch.no_grad():
            question = _ids(4, 1)
            model(question, attention_mask=torch.tensor([[0, 1, 1, 1]]), past_key_values=cache,
                  position_ids=torch.arange(30, 34)[None])


def _snapshot(cache):
    """What a refused call must leave unchanged: lengths, rows, stored pairs and masks."""
    layers = [(layer.get_seq_length(), getattr(layer, "src_rows", None),
               None if getattr(layer, "context", None) is None else layer.context.keys.clone()) for layer in cache.layers]
    return cache.kv_bytes(), layers, None if cache.keep_mask is None else cache.keep_mask.clone()


def _same(a, b):
    assert a[0] == b[0]
    assert (a[2] is None and b[2] is None) or torch.equal(a[2], b[2])
    for (length, rows, keys), (length2, rows2, keys2) in zip(a[1], b[1]):
        assert length == length2 and rows == rows2
        assert (keys is None and keys2 is None) or torch.equal(keys, keys2)


def test_generate_with_only_the_question_says_to_pass_the_context_too(prefilled):
    model, cache = prefilled
    cache.compress(model, 0.5, tokenizer=TOK, chunk_size=16)
    before = _snapshot(cache)
    with pytest.raises(ValueError, match=r"no new tokens after the 30 cached ones.*cache\.inputs_for"):
        model.generate(_ids(5, 1), past_key_values=cache, max_new_tokens=3)
    _same(_snapshot(cache), before)
    _assert_intact(model, cache, compressed=True)


def test_a_compressed_cache_met_by_another_attention_says_to_use_kvzip(prefilled):
    model, cache = prefilled
    cache.compress(model, 0.5, tokenizer=TOK, chunk_size=16)
    model.set_attn_implementation("sdpa")
    try:
        with pytest.raises(AttributeError, match=r"attn_implementation='kvzip'.*set_attn_implementation"):
            model.generate(**cache.inputs_for(_ids(5, 2)), past_key_values=cache, max_new_tokens=3)
    finally:
        model.set_attn_implementation("kvzip")
    cache.rollback()
    _assert_intact(model, cache, compressed=True)


def test_another_models_compress_or_prefill_is_refused_naming_what_differs(prefilled):
    model, cache = prefilled
    other, _ = make_pair("qwen3")  # the same sizes, another architecture: it would score garbage silently
    before = _snapshot(cache)
    with pytest.raises(ValueError, match=r"another architecture.*model_type 'llama' vs 'qwen3'"):
        cache.compress(other, 0.5, tokenizer=TOK, chunk_size=16)
    _same(_snapshot(cache), before)
    fresh = KVzipCache(model)
    with pytest.raises(ValueError, match="another architecture"):
        fresh.prefill(other, _ids(30), context_start=3)
    assert fresh.get_seq_length() == 0 and fresh.input_ids is None
    _assert_intact(model, cache)

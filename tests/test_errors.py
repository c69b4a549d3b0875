"""Bad input gets a clear error that says what to do, and never corrupts the cache."""

import copy

import pytest
import torch
from transformers import Gemma2Config, MistralConfig, MistralForCausalLM

from cache_state import assert_same_state, cache_state
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


def _probe(model, cache, length=30):
    """The logits of a 3-token question after the ``length``-token context (rolled back afterwards)."""
    with torch.no_grad():
        logits = model(_ids(3, 9), past_key_values=cache, position_ids=torch.arange(length, length + 3)[None]).logits
    cache.rollback()
    return logits


def _intact(model, cache):
    """What a refused call must leave as it was: the cache's whole state (`cache_state`: every layer's tensors bit
    for bit, lengths, rows, masks, scores) and its answer to a probe question."""
    logits = _probe(model, cache)
    return cache_state(cache), logits


def _assert_intact(model, cache, before, compressed=False, ignore=()):
    """The cache is bit for bit what `_intact` recorded, and answers the probe question with the same logits."""
    state, logits = before
    assert cache.get_seq_length() == 30 and cache.is_compressed == compressed
    assert_same_state(state, cache_state(cache), ignore)
    torch.testing.assert_close(_probe(model, cache), logits, rtol=0, atol=0)
    assert_same_state(state, cache_state(cache), ignore)  # the probe too left nothing behind




# `cache.inputs_for(...)` records the question's padding for `evict_while_decoding`, and `rollback()` keeps it on
# purpose: the same inputs may be asked again after a rollback (test_decode_eviction). Where a test asks through
# inputs_for before a refused generate, that record is left out of the comparison.
STALE_QUESTION = ("pending_query_mask",)


def _still_answers(model, cache, compressed=False):
    """After a call that succeeded: the cache holds its 30-token context and answers a question."""
    assert cache.get_seq_length() == 30 and cache.is_compressed == compressed
    assert torch.isfinite(_probe(model, cache)).all()


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan"), "0.3", None, True])
def test_ratio_outside_zero_one(prefilled, ratio):
    model, cache = prefilled
    before = _intact(model, cache)
    with pytest.raises(ValueError, match=r"fraction of context pairs KEPT.*\(0, 1\]"):
        cache.compress(model, ratio, tokenizer=TOK)
    _assert_intact(model, cache, before)


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
    before = _intact(model, cache)
    full = torch.cat([_ids(30), _ids(4, 1)], 1).expand(2, -1)
    with pytest.raises(ValueError, match="batch_repeat_interleave"):
        model.generate(full, past_key_values=cache, max_new_tokens=2)
    cache.rollback()
    _assert_intact(model, cache, before, compressed=True)
    with pytest.raises(ValueError, match="rows but the cache holds 1"):
        cache.inputs_for(_ids(4, 1, batch=3))
    _assert_intact(model, cache, before, compressed=True)


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
    before = _intact(model, cache)
    with pytest.raises(ValueError, match="unknown level 'token'"):
        cache.compress(model, 0.5, level="token", tokenizer=TOK)
    with pytest.raises(ValueError, match="unknown scorer 'kvzap'; registered: kvzip, kvzip\\+"):
        cache.compress(model, 0.5, scorer="kvzap")
    with pytest.raises(TypeError, match=r"score_layer\(layer_idx, keys, values, positions\) or score_context"):
        cache.compress(model, 0.5, scorer=object())
    with pytest.raises(ValueError, match="takes one scorer; got scorer= and score="):
        cache.compress(model, 0.5, scorer="kvzip", score="kvzip+")
    with pytest.raises(ValueError, match=r"\[num_layers, num_kv_heads\]"):
        cache.compress(model, 0.5, level="head", head_scores=torch.ones(3, 5))
    model.config.name_or_path = "/nonexistent/model/dir"
    with pytest.raises(ValueError, match="pass tokenizer="):
        cache.compress(model, 0.5)
    _assert_intact(model, cache, before)


def test_failure_during_scoring_leaves_a_usable_cache(prefilled):
    model, cache = prefilled
    before = _intact(model, cache)

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
    assert FailsOnSecondPass.calls == 2 and cache.scores is None and cache._scoring_pass is None
    _assert_intact(model, cache, before)
    cache.compress(model, 0.5, tokenizer=TOK)
    _still_answers(model, cache, compressed=True)


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
    before = _intact(model, cache)
    with pytest.raises(ValueError, match=r"bool tensor of shape \[3, 1, 2, 27\]"):
        cache.evict(torch.ones(3, 1, 2, 30, dtype=torch.bool))
    _assert_intact(model, cache, before)
    keep = torch.zeros(3, 1, 2, 27, dtype=torch.bool)
    keep[..., :10] = True
    cache.evict(keep)
    before = _intact(model, cache)
    keep[..., 10] = True
    with pytest.raises(ValueError, match="re-admits pairs"):
        cache.evict(keep)
    _assert_intact(model, cache, before, compressed=True)


def test_attention_mask_must_cover_the_whole_sequence(prefilled):
    model, cache = prefilled
    cache.compress(model, 0.5, tokenizer=TOK)
    with pytest.raises(ValueError, match=r"must cover the whole sequence \[context; new tokens\]"):
        with torch.no_grad():
            question = _ids(4, 1)
            model(question, attention_mask=torch.tensor([[0, 1, 1, 1]]), past_key_values=cache,
                  position_ids=torch.arange(30, 34)[None])


def test_generate_with_only_the_question_says_to_pass_the_context_too(prefilled):
    model, cache = prefilled
    cache.compress(model, 0.5, tokenizer=TOK, chunk_size=16)
    before = _intact(model, cache)
    with pytest.raises(ValueError, match=r"no new tokens after the 30 cached ones.*cache\.inputs_for"):
        model.generate(_ids(5, 1), past_key_values=cache, max_new_tokens=3)
    _assert_intact(model, cache, before, compressed=True)


def test_a_compressed_cache_met_by_another_attention_says_to_use_kvzip(prefilled):
    model, cache = prefilled
    cache.compress(model, 0.5, tokenizer=TOK, chunk_size=16)
    before = _intact(model, cache)
    model.set_attn_implementation("sdpa")
    try:
        with pytest.raises(AttributeError, match=r"attn_implementation='kvzip'.*set_attn_implementation"):
            model.generate(**cache.inputs_for(_ids(5, 2)), past_key_values=cache, max_new_tokens=3)
    finally:
        model.set_attn_implementation("kvzip")
    cache.rollback()
    _assert_intact(model, cache, before, compressed=True, ignore=STALE_QUESTION)


def test_another_models_compress_or_prefill_is_refused_naming_what_differs(prefilled):
    model, cache = prefilled
    other, _ = make_pair("qwen3")  # the same sizes, another architecture: it would score garbage silently
    before = _intact(model, cache)
    with pytest.raises(ValueError, match=r"another architecture.*model_type 'llama' vs 'qwen3'"):
        cache.compress(other, 0.5, tokenizer=TOK, chunk_size=16)
    _assert_intact(model, cache, before)
    fresh = KVzipCache(model)
    empty = cache_state(fresh)
    with pytest.raises(ValueError, match="another architecture"):
        fresh.prefill(other, _ids(30), context_start=3)
    assert_same_state(empty, cache_state(fresh))


def test_generating_from_a_compressed_cache_with_another_model_object_is_refused(prefilled, tmp_path):
    model, cache = prefilled
    other, _ = make_pair("llama", seed=1)  # same config, other weights: its answers would be garbage, silently
    cache.compress(model, 0.5, tokenizer=TOK, chunk_size=16)
    before = _intact(model, cache)
    for intruder in (other, copy.deepcopy(model)):  # a copy that neither compressed nor loaded the cache too
        with pytest.raises(ValueError, match=r"filled by another model object.*Generate with the model that"):
            intruder.generate(**cache.inputs_for(_ids(5, 2)), past_key_values=cache, max_new_tokens=3)
        # The refusal comes from the attention, after the first layer appended its keys: the next forward says so
        # (rather than attend to mismatched lengths), and rollback repairs it.
        with pytest.raises(RuntimeError, match=r"stopped partway.*cache\.rollback\(\)"):
            model(**cache.inputs_for(_ids(5, 2)), past_key_values=cache)
        cache.rollback()
        _assert_intact(model, cache, before, compressed=True, ignore=STALE_QUESTION)
    cache.evict(cache.keep_mask)  # evict takes no model: the cache keeps the one recorded
    with pytest.raises(ValueError, match="another model object"):
        other(**cache.inputs_for(_ids(5, 2)), past_key_values=cache)
    cache.rollback()
    twin = copy.deepcopy(model)  # an identical copy takes the cache over by compressing it (its weights are checked)
    cache.compress(twin, 0.5)
    twin.generate(**cache.inputs_for(_ids(5, 2)), past_key_values=cache, max_new_tokens=3)
    cache.rollback()
    loaded = KVzipCache.load(cache.save(tmp_path / "c.kvzip"), model)  # ... or by loading it
    model.generate(**loaded.inputs_for(_ids(5, 2)), past_key_values=loaded, max_new_tokens=3)


# ------------------------------------------------------------------------------------ weights and tokenizer
def test_another_fine_tune_is_refused_at_compress_and_load(prefilled, tmp_path):
    from kvzip_cache.fingerprints import weight_digests

    model, cache = prefilled
    fine_tune, _ = make_pair("llama", seed=1)  # the same config, other weights: scores would be garbage silently
    before = _intact(model, cache)
    with pytest.raises(ValueError, match=r"other weights than the one that filled this cache.*tensors differ"):
        cache.compress(fine_tune, 0.5, tokenizer=TOK, chunk_size=16)
    _assert_intact(model, cache, before)
    # the same checkpoint in another dtype or a copy passes (the sample is rounded to bfloat16)
    assert weight_digests(copy.deepcopy(model).to(torch.bfloat16)) == weight_digests(model)
    cache.compress(copy.deepcopy(model), 0.5, tokenizer=TOK, chunk_size=16)
    path = cache.save(tmp_path / "c.kvzip")
    with pytest.raises(ValueError, match="saved from a model with other weights"):
        KVzipCache.load(path, fine_tune)
    cache.reset()  # an empty cache holds nothing of the old model: the fine-tune may fill it
    cache.prefill(fine_tune, _ids(30), context_start=3)
    cache.compress(fine_tune, 0.5, tokenizer=TOK, chunk_size=16)
    with pytest.raises(ValueError, match="other weights"):
        cache.compress(model, 0.4)


class ShiftedTokenizer(ByteTokenizer):
    """Another tokenizer: the same interface, other ids."""

    def encode(self, text, add_special_tokens=False):
        return [3 + ((ord(ch) + 1) % 125) for ch in text]


def test_another_tokenizer_is_refused_on_a_later_compress(prefilled, tmp_path):
    model, cache = prefilled
    cache.compress(model, 0.5, tokenizer=TOK, chunk_size=16)
    before = _intact(model, cache)
    with pytest.raises(ValueError, match=r"another tokenizer than the one this cache was scored with.*probe_ids"):
        cache.compress(model, 0.3, tokenizer=ShiftedTokenizer())
    _assert_intact(model, cache, before, compressed=True)
    renamed = ByteTokenizer()
    renamed.name_or_path = "/elsewhere/the-same-tokenizer"  # only the name differs: accepted
    cache.compress(model, 0.4, tokenizer=renamed)
    cache.compress(model, 0.3)  # no tokenizer: the stored scores are re-used
    loaded = KVzipCache.load(cache.save(tmp_path / "c.kvzip"), model)  # the file keeps the tokenizer's fields
    with pytest.raises(ValueError, match="another tokenizer"):
        loaded.compress(model, 0.2, tokenizer=ShiftedTokenizer())
    loaded.compress(model, 0.2, tokenizer=TOK)


# ------------------------------------------------------------------------------------------- resource errors
def _fail_after(monkeypatch, owner, name, calls, error):
    """Make ``owner.name`` (a library function) raise ``error`` on its ``calls``-th call from now."""
    original, count = getattr(owner, name), [0]

    def failing(*args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return count


def _notes(info) -> str:
    return " ".join(getattr(info.value, "__notes__", []))


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory (injected)"), KeyboardInterrupt()],
                         ids=["oom", "interrupt"])
def test_an_interrupted_scoring_pass_leaves_the_cache_as_it_was(prefilled, monkeypatch, error):
    from kvzip_cache.layers import KVzipLayer

    model, cache = prefilled
    before = _intact(model, cache)
    count = _fail_after(monkeypatch, KVzipLayer, "peek", 5, error)  # the third pass's first full layer, say
    with pytest.raises(type(error)):
        cache.compress(model, 0.5, tokenizer=TOK, chunk_size=8)
    assert count[0] == 5 and cache.scores is None and cache.keep_mask is None and cache._scoring_pass is None
    assert cache.weight_digests is not None and cache.tokenizer_fields is None
    _assert_intact(model, cache, before)
    monkeypatch.undo()
    cache.compress(model, 0.5, tokenizer=TOK, chunk_size=8)  # and it compresses as a fresh cache does
    fresh = KVzipCache(model)
    fresh.prefill(model, _ids(30), context_start=3)
    fresh.compress(model, 0.5, tokenizer=TOK, chunk_size=8)
    assert torch.equal(cache.keep_mask, fresh.keep_mask)
    torch.testing.assert_close(cache.scores, fresh.scores, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(_probe(model, cache), _probe(model, fresh), rtol=0, atol=0)


def test_an_interrupted_eviction_leaves_the_cache_as_it_was_or_resets_it_saying_so(prefilled, monkeypatch):
    from kvzip_cache.layers import KVzipLayer

    model, cache = prefilled
    cache.compress(model, 0.6, tokenizer=TOK, chunk_size=16)
    before = _intact(model, cache)
    _fail_after(monkeypatch, KVzipLayer, "evict", 1, torch.OutOfMemoryError("injected"))  # before any layer changed
    with pytest.raises(torch.OutOfMemoryError) as info:
        cache.compress(model, 0.3)
    assert "the cache is as it was" in _notes(info)
    _assert_intact(model, cache, before, compressed=True)
    assert cache.compressed_with == ("pair", 0.6)
    _fail_after(monkeypatch, KVzipLayer, "evict", 2, KeyboardInterrupt())  # after the first layer dropped pairs
    with pytest.raises(KeyboardInterrupt) as info:
        cache.compress(model, 0.3)
    assert "reset to empty" in _notes(info)
    assert cache.get_seq_length() == 0 and cache.kv_bytes() == 0 and cache.input_ids is None
    with pytest.raises(RuntimeError, match="call cache.prefill"):
        cache.compress(model, 0.3)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory (injected)"), KeyboardInterrupt()],
                         ids=["oom", "interrupt"])
@pytest.mark.parametrize("kind", ["plain", "head-dropping"])
def test_an_interrupted_chunked_prefill_resets_the_cache_saying_so(monkeypatch, error, kind):
    from kvzip_cache.layers import KVzipLayer

    model, _ = make_pair("llama")
    extra = {"head_scores": torch.rand(3, 2, generator=torch.Generator().manual_seed(0)), "ratio": 0.5} \
        if kind == "head-dropping" else {}
    cache = KVzipCache(model)
    # 3 full layers per chunk of 8: the 7th update is the third chunk's first layer
    count = _fail_after(monkeypatch, KVzipLayer, "update", 7, error)
    with pytest.raises(type(error)) as info:
        cache.prefill(model, _ids(30), context_start=3, chunk_size=8, **extra)
    assert count[0] == 7 and "the cache was reset to empty" in _notes(info)
    assert cache.get_seq_length() == 0 and cache.kv_bytes() == 0 and cache.input_ids is None
    assert cache.weight_digests is None and not cache.is_compressed
    with pytest.raises(RuntimeError, match="call cache.prefill"):  # a half-filled cache is never taken as complete
        cache.compress(model, 0.5, tokenizer=TOK)
    monkeypatch.undo()
    cache.prefill(model, _ids(30), context_start=3, chunk_size=8, **extra)
    fresh = KVzipCache(model)
    fresh.prefill(model, _ids(30), context_start=3, chunk_size=8, **extra)
    torch.testing.assert_close(_probe(model, cache), _probe(model, fresh), rtol=0, atol=0)


# ------------------------------------------------------------------------------------- inputs a newcomer gets wrong
def test_a_string_question_is_refused_with_the_encoder_to_use(prefilled):
    model, cache = prefilled
    before = _intact(model, cache)
    with pytest.raises(TypeError, match=r"query_ids must be a \[batch, tokens\] tensor.*got a str.*encode_query\("):
        cache.inputs_for("What is the magic number?")
    with pytest.raises(TypeError, match=r"query_ids must hold integer token ids; got torch.float32"):
        cache.inputs_for(torch.ones(1, 3))
    assert cache.pending_query_mask is None
    _assert_intact(model, cache, before)


def test_a_list_of_contexts_is_refused_with_the_batch_encoder_to_use():
    model, _ = make_pair("llama")
    cache = KVzipCache(model)
    with pytest.raises(TypeError, match=r"input_ids must be a \[batch, tokens\] tensor.*got a list.*encode_contexts"):
        cache.prefill(model, [_ids(10)[0], _ids(12)[0]])
    assert cache.input_ids is None and cache.get_seq_length() == 0


def test_swapped_compress_arguments_name_the_order_without_printing_the_model(prefilled):
    model, cache = prefilled
    before = _intact(model, cache)
    with pytest.raises(ValueError) as refused:
        cache.compress(0.3, model)
    message = str(refused.value)
    assert "the order is compress(model, ratio)" in message and "LlamaForCausalLM" in message
    assert len(message) < 200  # not the model's repr
    _assert_intact(model, cache, before)


def test_saving_into_a_missing_folder_names_the_folder(prefilled, tmp_path):
    model, cache = prefilled
    cache.compress(model, 0.5, tokenizer=TOK)
    target = tmp_path / "not_there" / "cache.kvzip"
    with pytest.raises(FileNotFoundError, match=rf"folder {target.parent} does not exist"):
        cache.save(target)
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        cache.save(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_left_padding_without_a_mask_is_refused_before_anything_is_cached():
    model, _ = make_pair("llama")  # pad_token_id 0, bos 1
    ids = _ids(12, batch=2)
    ids[1, :4] = 0  # a left-padded row, passed without its attention_mask
    cache = KVzipCache(model)
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] of input_ids start with the pad token \(0\).*attention_mask"):
        cache.prefill(model, ids, context_start=5)
    assert cache.input_ids is None and cache.get_seq_length() == 0
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    cache.prefill(model, ids, mask, context_start=torch.tensor([2, 5]))  # with the mask it is what it should be
    assert cache.context_length == 12


def test_training_mode_with_attention_dropout_is_refused_before_the_prefill_runs():
    model, _ = make_pair("llama")
    model.config.attention_dropout = 0.1
    model.train()
    cache = KVzipCache(model)
    with pytest.raises(ValueError, match=r"training mode with attention dropout.*model.eval\(\)") as refused:
        cache.prefill(model, _ids(10))
    assert "chunk_size" not in str(refused.value) and not getattr(refused.value, "__notes__", None)
    model.eval()
    cache.prefill(model, _ids(10))
    assert cache.context_length == 10

"""Score predictors: RoPE inversion, predicted compress, eviction while prefilling, training, files, refusals.

The references are independent of the library: transformers' own RoPE and projections, a float64 eager model that
hides pairs chunk by chunk (conftest's reference attention), and selections recomputed from the reference's keys.
"""

import copy

import pytest
import torch

from conftest import ByteTokenizer, make_pair
from kvzip_cache import KVzipCache, ScorePredictor
from kvzip_cache.scorers.rotary import rotary_tables, unrotate
from kvzip_cache.selection import kept_count, select_pairs
from kvzip_cache.tools.training import collect_samples, evaluate_predictor, fit_predictor
from references import evicting_prefill, predictor_rating


def _batch(gen, length=29):
    ids = torch.randint(3, 120, (2, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    return ids, mask, torch.tensor([2, 6])


# ------------------------------------------------------------------------------------------------------ RoPE
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "phi3"])
def test_unrotate_inverts_the_models_own_rope(arch):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, _ = make_pair(arch)
    positions = torch.tensor([[0, 5, 17, 300], [3, 4, 9, 1000]])
    cos, sin = rotary_tables(model, positions)
    keys = torch.randn(2, 2, 4, 16, dtype=torch.float64).float()
    # transformers' own forward rotation (cos, sin from the model's rotary embedding, as its attention applies it)
    decoder = model.get_decoder()
    args = (keys, positions, "full_attention") if arch == "gemma3" else (keys, positions)
    t_cos, t_sin = decoder.rotary_emb(*args)
    _, rotated = apply_rotary_pos_emb(keys, keys, t_cos, t_sin)
    torch.testing.assert_close(unrotate(rotated, cos, sin), keys, atol=1e-5, rtol=1e-5)


def test_unrotated_first_layer_keys_are_the_projection_of_the_token_embedding():
    model, _ = make_pair("llama")
    ids = torch.tensor([[5, 9, 5, 7, 9, 5]])
    cache = KVzipCache(model)
    cache.prefill(model, ids)
    cos, sin = rotary_tables(model, torch.arange(6)[None])
    layer0 = model.model.layers[0]
    with torch.no_grad():
        expected = layer0.self_attn.k_proj(layer0.input_layernorm(model.model.embed_tokens(ids)))  # [1, 6, H*D]
    expected = expected.view(1, 6, 2, 16).transpose(1, 2)
    torch.testing.assert_close(unrotate(cache.layers[0].keys, cos, sin), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- predicted compress
def _count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))  # test instrumentation only
    return calls, handle


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_predicted_compress_equals_evict_of_the_predictions_and_runs_no_forward(kind):
    model, _ = make_pair("gemma3")  # sliding layers: never predicted, never evicted
    predictor = ScorePredictor.init(model, kind, seed=3)
    ids, mask, starts = _batch(torch.Generator().manual_seed(1))
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=starts)
    dense = copy.deepcopy(cache)

    # the predictions, recomputed from the dense keys with transformers' RoPE tables and the layer modules
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, 2:]
    expected = torch.full((4, 2, 2, 27), float("nan"))
    cos, sin = rotary_tables(model, positions)
    for idx in (1, 3):
        keys, values = dense.layers[idx].keys[:, :, 2:], dense.layers[idx].values[:, :, 2:]
        features = torch.cat([unrotate(keys, cos, sin), values], -1).permute(0, 2, 1, 3).flatten(2)
        expected[idx] = predictor.layers[idx](features).transpose(1, 2)
    selectable = dense.selectable_pairs()
    expected = expected.masked_fill(~selectable, float("nan"))

    calls, handle = _count_forwards(model)
    try:
        cache.compress(model, 0.4, predictor=predictor)
    finally:
        handle.remove()
    assert calls == []
    torch.testing.assert_close(cache.scores, expected, atol=1e-5, rtol=1e-5, equal_nan=True)
    dense.evict(select_pairs(expected, 0.4))
    assert torch.equal(cache.keep_mask, dense.keep_mask) and cache.kv_bytes() == dense.kv_bytes()
    assert cache.compressed_with == ("pair", 0.4) and cache.score_source == "predicted"
    question = torch.randint(3, 120, (2, 4), generator=torch.Generator().manual_seed(2))
    inputs = cache.inputs_for(question)
    positions = (inputs["attention_mask"].cumsum(-1) - 1)[:, -4:]
    with torch.no_grad():
        got = model(input_ids=question, attention_mask=inputs["attention_mask"], position_ids=positions,
                    past_key_values=cache).logits
        want = model(input_ids=question, attention_mask=inputs["attention_mask"], position_ids=positions,
                     past_key_values=dense).logits
    torch.testing.assert_close(got, want)


def test_level_predicted_is_pair_level_with_the_predictor():
    model, _ = make_pair("llama")
    predictor = ScorePredictor.init(model, "linear")
    ids, mask, starts = _batch(torch.Generator().manual_seed(4))
    a, b = KVzipCache(model), KVzipCache(model)
    for cache in (a, b):
        cache.prefill(model, ids, mask, context_start=starts)
    a.compress(model, 0.3, level="predicted", predictor=predictor)
    b.compress(model, 0.3, predictor=predictor)
    assert torch.equal(a.keep_mask, b.keep_mask)
    a.compress(model, 0.2)  # re-selects with the stored predictions
    assert bool((a.keep_mask <= b.keep_mask).all()) and int(a.keep_mask.sum()) == kept_count(0.2, 6 * 27) + kept_count(0.2, 6 * 23)  # 3 layers x 2 heads


# --------------------------------------------------------------------------------- eviction while prefilling
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_prefill_with_eviction_equals_the_chunked_masked_reference(arch):
    model, reference = make_pair(arch)
    predictor = ScorePredictor.init(model, "mlp", seed=7)
    gen = torch.Generator().manual_seed(11)
    ids, mask, starts = _batch(gen)
    question = torch.randint(3, 120, (2, 5), generator=gen)
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=starts, chunk_size=8, predictor=predictor, ratio=0.5)
    expected_keep, expected = evicting_prefill(reference, predictor_rating(predictor, reference), ids, mask, starts, 8,
                                               0.5, question)

    assert cache.compressed_with == ("pair", 0.5) and cache.score_source == "predicted"
    assert torch.equal(cache.keep_mask, expected_keep)
    # every chunk keeps round(0.5 x its selectable pairs) per row: the full cache never existed
    full = KVzipCache(model)
    full.prefill(model, ids, mask, context_start=starts)
    full_context = full.kv_bytes() - cache.kv_bytes()
    assert full_context > 0
    inputs = cache.inputs_for(question)
    positions = (inputs["attention_mask"].cumsum(-1) - 1)[:, -5:]
    with torch.no_grad():
        got = model(input_ids=question, attention_mask=inputs["attention_mask"], position_ids=positions,
                    past_key_values=cache).logits
    torch.testing.assert_close(got.double(), expected.double(), atol=1e-4, rtol=0)
    if arch == "llama":  # the reference tells it apart from compressing after a full prefill
        full.evict(cache.keep_mask)
        with torch.no_grad():
            post_hoc = model(input_ids=question, attention_mask=inputs["attention_mask"], position_ids=positions,
                             past_key_values=full).logits
        assert (post_hoc.double() - got.double()).abs().max() > 1e-3


def test_an_evicting_prefill_serves_generate_rollback_make_static_and_a_second_compress():
    model, _ = make_pair("llama")
    predictor = ScorePredictor.init(model, "linear", seed=1)
    gen = torch.Generator().manual_seed(3)
    ids, mask, starts = _batch(gen, 40)
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=starts, chunk_size=16, predictor=predictor, ratio=0.5)
    question = torch.randint(3, 120, (2, 3), generator=gen)
    inputs = cache.inputs_for(question)
    first = model.generate(**inputs, past_key_values=cache, max_new_tokens=4, do_sample=False)
    bytes_after_compress = None
    cache.rollback()
    again = model.generate(**inputs, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert torch.equal(first, again)
    cache.rollback()
    kept_before = cache.keep_mask.clone()
    cache.compress(model, 0.3)  # re-selects among the kept pairs by the stored predictions
    assert bool((cache.keep_mask <= kept_before).all())
    assert int(cache.keep_mask.sum()) == kept_count(0.3, 6 * 38) + kept_count(0.3, 6 * 34)
    bytes_after_compress = cache.kv_bytes()
    dynamic = model.generate(**inputs, past_key_values=cache, max_new_tokens=4, do_sample=False)
    cache.rollback()
    assert cache.kv_bytes() == bytes_after_compress
    cache.make_static(16)
    static = model.generate(**inputs, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert torch.equal(dynamic, static)


# ------------------------------------------------------------------------------------------ training and files
def _samples(model):
    gen = torch.Generator().manual_seed(5)
    texts = ["".join(chr(65 + int(c)) for c in torch.randint(0, 26, (n,), generator=gen)) for n in (40, 50, 45)]
    return collect_samples(model, ByteTokenizer(), texts, progress=False)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_training_is_deterministic_and_fits_the_exact_scores(kind):
    model, _ = make_pair("qwen3")
    samples = _samples(model)
    options = dict(epochs=20, batch_size=16, progress=False)
    first = fit_predictor(samples, ScorePredictor.init(model, kind), **options)
    second = fit_predictor(samples, ScorePredictor.init(model, kind), **options)
    for idx in first.layers:
        for (name, a), (_, b) in zip(first.layers[idx].state_dict().items(), second.layers[idx].state_dict().items()):
            assert torch.equal(a, b), name
    # on its own training data, a fit beats the constant predictor (R2 > 0) and ranks better than chance
    metrics = evaluate_predictor(first, samples)
    assert metrics["mean_r2"] > 0.0 and metrics["overlap"]["0.3"] > 0.3


def test_save_load_round_trip_keeps_weights_and_metadata(tmp_path):
    model, _ = make_pair("gemma3")
    predictor = ScorePredictor.init(model, "mlp", seed=2, model_name="tiny-gemma3")
    predictor.metrics = {"overlap": {"0.3": 0.5}}
    predictor.training = {"texts": 3}
    path = predictor.save(tmp_path)
    loaded = ScorePredictor.from_pretrained(tmp_path, model=model)
    assert path.name == "score_predictor.safetensors" and (path.stat().st_mode & 0o044)
    assert sorted(loaded.layers) == [1, 3] and loaded.kind == "mlp" and loaded.hidden == predictor.hidden
    assert (loaded.metrics, loaded.training, loaded.model_name) == (predictor.metrics, predictor.training, "tiny-gemma3")
    keys, values = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = rotary_tables(model, torch.arange(5).expand(2, -1))
    torch.testing.assert_close(loaded.predict(3, keys, values, cos, sin), predictor.predict(3, keys, values, cos, sin))


def test_shipped_predictors_load_by_short_name_and_know_their_model():
    from kvzip_cache import shipped_predictors

    shipped = shipped_predictors()
    assert "smollm2-135m" in shipped
    for name, entry in shipped.items():
        predictor = ScorePredictor.from_pretrained(name)
        assert predictor.kind == entry["default"] and predictor.metrics["overlap"]["0.3"] > 0.3
        assert predictor.fingerprint == entry["fingerprint"]
    model, _ = make_pair("llama")
    with pytest.raises(ValueError, match="does not fit this model"):
        ScorePredictor.from_pretrained("smollm2-135m", model=model)


# ---------------------------------------------------------------------------------------------------- refusals
def _snapshot(cache):
    layer = cache.layers[0]
    return (cache.kv_bytes(), cache.compressed_with, None if layer.keys is None else layer.keys.clone())


def test_bad_predictor_arguments_are_refused_without_touching_the_cache():
    model, _ = make_pair("llama")
    other, _ = make_pair("gemma3")
    wrong = ScorePredictor.init(other, "linear")
    good = ScorePredictor.init(model, "linear")
    ids, mask, starts = _batch(torch.Generator().manual_seed(9))
    cache = KVzipCache(model)
    with pytest.raises(ValueError, match="does not fit this model"):
        cache.prefill(model, ids, mask, context_start=starts, predictor=wrong, ratio=0.5)
    with pytest.raises(ValueError, match="needs ratio"):
        cache.prefill(model, ids, mask, context_start=starts, predictor=good)
    with pytest.raises(ValueError, match="fraction of context pairs KEPT"):
        cache.prefill(model, ids, mask, context_start=starts, predictor=good, ratio=0.0)
    with pytest.raises(ValueError, match="takes one scorer; got predictor= and head_scores="):
        cache.prefill(model, ids, mask, context_start=starts, predictor=good, ratio=0.5, head_scores=torch.rand(3, 2))
    with pytest.raises(TypeError, match="must be a ScorePredictor"):
        cache.prefill(model, ids, mask, context_start=starts, predictor="smollm2-135m", ratio=0.5)
    assert cache.input_ids is None and cache.get_seq_length() == 0

    cache.prefill(model, ids, mask, context_start=starts)
    before = _snapshot(cache)
    with pytest.raises(ValueError, match="does not fit this model"):
        cache.compress(model, 0.5, predictor=wrong)
    with pytest.raises(ValueError, match="needs predictor"):
        cache.compress(model, 0.5, level="predicted")
    with pytest.raises(ValueError, match="takes one scorer; got predictor= and score="):
        cache.compress(model, 0.5, predictor=good, score="kvzip+")
    with pytest.raises(ValueError, match="fraction of context pairs KEPT"):
        cache.compress(model, 1.5, predictor=good)
    after = _snapshot(cache)
    assert after[:2] == before[:2] and torch.equal(after[2], before[2]) and cache.scores is None
    cache.compress(model, 0.5, predictor=good)
    with pytest.raises(ValueError, match="cannot switch"):
        cache.compress(model, 0.3, score="kvzip", tokenizer=ByteTokenizer())

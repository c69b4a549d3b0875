"""Score predictors: RoPE inversion, predicted compress, eviction while prefilling, training, files, refusals.

The references are independent of the library: transformers' own RoPE and projections, a float64 eager model that
hides pairs chunk by chunk (conftest's reference attention), predictions recomputed in float64 from the predictor's
raw weights and RoPE tables built from the config (`references.py`), and selections by the references' own top-k;
each of those is checked against the library's counterpart here.
"""

import copy
import math

import pytest
import torch

from conftest import ARCHS, ByteTokenizer, make_pair
from kvzip_cache import KVzipCache, ScorePredictor
from kvzip_cache.scorers.rotary import rotary_tables, unrotate
from kvzip_cache.selection import kept_count, select_pairs
from kvzip_cache.tools.training import collect_dataset, evaluate_predictor, fit_predictor
from references import evicting_prefill, held_bytes, predictor_rating, top_pairs, unrotate64


def _batch(gen, length=29):
    ids = torch.randint(3, 120, (2, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    return ids, mask, torch.tensor([2, 6])


# ------------------------------------------------------------------------------------------------------ RoPE
def _head_dim(config):
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@pytest.mark.parametrize("arch", ARCHS)
def test_unrotate_inverts_the_models_own_rope(arch):
    """The library's inverse and the test reference's (`unrotate64`, tables from the config) both undo
    transformers' own rotation."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, _ = make_pair(arch)
    positions = torch.tensor([[0, 5, 17, 300], [3, 4, 9, 1000]])
    cos, sin = rotary_tables(model, positions)
    keys = torch.randn(2, 2, 4, _head_dim(model.config), dtype=torch.float64).float()
    # transformers' own forward rotation (cos, sin from the model's rotary embedding, as its attention applies it)
    decoder = model.get_decoder()
    args = (keys, positions, "full_attention") if arch == "gemma3" else (keys, positions)
    t_cos, t_sin = decoder.rotary_emb(*args)
    _, rotated = apply_rotary_pos_emb(keys, keys, t_cos, t_sin)
    torch.testing.assert_close(unrotate(rotated, cos, sin), keys, atol=1e-5, rtol=1e-5)
    # transformers' float32 tables are off by ~1e-5 rad at position 1000; the reference's float64 ones are exact
    torch.testing.assert_close(unrotate64(model.config, rotated, positions), keys.double(), atol=1e-4, rtol=1e-4)
    assert (rotated - keys).abs().max() > 0.1  # the rotation did something to undo


@pytest.mark.parametrize("arch", ARCHS)
def test_the_references_predictions_and_top_k_agree_with_the_library(arch):
    """`references.predictor_rating` (float64, raw weights, its own RoPE inverse) gives `ScorePredictor.predict`'s
    scores, and `references.top_pairs` picks `select_pairs`' pairs (ties and NaN included): the references used
    against the library below are right, and share no code with it."""
    model, _ = make_pair(arch)
    gen = torch.Generator().manual_seed(21)
    config = model.config
    heads, head_dim = config.num_key_value_heads, _head_dim(config)
    positions = torch.tensor([[0, 1, 2, 7, 40, 300], [-1, -1, 0, 1, 2, 3]])  # row 1 left-padded
    keys, values = torch.randn(2, 2, heads, 6, head_dim, generator=gen)
    cos, sin = rotary_tables(model, positions.clamp(min=0))
    for kind in ("linear", "mlp"):
        predictor = ScorePredictor.init(model, kind, seed=5)
        for module in predictor.layers.values():  # a standardisation that matters (init leaves 0 and 1)
            module.mean.normal_(generator=gen)
            module.std.uniform_(0.5, 2.0, generator=gen)
        rate = predictor_rating(predictor, model)
        for idx in predictor.layers:
            expected = rate(idx, keys, values, positions)
            assert expected.dtype == torch.float64 and expected.shape == (2, heads, 6)
            torch.testing.assert_close(predictor.predict(idx, keys, values, cos, sin).double(), expected, atol=1e-5,
                                       rtol=1e-5)
    scores = torch.randint(0, 6, (3, 2, heads, 9), generator=gen).float()  # many ties
    scores[1] = float("nan")  # a sliding layer
    scores[:, 1, :, :2] = float("nan")  # padding / protected prefix of row 1
    for ratio in (0.1, 0.35, 0.5, 1.0):
        assert torch.equal(top_pairs(scores, ratio), select_pairs(scores, ratio))
        assert torch.equal(top_pairs(scores, ratio, uniform=True), select_pairs(scores, ratio, "pair-uniform"))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_all_layers_at_once_rate_as_each_layer_alone(kind):
    """`ScorePredictor.predict_layers` (the layers stacked into batched products: what eviction while decoding
    runs) gives the float64 reference's scores for every layer (key+value), and each layer's own `predict` for the
    other feature specs; awkward shapes: two rows, 7 positions, layers in an unusual order."""
    model, _ = make_pair("qwen2")
    gen = torch.Generator().manual_seed(23)
    config = model.config
    heads, head_dim = config.num_key_value_heads, _head_dim(config)
    positions = torch.tensor([[0, 1, 2, 7, 40, 300, 301], [-1, -1, 0, 1, 2, 3, 4]])
    cos, sin = rotary_tables(model, positions.clamp(min=0))
    for features in ("key+value", "key", "rotated-key+value"):
        predictor = ScorePredictor.init(model, kind, features=features, seed=6)
        for module in predictor.layers.values():  # a standardisation that matters (init leaves 0 and 1)
            module.mean.normal_(generator=gen)
            module.std.uniform_(0.5, 2.0, generator=gen)
        layers = sorted(predictor.layers, reverse=True)
        keys, values = torch.randn(2, len(layers), 2, heads, 7, head_dim, generator=gen)
        stacked = predictor.predict_layers(layers, keys, values, cos, sin)
        assert stacked.shape == (len(layers), 2, heads, 7) and stacked.dtype == torch.float32
        rate = predictor_rating(predictor, model) if features == "key+value" else None
        for i, idx in enumerate(layers):
            if rate is not None:
                torch.testing.assert_close(stacked[i].double(), rate(idx, keys[i], values[i], positions), atol=1e-5,
                                           rtol=1e-5)
            torch.testing.assert_close(stacked[i], predictor.predict(idx, keys[i], values[i], cos, sin), atol=1e-5,
                                       rtol=1e-5)
    with pytest.raises(ValueError, match=r"no layers \[99\]"):
        predictor.predict_layers([99], keys[:1], values[:1], cos, sin)


def test_stacked_layers_follow_a_change_of_the_weights():
    """The stacked weights are kept between calls (they cost a dozen operations a layer to build) but rebuilt when
    a weight changes in place (a training step), so a predictor never rates with stale weights."""
    model, _ = make_pair("llama")
    predictor = ScorePredictor.init(model, "mlp", seed=3)
    gen = torch.Generator().manual_seed(4)
    layers = sorted(predictor.layers)
    heads, head_dim = model.config.num_key_value_heads, _head_dim(model.config)
    keys, values = torch.randn(2, len(layers), 1, heads, 5, head_dim, generator=gen)
    cos, sin = rotary_tables(model, torch.arange(5)[None])
    before = predictor.predict_layers(layers, keys, values, cos, sin)
    with torch.no_grad():
        predictor.layers[layers[-1]].net[2].weight.mul_(-3.0)
    after = predictor.predict_layers(layers, keys, values, cos, sin)
    assert torch.equal(after[:-1], before[:-1]) and not torch.allclose(after[-1], before[-1])
    torch.testing.assert_close(after[-1], predictor.predict(layers[-1], keys[-1], values[-1], cos, sin), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_half_precision_keys_are_rated_in_their_own_dtype(kind):
    """bf16 keys (a bf16 model on the GPU) are unrotated and meet the first layer in bf16, not float32: the float64
    reference's scores within bf16 rounding, and the same top 30% of pairs but for a few near ties."""
    from kvzip_cache.scorers.predictor import pair_features

    model, _ = make_pair("llama")
    gen = torch.Generator().manual_seed(22)
    config = model.config
    heads, head_dim = config.num_key_value_heads, _head_dim(config)
    positions = torch.arange(400)[None].expand(2, -1)
    keys, values = (torch.randn(2, 2, heads, 400, head_dim, generator=gen) * 3).to(torch.bfloat16)
    cos, sin = rotary_tables(model, positions)
    predictor = ScorePredictor.init(model, kind, seed=5)
    rate = predictor_rating(predictor, model)
    assert pair_features("key+value", keys, values, cos, sin).dtype == torch.bfloat16
    for idx in predictor.layers:
        half = predictor.predict(idx, keys, values, cos, sin)
        expected = rate(idx, keys.float(), values.float(), positions)
        assert half.dtype == torch.float32
        spread = expected.std()
        assert (half.double() - expected).abs().max() < 0.05 * spread  # bf16: 8 bits of mantissa, summed
        assert (half.double() - expected).abs().max() > 0  # computed in bf16 indeed
        kept, kept_expected = top_pairs(half[None], 0.3), top_pairs(expected.float()[None], 0.3)
        assert (kept & kept_expected).sum() >= 0.95 * kept_expected.sum()


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

    # the predictions, recomputed from the dense keys by the float64 reference (its own RoPE inverse, the raw weights)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, 2:]
    expected = torch.full((4, 2, 2, 27), float("nan"), dtype=torch.float64)
    rate = predictor_rating(predictor, model)
    for idx in (1, 3):
        keys, values = dense.layers[idx].keys[:, :, 2:], dense.layers[idx].values[:, :, 2:]
        expected[idx] = rate(idx, keys, values, positions)
    selectable = dense.selectable_pairs()
    expected = expected.masked_fill(~selectable, float("nan"))

    calls, handle = _count_forwards(model)
    try:
        cache.compress(model, 0.4, predictor=predictor)
    finally:
        handle.remove()
    assert calls == []
    torch.testing.assert_close(cache.scores.double(), expected, atol=1e-5, rtol=1e-5, equal_nan=True)
    dense.evict(top_pairs(expected.float(), 0.4))
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
@pytest.mark.parametrize("arch,budget,kv_dtype", [(arch, budget, None) for arch in ("llama", "gemma3")
                                                   for budget in ("chunk", "carry")]
                         + [("llama", "chunk", "fp8"), ("gemma3", "carry", "fp8")])
def test_prefill_with_eviction_equals_the_chunked_masked_reference(arch, budget, kv_dtype):
    """budget "chunk": each chunk keeps ratio x its own pairs; "carry": after each chunk, ratio x every pair rated so
    far, chosen among those still held. A float64 reference that hides pairs from then on gives the same keep mask
    and question logits, and the two budgets select differently (so the test tells them apart). With fp8 kept pairs
    every later chunk and the question attend to fp8-rounded pairs: the reference rounds each chunk's pairs once
    rated (`references.fp8_round`)."""
    model, reference = make_pair(arch)
    predictor = ScorePredictor.init(model, "mlp", seed=7)
    gen = torch.Generator().manual_seed(11)
    ids, mask, starts = _batch(gen)
    question = torch.randint(3, 120, (2, 5), generator=gen)
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=starts, chunk_size=8, predictor=predictor, ratio=0.5, budget=budget,
                  kv_dtype=kv_dtype)
    assert all(cache.layers[i].context.is_fp8 == (kv_dtype == "fp8") for i in cache.compressible_layers)
    rate = predictor_rating(predictor, reference)
    expected_keep, expected = evicting_prefill(reference, rate, ids, mask, starts, 8, 0.5, question,
                                               carry=budget == "carry", fp8=kv_dtype == "fp8")

    assert cache.compressed_with == ("pair", 0.5) and cache.score_source == "predicted"
    assert torch.equal(cache.keep_mask, expected_keep)
    if budget == "carry":
        selectable = cache.selectable_pairs()
        for row in range(2):  # ratio x everything seen, exactly, as a one-shot selection would keep
            assert int(cache.keep_mask[:, row].sum()) == kept_count(0.5, int(selectable[:, row].sum()))
        per_chunk, _ = evicting_prefill(reference, rate, ids, mask, starts, 8, 0.5, question)
        assert not torch.equal(per_chunk, expected_keep)
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


def test_a_carried_budget_is_refused_where_it_means_nothing():
    model, _ = make_pair("llama")
    ids = torch.randint(3, 120, (1, 20))
    cache = KVzipCache(model)
    with pytest.raises(ValueError, match="scorer= and ratio="):
        cache.prefill(model, ids, budget="carry")
    with pytest.raises(ValueError, match="choose one of"):
        cache.prefill(model, ids, scorer=ScorePredictor.init(model, "linear"), ratio=0.5, budget="global")
    with pytest.raises(ValueError, match="level 'head'"):
        cache.prefill(model, ids, scorer=ScorePredictor.init(model, "linear"), ratio=0.5, level="head", budget="carry")
    assert cache.input_ids is None and cache.get_seq_length() == 0


@pytest.mark.parametrize("budget", ["chunk", "carry"])
def test_an_evicting_prefill_holds_at_most_the_kept_pairs_and_one_chunk(budget):
    """What the cache's layers really allocate (every float storage they reference, not `kv_bytes`) is bounded at
    every step of a prefill that evicts: before a chunk runs, the pairs kept so far; while it runs, those plus the
    chunk's dense pairs; at the end, exactly the kept pairs. The bounds are counted here from the masks and the
    ratio, and lie far below the full cache (which the test checks, so the bound can fail). With the carried budget
    the pairs kept so far are ratio x everything seen (re-selected), every layer ragged from the first chunk on."""
    model, _ = make_pair("llama")
    config = model.config
    layers, heads, head_dim = config.num_hidden_layers, config.num_key_value_heads, 16
    pair_bytes = 2 * head_dim * 4  # key + value, float32
    predictor = ScorePredictor.init(model, "mlp", seed=7)
    gen = torch.Generator().manual_seed(12)
    seq, chunk, ratio = 256, 64, 0.25  # chunks of 64: the tail buffer's minimum capacity, so no slack beyond a chunk
    ids = torch.randint(3, 120, (2, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    starts = torch.tensor([3, 14])
    # what each chunk leaves behind, per row: ratio x its selectable pairs (halves rounded up) plus its protected prefix
    kept, padding = [], []
    for lo in range(0, seq, chunk):
        total = 0
        for row in range(2):
            real = [p for p in range(lo, lo + chunk) if mask[row, p]]
            selectable = sum(p >= int(starts[row]) for p in real)
            total += math.floor(ratio * layers * heads * selectable + 0.5) + layers * heads * (len(real) - selectable)
        kept.append(total)
        padding.append(layers * heads * int((mask[:, lo : lo + chunk] == 0).sum()))
    if budget == "carry":  # after chunk c: ratio x every selectable pair seen so far, plus the prefix seen
        seen_kept = []
        for lo in range(chunk, seq + 1, chunk):
            total = 0
            for row in range(2):
                real = [p for p in range(lo) if mask[row, p]]
                selectable = sum(p >= int(starts[row]) for p in real)
                total += math.floor(ratio * layers * heads * selectable + 0.5) + layers * heads * (len(real) - selectable)
            seen_kept.append(total)
        kept = [seen_kept[0]] + [b - a for a, b in zip(seen_kept, seen_kept[1:])]  # sum(kept[:c]) = seen_kept[c-1]
        padding = [0] * len(padding)  # no layer stays dense (with its padding slots) after the first chunk

    cache = KVzipCache(model)
    seen = []
    hooks = [model.register_forward_pre_hook(lambda *args: seen.append(("before", held_bytes(cache)))),
             model.register_forward_hook(lambda *args: seen.append(("after", held_bytes(cache))))]
    try:
        cache.prefill(model, ids, mask, context_start=starts, chunk_size=chunk, predictor=predictor, ratio=ratio,
                      budget=budget)
    finally:
        for hook in hooks:
            hook.remove()
    chunks = seq // chunk
    assert [when for when, _ in seen] == ["before", "after"] * chunks
    full = layers * 2 * heads * seq * pair_bytes  # the dense cache of the whole prefill
    for c in range(chunks):
        # a layer that dropped nothing yet is still dense: it also holds its padding slots
        before = (sum(kept[:c]) + sum(padding[:c])) * pair_bytes
        during = before + layers * 2 * heads * chunk * pair_bytes
        assert seen[2 * c][1] <= before, (c, seen)
        assert seen[2 * c + 1][1] <= during, (c, seen)
    assert during < 0.5 * full  # the last chunk's bound: far below what a full prefill holds
    assert held_bytes(cache) == sum(kept) * pair_bytes == cache.kv_bytes()
    assert max(bytes_ for _, bytes_ in seen) > sum(kept[:-1]) * pair_bytes  # the hooks did see the chunks arrive


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
    return collect_dataset(model, ByteTokenizer(), texts, progress=False)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_training_is_deterministic_and_fits_the_exact_scores(kind):
    model, _ = make_pair("qwen3")
    samples = _samples(model)
    options = dict(steps=60, window=16, windows_per_step=8, progress=False) if kind == "mlp" else dict(progress=False)
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


def test_files_of_another_format_are_refused_with_what_to_do(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, _ = make_pair("llama")
    path = ScorePredictor.init(model, "linear").save(tmp_path / "p.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        meta, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(tensors, str(tmp_path / "newer.safetensors"), metadata={**meta, "format": "kvzip-score-predictor/2"})
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={**meta, "format": "something-else"})
    with pytest.raises(ValueError, match="format 'kvzip-score-predictor/2'.*install the kvzip-cache version"):
        ScorePredictor.load(tmp_path / "newer.safetensors")
    with pytest.raises(ValueError, match="not a kvzip-cache score predictor file"):
        ScorePredictor.load(tmp_path / "other.safetensors")
    assert ScorePredictor.load(path).kind == "linear"


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
    with pytest.raises(ValueError, match="head scores cannot rate what it kept .*re-select with the stored predicted"):
        cache.compress(model, 0.3, head_scores=torch.rand(3, 2))

"""The scorer seam: every scorer, registered or written by a user, gets real eviction through the same path.

The contract test runs every registered scorer (and a user's one-method scorer) through `compress` on a padded
batch and checks what must hold whatever the scores are: the selection's counts at the scorer's level, the layers
storing exactly the kept pairs, and the logits of a question equal to a float64 dense reference that hides exactly
the evicted pairs. A user-written layer scorer is then followed through compress, prefill with eviction and eviction
while decoding against references that rate and select on their own (`references.py`).
"""

import pytest
import torch

from conftest import ByteTokenizer, make_pair, reference_logits
from kvzip_cache import GivenScores, KVzipCache, ScorePredictor, available_scorers, register_scorer
from kvzip_cache.scorers import resolve_scorer
from kvzip_cache.scorers.registry import _FACTORIES
from kvzip_cache.selection import kept_count
from references import (compressed_keep, decode_with_eviction, evicting_prefill, full_layers, hidden_from_keep,
                        positions_of)

TOK = ByteTokenizer()


class FarFromMean:
    """A user's layer scorer, one method: keep the keys farthest from their head's mean key (padding excluded)."""

    def score_layer(self, layer_idx, keys, values, positions):
        real = (positions >= 0)[:, None, :, None].to(keys.dtype)
        mean = (keys * real).sum(dim=2, keepdim=True) / real.sum(dim=2, keepdim=True).clamp(min=1)
        return (keys - mean).norm(dim=-1)


def far_from_mean(layer, keys, values, positions):
    """The same rating, written again for the references (so a bug in one shows against the other)."""
    out = torch.empty(keys.shape[:3], dtype=torch.float64)
    for b in range(keys.shape[0]):
        real = positions[b] >= 0
        for h in range(keys.shape[1]):
            mean = keys[b, h][real].double().mean(dim=0)
            out[b, h] = (keys[b, h].double() - mean).norm(dim=-1)
    return out


def _batch(seed=4, length=30):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (2, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    question = torch.randint(3, 120, (2, 4), generator=gen)
    return ids, mask, torch.tensor([2, 5]), question


def _question_logits(model, cache, question):
    inputs = cache.inputs_for(question)
    positions = (inputs["attention_mask"].cumsum(-1) - 1)[:, -question.shape[1]:]
    with torch.no_grad():
        logits = model(input_ids=question, attention_mask=inputs["attention_mask"], position_ids=positions,
                       past_key_values=cache).logits
    cache.rollback()
    return logits


def _specs(model):
    """One spec per way of scoring: every registered name (those resolving shipped files replaced by the same
    kind of object for the tiny model), a user's object and given scores."""
    config = model.config
    generator = torch.Generator().manual_seed(1)
    return {
        "kvzip": "kvzip", "kvzip+": "kvzip+", "random": "random", "streaming": "streaming", "snapkv": "snapkv",
        "h2o": "h2o", "keydiff": "keydiff",
        "predicted": ScorePredictor.init(model, "mlp", seed=2),
        "head": torch.rand(config.num_hidden_layers, config.num_key_value_heads, generator=generator),
        "user": FarFromMean(),
    }


def test_the_contract_covers_every_registered_scorer():
    model, _ = make_pair("llama")
    assert set(available_scorers()) <= set(_specs(model))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: sliding layers are never scored nor evicted
@pytest.mark.parametrize("name", list(_specs(make_pair("llama")[0])) + ["given"])
def test_every_scorer_evicts_for_real_and_answers_as_the_masked_reference(arch, name):
    model, reference = make_pair(arch)
    ids, mask, starts, question = _batch()
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=starts)
    selectable = cache.selectable_pairs()
    spec = _specs(model)[name] if name != "given" else GivenScores(torch.rand(selectable.shape))
    report = cache.compress(model, 0.5, scorer=spec, tokenizer=TOK, chunk_size=8)
    keep, level = cache.keep_mask, cache.compressed_with[0]
    assert cache.scores.shape == selectable.shape and cache.scores.dtype == torch.float32
    assert torch.equal(~torch.isnan(cache.scores), selectable)
    assert not bool((keep & ~selectable).any()) and report.scorer == cache.score_source
    n = selectable.sum(dim=-1)  # [L, B, H] selectable positions per head
    if level == "pair":
        for row in range(2):
            assert int(keep[:, row].sum()) == kept_count(0.5, int(n[:, row].sum()))
    elif level == "pair-uniform":
        assert torch.equal(keep.sum(dim=-1), n.clone().apply_(lambda v: kept_count(0.5, v)))
    else:  # whole heads
        per_head = keep.sum(dim=-1)
        assert bool(((per_head == 0) | (per_head == n)).all())
    # the layers store exactly the kept pairs (and the protected prefix), segment by segment
    for idx in cache.compressible_layers:
        context = cache.layers[idx].context
        for row in range(2):
            prefix = [p for p in range(int(starts[row])) if mask[row, p]]
            for head in range(model.config.num_key_value_heads):
                segment = row * model.config.num_key_value_heads + head
                stored = context.positions[context.offsets[segment]:context.offsets[segment + 1]].tolist()
                kept = (keep[idx, row, head].nonzero().flatten() + cache.context_offset).tolist()
                assert stored == prefix + kept
    expected = reference_logits(reference, ids, question, context_mask=mask,
                                hidden=hidden_from_keep(keep, mask, starts, full_layers(model.config), ids.shape[1]))
    torch.testing.assert_close(_question_logits(model, cache, question).double(), expected.double(), atol=1e-4,
                               rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2-sliding", "phi3"])
def test_a_user_layer_scorer_compresses_as_an_independent_selection(arch):
    model, reference = make_pair(arch)
    ids, mask, starts, question = _batch(seed=6)
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=starts)
    cache.compress(model, 0.4, scorer=FarFromMean())
    assert cache.score_source == "FarFromMean" and cache.compressed_with == ("pair", 0.4)
    assert torch.equal(cache.keep_mask, compressed_keep(reference, far_from_mean, ids, mask, starts, 0.4))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_user_layer_scorer_evicts_while_prefilling_as_the_chunked_reference(arch):
    model, reference = make_pair(arch)
    ids, mask, starts, question = _batch(seed=7, length=29)
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=starts, chunk_size=8, scorer=FarFromMean(), ratio=0.5)
    expected_keep, expected = evicting_prefill(reference, far_from_mean, ids, mask, starts, 8, 0.5, question)
    assert cache.compressed_with == ("pair", 0.5) and cache.score_source == "FarFromMean"
    assert torch.equal(cache.keep_mask, expected_keep)
    torch.testing.assert_close(_question_logits(model, cache, question).double(), expected.double(), atol=1e-4,
                               rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_user_layer_scorer_evicts_while_decoding_as_the_step_by_step_reference(arch):
    model, reference = make_pair(arch)
    ids, mask, starts, question = _batch(seed=8, length=24)
    question_mask = torch.ones_like(question)
    question_mask[1, :1] = 0  # a left-padded question: its padding is never kept
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=starts)
    cache.compress(model, 0.5, scorer=FarFromMean())
    context_hidden = hidden_from_keep(cache.keep_mask, mask, starts, full_layers(model.config), ids.shape[1])
    cache.evict_while_decoding(model, FarFromMean(), 0.4, window=3)
    out = model.generate(**cache.inputs_for(question, question_mask), past_key_values=cache, max_new_tokens=14,
                         min_new_tokens=14, do_sample=False, output_logits=True, return_dict_in_generate=True)
    generated = out.sequences[:, ids.shape[1] + question.shape[1]:]
    expected, decisions = decode_with_eviction(reference, far_from_mean, context_hidden, ids, mask, question,
                                               question_mask, generated, 0.4, 3)
    history = cache.decode_eviction.history
    assert len(history) == len(decisions) >= 3
    for step, (start, keep) in zip(history, decisions):
        assert step.start == start and torch.equal(step.keep, keep)
    torch.testing.assert_close(torch.stack(out.logits).double(), expected.double(), atol=1e-4, rtol=0)


class FarFromMeanAllLayers(FarFromMean):
    """`FarFromMean` that also rates several layers in one call (`score_layers`), counting the calls of each."""

    def __init__(self, shape_error=False):
        self.calls = {"score_layer": 0, "score_layers": 0}
        self.shape_error = shape_error

    def score_layer(self, layer_idx, keys, values, positions):
        self.calls["score_layer"] += 1
        return super().score_layer(layer_idx, keys, values, positions)

    def score_layers(self, layer_indices, keys, values, positions):
        self.calls["score_layers"] += 1
        scores = torch.stack([super(FarFromMeanAllLayers, self).score_layer(idx, k, v, positions)
                              for idx, k, v in zip(layer_indices, keys, values)])
        return scores[:, :, :1] if self.shape_error else scores


def test_a_scorer_that_rates_all_layers_at_once_serves_short_spans(monkeypatch):
    """A layer scorer with ``score_layers`` gets every layer in one call where the span is short (eviction while
    decoding's windows) and layer by layer where it is long (a whole context: stacking would copy it); the
    decisions are the step-by-step reference's; a wrong shape from it is refused by name."""
    import kvzip_cache.scorers.base as scorer_base

    monkeypatch.setattr(scorer_base, "STACKED_PAIRS", 8)  # the 24-token context counts as long, 2 rows x 3 as short
    model, reference = make_pair("llama")
    ids, mask, starts, question = _batch(seed=8, length=24)
    question_mask = torch.ones_like(question)
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=starts)
    scorer = FarFromMeanAllLayers()
    cache.compress(model, 0.5, scorer=scorer)
    assert scorer.calls == {"score_layer": len(full_layers(model.config)), "score_layers": 0}
    context_hidden = hidden_from_keep(cache.keep_mask, mask, starts, full_layers(model.config), ids.shape[1])
    cache.evict_while_decoding(model, scorer, 0.4, window=3)
    out = model.generate(**cache.inputs_for(question, question_mask), past_key_values=cache, max_new_tokens=14,
                         min_new_tokens=14, do_sample=False)
    history = cache.decode_eviction.history
    assert scorer.calls == {"score_layer": len(full_layers(model.config)), "score_layers": len(history)}
    generated = out[:, ids.shape[1] + question.shape[1]:]
    _, decisions = decode_with_eviction(reference, far_from_mean, context_hidden, ids, mask, question, question_mask,
                                        generated, 0.4, 3)
    assert len(history) == len(decisions) >= 3
    for step, (start, keep) in zip(history, decisions):
        assert step.start == start and torch.equal(step.keep, keep)
    cache.rollback()
    cache.evict_while_decoding(model, FarFromMeanAllLayers(shape_error=True), 0.4, window=3)
    with pytest.raises(ValueError, match=r"FarFromMeanAllLayers.score_layers returned .*\[layers, batch, kv_heads"):
        model.generate(**cache.inputs_for(question, question_mask), past_key_values=cache, max_new_tokens=14,
                       min_new_tokens=14, do_sample=False)


def test_registering_a_scorer_makes_its_name_work_everywhere():
    model, _ = make_pair("llama")
    register_scorer("far-from-mean", lambda model, **options: FarFromMean())
    try:
        with pytest.raises(ValueError, match="registered already"):
            register_scorer("far-from-mean", lambda model, **options: FarFromMean())
        ids, mask, starts, _ = _batch()
        by_name, by_object = KVzipCache(model), KVzipCache(model)
        for cache, spec in ((by_name, "far-from-mean"), (by_object, FarFromMean())):
            cache.prefill(model, ids, mask, context_start=starts)
            cache.compress(model, 0.5, scorer=spec)
        assert torch.equal(by_name.keep_mask, by_object.keep_mask) and by_name.score_source == "far-from-mean"
        evicting = KVzipCache(model)
        evicting.prefill(model, ids, mask, context_start=starts, chunk_size=8, scorer="far-from-mean", ratio=0.5)
        assert evicting.score_source == "far-from-mean"
    finally:
        _FACTORIES.pop("far-from-mean")


def test_scorers_that_break_the_contract_are_refused_without_touching_the_cache():
    model, _ = make_pair("llama")
    ids, mask, starts, _ = _batch()
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=starts)
    bytes_before = cache.kv_bytes()

    class WrongShape:
        def score_layer(self, layer_idx, keys, values, positions):
            return keys.norm(dim=-1)[:, :1]

    class WrongContext:
        def score_context(self, model, context):
            return torch.zeros(3)

    with pytest.raises(ValueError, match=r"WrongShape.score_layer returned \(2, 1, 28\).*\[2, 2, 28\]"):
        cache.compress(model, 0.5, scorer=WrongShape())
    with pytest.raises(ValueError, match=r"WrongContext.score_context returned \(3,\)"):
        cache.compress(model, 0.5, scorer=WrongContext())
    with pytest.raises(TypeError, match="needs a layer scorer"):
        KVzipCache(model).prefill(model, ids, mask, context_start=starts, scorer="snapkv", ratio=0.5)
    with pytest.raises(ValueError, match="no score predictor ships for this model"):
        resolve_scorer("predicted", model)
    assert cache.kv_bytes() == bytes_before and cache.scores is None and not cache.is_compressed
    cache.compress(model, 0.5, scorer=FarFromMean())  # still usable
    assert cache.is_compressed


def test_positions_mark_padding_for_layer_scorers():
    seen = {}

    class Recorder(FarFromMean):
        def score_layer(self, layer_idx, keys, values, positions):
            seen[layer_idx] = positions.clone()
            return super().score_layer(layer_idx, keys, values, positions)

    model, _ = make_pair("llama")
    ids, mask, starts, _ = _batch()
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=starts)
    cache.compress(model, 0.5, scorer=Recorder())
    expected = positions_of(mask)[:, 2:]  # from the first context column on
    assert all(torch.equal(p, expected) for p in seen.values()) and int(expected[1, 0]) == -1


def test_the_scoring_record_holds_no_reference_to_the_cached_pairs():
    """A reconstruction pass reallocates each layer's keys with room for its tokens; a `PrefilledContext` that held
    the old buffers kept a second copy of the whole KV alive through compress (21.0 against 18.9 GB peak, H100)."""
    import gc
    import weakref

    model, _ = make_pair("llama")
    cache = KVzipCache(model)
    cache.prefill(model, torch.randint(3, 128, (1, 40)), context_start=4, chunk_size=16)
    context = cache.prefilled_context()
    idx = cache.compressible_layers[0]
    before = [weakref.ref(cache.layers[i].keys) for i in cache.compressible_layers]
    cache.reserve_scoring_room(8)
    gc.collect()
    assert all(ref() is None for ref in before)  # the old buffers are gone: nothing but the layers held them
    keys, values = context.dense_pairs()[idx]  # read now, from the reallocated buffers
    assert keys.shape[-2] == 40 - context.offset
    assert keys.data_ptr() == cache.layers[idx].keys[:, :, context.offset :].data_ptr()
    cache.release_scoring_room()

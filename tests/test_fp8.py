"""fp8 kept pairs (`compress(..., kv_dtype="fp8")`): the store, the cache's answers against a float64 reference that
rounds the kept pairs to fp8 itself (`references.fp8_round`), save/load, rollback, re-selection, eviction while
decoding, static decoding, and the refusals (eviction while prefilling in fp8: test_predictor.py). CPU, reference backend; the kernels' fp8 path is tested
against its PyTorch twin in test_kernels.py."""

from __future__ import annotations

import pytest
import torch

from cache_state import assert_same_state, cache_state
from conftest import ByteTokenizer, make_pair, reference_logits
from kvzip_cache import KVzipCache, ScorePredictor
from kvzip_cache.storage import CompressedContext, dequantize_fp8, quantize_fp8
from references import fp8_round
from test_cache_behaviour import _forward, _hidden

TOK = ByteTokenizer()
FP8 = torch.float8_e4m3fn


def _ids(n, seed, batch=1):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def _prefilled(model, n=40, seed=0, prefix=4):
    context = _ids(n, seed)
    cache = KVzipCache(model)
    cache.prefill(model, context, context_start=prefix)
    return cache, context


def _stores(cache):
    return {idx: cache.layers[idx].context for idx in cache.compressible_layers}


# ----------------------------------------------------------------------------------------------------- the store
def test_quantized_rows_are_within_fp8_rounding_of_the_originals():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(300, 48, generator=gen) * torch.logspace(-6, 3, 300)[:, None]
    rows[7] = 0.0  # an all-zero row: a finite scale, zeros back
    pairs, scales = quantize_fp8(rows)
    assert pairs.dtype == FP8 and scales.dtype == torch.float32 and scales.shape == (300,)
    back = dequantize_fp8(pairs, scales, torch.float32)
    assert torch.equal(back[7], rows[7]) and torch.isfinite(scales).all()
    amax = rows.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(back.abs().amax(-1, keepdim=True), amax, atol=0, rtol=1e-6)  # 448 x scale: exact
    # e4m3: 3 mantissa bits (relative error <= 2^-4 for normals), subnormals spaced 2^-9 x scale
    bound = torch.maximum(rows.abs() * 2.0**-4, scales[:, None] * 2.0**-10)
    assert ((back - rows).abs() <= bound * 1.0001).all()
    assert ((back - rows).abs() > 0).any()  # it is a rounding, not a copy


def _store(gen, lengths=(5, 0, 9, 3), head_dim=16, num_heads=2):
    counts = torch.tensor(lengths)
    total = int(counts.sum())
    positions = torch.cat([torch.sort(torch.randperm(30, generator=gen)[:n]).values for n in lengths]).int()
    return CompressedContext.from_counts(torch.randn(total, head_dim, generator=gen),
                                         torch.randn(total, head_dim, generator=gen), positions, counts, num_heads)


def test_every_store_operation_equals_quantizing_its_result():
    """keep, append, drop_after and to() on an fp8 store give bit for bit the store that quantizing the same
    operation's bf16/fp32 result gives: a pair carries its scale, nothing is re-quantized."""
    gen = torch.Generator().manual_seed(1)
    plain = _store(gen)
    fp8 = plain.to_fp8()
    assert fp8.is_fp8 and fp8.dtype == torch.float32 and fp8.to_fp8() is fp8
    assert fp8.kv_bytes() == plain.keys.numel() * 2 + 8 * plain.keys.shape[0]  # 1 byte per element + 2 float32 scales

    def same(a, b):
        assert a.is_fp8 and b.is_fp8 and a.offsets == b.offsets and torch.equal(a.positions, b.positions)
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))
        assert torch.equal(a.key_scales, b.key_scales) and torch.equal(a.value_scales, b.value_scales)
        assert a.dtype == b.dtype

    keep = torch.rand(2, 2, 30, generator=gen) < 0.5
    same(fp8.keep(keep), plain.keep(keep).to_fp8())
    new_keys, new_values = torch.randn(2, 2, 4, 16, generator=gen), torch.randn(2, 2, 4, 16, generator=gen)
    new_keep = torch.rand(2, 2, 4, generator=gen) < 0.6
    same(fp8.append(new_keys, new_values, new_keep, 30), plain.append(new_keys, new_values, new_keep, 30).to_fp8())
    same(fp8.drop_after(12), plain.drop_after(12).to_fp8())
    same(fp8.to("cpu"), fp8)
    keys, values = fp8.read(slice(2, 9), torch.float64)
    assert keys.dtype == torch.float64
    torch.testing.assert_close(keys.float(), fp8_round(plain.keys[2:9]), atol=0, rtol=0)
    torch.testing.assert_close(values.float(), fp8_round(plain.values[2:9]), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ the cache's answers
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fp8_compress_answers_as_a_dense_reference_holding_fp8_rounded_pairs(arch):
    """Same keep mask and scores as bf16/fp32 storage (selection happens before quantizing); the question's logits
    equal the float64 reference whose kept context pairs are rounded to fp8 and whose evicted pairs are hidden, and
    differ from the unrounded reference (so the test sees the rounding); about half the bytes at fp32 -> a quarter."""
    model, reference = make_pair(arch)
    plain, context = _prefilled(model)
    fp8, _ = _prefilled(model)
    plain.compress(model, 0.4, tokenizer=TOK, chunk_size=16)
    report = fp8.compress(model, 0.4, tokenizer=TOK, chunk_size=16, kv_dtype="fp8")
    assert torch.equal(fp8.keep_mask, plain.keep_mask)
    torch.testing.assert_close(fp8.scores, plain.scores, atol=0, rtol=0, equal_nan=True)  # NaN: sliding layers
    assert fp8.kv_dtype == FP8 and all(store.is_fp8 for store in _stores(fp8).values())
    pairs = sum(store.keys.shape[0] for store in _stores(fp8).values())
    head_dim = next(iter(_stores(fp8).values())).keys.shape[-1]
    saved = plain.kv_bytes() - fp8.kv_bytes()
    assert report.bytes_after == fp8.kv_bytes() and saved == pairs * (2 * head_dim * 3 - 8)  # fp32 -> fp8 + scales
    question = _ids(6, 5)
    got = _forward(model, fp8, question)
    expected = reference_logits(reference, context, question, hidden=_hidden(fp8, 40), fp8=True)
    unrounded = reference_logits(reference, context, question, hidden=_hidden(fp8, 40))
    torch.testing.assert_close(got.double(), expected.double(), atol=1e-4, rtol=0)
    assert (unrounded.double() - got.double()).abs().max() > 1e-3


def test_fp8_rollback_recompress_and_generate():
    """Greedy tokens after rollback equal the first answer; a second compress at a smaller ratio keeps fp8 and equals
    compressing straight to that ratio; pairs stay fp8 without kv_dtype; the tail stays in the model's dtype."""
    model, reference = make_pair("llama")
    cache, context = _prefilled(model)
    cache.compress(model, 0.5, tokenizer=TOK, chunk_size=16, kv_dtype="fp8")
    question = _ids(5, 9)
    first = model.generate(**cache.inputs_for(question), past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert cache.layers[cache.compressible_layers[0]].tail_keys.dtype == torch.float32
    cache.rollback()
    again = model.generate(**cache.inputs_for(question), past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert torch.equal(first, again)
    cache.rollback()
    cache.compress(model, 0.3, tokenizer=TOK)  # kv_dtype left out: the store stays fp8
    direct, _ = _prefilled(model)
    direct.compress(model, 0.3, tokenizer=TOK, chunk_size=16, kv_dtype="fp8")
    assert torch.equal(cache.keep_mask, direct.keep_mask)
    for a, b in zip(_stores(cache).values(), _stores(direct).values()):
        assert a.is_fp8 and torch.equal(a.keys.view(torch.uint8), b.keys.view(torch.uint8))
        assert torch.equal(a.value_scales, b.value_scales)
    # a bf16/fp32 cache compressed again with kv_dtype="fp8" quantizes what it keeps
    later, _ = _prefilled(model)
    later.compress(model, 0.5, tokenizer=TOK, chunk_size=16)
    later.compress(model, 0.3, tokenizer=TOK, kv_dtype="fp8")
    for a, b in zip(_stores(later).values(), _stores(direct).values()):
        assert torch.equal(a.keys.view(torch.uint8), b.keys.view(torch.uint8))
    tokens = model.generate(**direct.inputs_for(question), past_key_values=direct, max_new_tokens=6, do_sample=False)
    assert tokens.shape[1] == context.shape[1] + question.shape[1] + 6


def test_fp8_save_load(tmp_path):
    """An fp8 cache saves as format 2 with its scales and loads bit for bit (in the model's dtype for reading); a
    plain file stays format 1 and loads as fp8 on request, equal to compressing with fp8."""
    from safetensors import safe_open

    model, _ = make_pair("gemma3")
    cache, _ = _prefilled(model)
    cache.compress(model, 0.4, tokenizer=TOK, chunk_size=16, kv_dtype="fp8")
    cache.save(tmp_path / "fp8.kvzip")
    with safe_open(str(tmp_path / "fp8.kvzip"), "pt") as handle:
        meta = handle.metadata()
        assert meta["format_version"] == "2" and meta["kv_dtype"] == "float8_e4m3fn" and meta["dtype"] == "float32"
        assert any(name.endswith(".key_scales") for name in handle.keys())
    loaded = KVzipCache.load(tmp_path / "fp8.kvzip", model)
    assert loaded.kv_dtype == FP8 and loaded.kv_bytes() == cache.kv_bytes()
    assert_same_state(cache_state(loaded), cache_state(cache), ignore=("owner",))
    question = _ids(5, 3)
    torch.testing.assert_close(_forward(model, loaded, question), _forward(model, cache, question), atol=0, rtol=0)

    plain, _ = _prefilled(model)
    plain.compress(model, 0.4, tokenizer=TOK, chunk_size=16)
    plain.save(tmp_path / "plain.kvzip")
    with safe_open(str(tmp_path / "plain.kvzip"), "pt") as handle:
        assert handle.metadata()["format_version"] == "1" and "kv_dtype" not in handle.metadata()
    as_fp8 = KVzipCache.load(tmp_path / "plain.kvzip", model, kv_dtype="fp8")
    cache.rollback()
    assert as_fp8.kv_bytes() == cache.kv_bytes()
    for a, b in zip(_stores(as_fp8).values(), _stores(cache).values()):
        assert torch.equal(a.keys.view(torch.uint8), b.keys.view(torch.uint8))
        assert torch.equal(a.key_scales, b.key_scales) and torch.equal(a.value_scales, b.value_scales)


def test_fp8_static_decoding_equals_dynamic():
    """make_static on an fp8 cache (no compile on the CPU): the static layout reads the same pairs and scales, so
    the greedy tokens equal the dynamic cache's."""
    model, _ = make_pair("llama")
    caches = []
    for static in (False, True):
        cache, _ = _prefilled(model)
        cache.compress(model, 0.4, tokenizer=TOK, chunk_size=16, kv_dtype="fp8")
        if static:
            cache.make_static(16)
            layer = cache.layers[cache.compressible_layers[0]]
            assert layer.context.is_fp8 and layer.tail_keys.dtype == torch.float32
        caches.append(cache)
    question = _ids(5, 4)
    answers = [model.generate(**cache.inputs_for(question), past_key_values=cache, max_new_tokens=8, do_sample=False)
               for cache in caches]
    assert torch.equal(answers[0], answers[1])


def test_decode_eviction_quantizes_what_joins_the_store():
    """Eviction while decoding on an fp8 cache: the answer's pairs that join the store are fp8 (each the rounding
    of the pair the tail held), the store's bytes are what its pair count says, and rollback restores the context."""
    model, _ = make_pair("llama")
    cache, context = _prefilled(model)
    cache.compress(model, 0.5, tokenizer=TOK, chunk_size=16, kv_dtype="fp8")
    before = {idx: store.keys.shape[0] for idx, store in _stores(cache).items()}
    bytes_before = cache.kv_bytes()
    cache.evict_while_decoding(model, ScorePredictor.init(model, "mlp", seed=1), ratio=0.5, window=8)
    model.generate(**cache.inputs_for(_ids(4, 6)), past_key_values=cache, max_new_tokens=24, do_sample=False)
    for idx, store in _stores(cache).items():
        assert store.is_fp8 and store.keys.shape[0] > before[idx]  # answer pairs joined, as fp8
        assert store.kv_bytes() == store.keys.shape[0] * (2 * store.keys.shape[1] + 8)
        assert int(store.positions.max()) >= context.shape[1]
    cache.evict_while_decoding(None)
    cache.rollback()
    assert cache.kv_bytes() == bytes_before and all(s.is_fp8 for s in _stores(cache).values())


# ------------------------------------------------------------------------------------------------------ refusals
def test_fp8_refusals_say_what_to_do_and_change_nothing(monkeypatch):
    from kvzip_cache import storage

    model, _ = make_pair("llama")
    cache, context = _prefilled(model)
    before = cache_state(cache)
    with pytest.raises(ValueError, match="not a storage type of kept pairs.*'fp8'"):
        cache.compress(model, 0.4, tokenizer=TOK, kv_dtype=torch.int8)
    with pytest.raises(ValueError, match="not a storage type"):
        cache.compress(model, 0.4, tokenizer=TOK, kv_dtype="int4")
    monkeypatch.setattr(storage, "FP8", None)  # a torch without float8 types
    with pytest.raises(RuntimeError, match="needs a torch with float8 types.*upgrade torch"):
        cache.compress(model, 0.4, tokenizer=TOK, kv_dtype="fp8")
    monkeypatch.undo()
    assert_same_state(cache_state(cache), before)
    with pytest.raises(ValueError, match="pass scorer= and ratio= too"):
        KVzipCache(model).prefill(model, context, kv_dtype="fp8")
    # a CUDA GPU older than Ada/Hopper under the Triton backend (the kernels' fp8 conversion needs sm_89)
    from kvzip_cache.checks import check_kv_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    if "triton" in __import__("kvzip_cache.backends", fromlist=["available_backends"]).available_backends():
        with pytest.raises(RuntimeError, match=r"compute capability 8.9.*use_backend\('reference'\)"):
            check_kv_dtype("fp8", torch.device("cuda", 0), "compress()")
    from kvzip_cache.backends import use_backend

    with use_backend("reference"):  # the reference backend dequantizes in PyTorch on any GPU
        assert check_kv_dtype("fp8", torch.device("cuda", 0), "compress()") == torch.float8_e4m3fn

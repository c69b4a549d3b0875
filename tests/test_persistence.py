"""Saved compressed caches (`KVzipCache.save` / `KVzipCache.load`): a cache loaded in a new process answers exactly as
the saved one (fp32 logits and tokens; Llama, Gemma3 with sliding layers, a left-padded batch), supports rollback, a
second compress and make_static; broken, foreign and newer files are refused without touching anything; writes are
atomic; the file is the kept pairs plus bookkeeping."""

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import ByteTokenizer, make_pair
from kvzip_cache import KVzipCache

TOK = ByteTokenizer()
TESTS = Path(__file__).resolve().parent


def _ids(n, seed, batch=1):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def _compressed(model, context, ratio=0.4, **prefill):
    cache = KVzipCache(model)
    cache.prefill(model, context, context_start=prefill.pop("context_start", 4), chunk_size=16, **prefill)
    cache.compress(model, ratio, tokenizer=TOK, chunk_size=16)
    return cache


def _answer(model, cache, ids, mask=None):
    out = model.generate(**cache.inputs_for(ids, mask), past_key_values=cache, max_new_tokens=6, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    cache.rollback()
    return out.sequences, torch.stack(out.logits, 1)


CASES = {  # name: (arch, context ids, attention mask, context_start, question ids, question mask)
    "llama": ("llama", _ids(48, 1), None, 4, _ids(5, 2), None),
    "gemma3": ("gemma3", _ids(48, 3), None, 4, _ids(5, 4), None),
}
_batch, _mask = _ids(40, 5, batch=2), torch.ones(2, 40, dtype=torch.long)
_batch[1, :9], _mask[1, :9] = 0, 0
_questions, _question_mask = _ids(6, 6, batch=2), torch.ones(2, 6, dtype=torch.long)
_question_mask[0, :2] = 0
CASES["padded-batch"] = ("llama", _batch, _mask, torch.tensor([4, 13]), _questions, _question_mask)

LOADER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import make_pair
    from test_persistence import CASES, _answer
    from kvzip_cache import KVzipCache
    results = {{}}
    for name, (arch, _, _, _, question, question_mask) in CASES.items():
        model, _ = make_pair(arch)  # the same seeded weights as in the test process
        cache = KVzipCache.load({folder!r} + "/" + name + ".kvzip", model)
        results[name] = _answer(model, cache, question, question_mask)
    torch.save(results, {folder!r} + "/answers.pt")
""")


def test_a_cache_loaded_in_a_new_process_answers_as_the_saved_one(tmp_path):
    expected = {}
    for name, (arch, context, mask, start, question, question_mask) in CASES.items():
        model, _ = make_pair(arch)
        cache = _compressed(model, context, attention_mask=mask, context_start=start)
        cache.save(tmp_path / f"{name}.kvzip")
        expected[name] = _answer(model, cache, question, question_mask)
    script = LOADER.format(tests=str(TESTS), folder=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = torch.load(tmp_path / "answers.pt")
    for name, (tokens, logits) in expected.items():
        assert torch.equal(loaded[name][0], tokens), name
        torch.testing.assert_close(loaded[name][1], logits, atol=0, rtol=0)  # bit for bit: the same pairs, same math


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_loaded_cache_rolls_back_recompresses_and_goes_static_like_the_saved_one(tmp_path, arch):
    model, _ = make_pair(arch)
    original = _compressed(model, _ids(48, 7))
    original.save(tmp_path / "c.kvzip")
    loaded = KVzipCache.load(tmp_path / "c.kvzip", model)
    assert loaded.kv_bytes() == original.kv_bytes() and loaded.metadata_bytes() == original.metadata_bytes()
    assert torch.equal(loaded.keep_mask, original.keep_mask) and loaded.compressed_with == original.compressed_with
    question = _ids(5, 8)
    for cache in (original, loaded):  # multi-turn: a second turn without rollback, then rollback
        model.generate(**cache.inputs_for(question), past_key_values=cache, max_new_tokens=3, do_sample=False)
    turn = [_answer(model, cache, _ids(2, 9).expand(1, -1)) for cache in (original, loaded)]
    assert torch.equal(turn[0][0][:, -6:], turn[1][0][:, -6:])
    for cache in (original, loaded):
        cache.compress(model, 0.2, tokenizer=TOK)  # re-selection from the saved scores
    assert torch.equal(loaded.keep_mask, original.keep_mask)
    for cache in (original, loaded):
        cache.make_static(16)
    assert torch.equal(_answer(model, loaded, question)[0], _answer(model, original, question)[0])


def _stored(cache) -> dict:
    """Every compressed layer's store (keys, values, positions, offsets) and every sliding layer's window."""
    stored = {}
    for idx, layer in enumerate(cache.layers):
        if getattr(layer, "context", None) is not None:
            ctx = layer.context
            stored[idx] = (ctx.keys, ctx.values, ctx.positions, ctx.offsets)
        else:
            stored[idx] = (layer.keys, layer.values)
    return stored


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_load_onto_another_dtype_and_device(tmp_path, arch):
    """Loaded in bfloat16 (onto the CPU, named explicitly): every stored tensor is the saved one rounded to bfloat16,
    pair for pair, and a bfloat16 copy of the model answers with the float32 tokens, its logits within a bound that
    the evicted pairs' effect is shown to exceed."""
    model, _ = make_pair(arch)
    context, question = _ids(40, 10), _ids(5, 8)
    cache = _compressed(model, context)
    cache.save(tmp_path / "c.kvzip")
    half_model = copy.deepcopy(model).to(torch.bfloat16)
    half = KVzipCache.load(tmp_path / "c.kvzip", half_model, device="cpu", dtype=torch.bfloat16)
    saved, loaded = _stored(cache), _stored(half)
    assert saved.keys() == loaded.keys()
    for idx, tensors in saved.items():
        for name, want, got in zip(("keys", "values", "positions", "offsets"), tensors, loaded[idx]):
            if isinstance(want, torch.Tensor) and want.is_floating_point():
                assert got.dtype == torch.bfloat16 and got.device.type == "cpu", (idx, name)
                assert torch.equal(got, want.to(torch.bfloat16)), (idx, name)
            elif isinstance(want, torch.Tensor):
                assert torch.equal(got, want), (idx, name)
            else:
                assert got == want, (idx, name)
    assert half.kv_bytes() == cache.kv_bytes() // 2
    assert torch.equal(half.keep_mask, cache.keep_mask) and half.compressed_with == cache.compressed_with

    tokens, logits = _answer(model, cache, question)
    half_tokens, half_logits = _answer(half_model, half, question)
    assert torch.equal(half_tokens, tokens)
    error = (half_logits.float() - logits).abs()
    dense = KVzipCache(model)  # nothing evicted: what a load that lost the selection would answer, at best
    dense.prefill(model, context, context_start=4, chunk_size=16)
    dense_logits = _answer(model, dense, question)[1][:, :1]  # the first step: the same prompt as the others
    evicted = (dense_logits - logits[:, :1]).abs()
    assert error.mean() < 0.005 < evicted.mean() and error.max() < 0.02 < evicted.max()


def test_the_file_is_the_kept_pairs_plus_bookkeeping(tmp_path):
    model, _ = make_pair("llama")
    context = _ids(600, 11)
    sizes = {}
    for ratio in (1.0, 0.3):
        cache = _compressed(model, context, ratio=ratio)
        path = cache.save(tmp_path / f"r{ratio}.kvzip", scores=False)
        with safe_open(str(path), framework="pt") as handle:
            tensor_bytes = sum(handle.get_tensor(name).nbytes for name in handle.keys())
        header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
        assert path.stat().st_size == header + tensor_bytes  # nothing but the tensors and the header
        bookkeeping = cache.input_ids.nbytes + cache.attention_mask.nbytes + cache.context_start.nbytes
        bookkeeping += cache.keep_mask.nbytes
        assert tensor_bytes == cache.kv_bytes() + cache.metadata_bytes() + bookkeeping
        sizes[ratio] = path.stat().st_size
    assert 0.25 < sizes[0.3] / sizes[1.0] < 0.36  # ~0.3 (plus the fixed ids, masks and header)


def _saved(tmp_path, arch="llama"):
    model, _ = make_pair(arch)
    cache = _compressed(model, _ids(40, 12))
    return model, cache.save(tmp_path / "c.kvzip")


def _rewrite(path, out, change):
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = dict(handle.metadata())
    change(tensors, metadata)
    save_file(tensors, str(out), metadata=metadata)
    return out


def test_foreign_newer_broken_and_missing_files_are_refused(tmp_path):
    model, path = _saved(tmp_path)
    other, _ = make_pair("qwen3")
    with pytest.raises(ValueError, match="saved from another model.*model_type 'llama' vs 'qwen3'"):
        KVzipCache.load(path, other)
    newer = _rewrite(path, tmp_path / "newer.kvzip", lambda t, m: m.update(format_version="99"))
    with pytest.raises(ValueError, match="format 99.*upgrade kvzip-cache"):
        KVzipCache.load(newer, model)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, str(plain))
    with pytest.raises(ValueError, match="not a saved KVzipCache"):
        KVzipCache.load(plain, model)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.kvzip"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable kvzip cache file"):
        KVzipCache.load(truncated, model)
    corrupted = tmp_path / "corrupted.kvzip"
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # a data byte: the header still parses
    corrupted.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupted"):
        KVzipCache.load(corrupted, model)
    garbage = tmp_path / "garbage.kvzip"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a readable kvzip cache file"):
        KVzipCache.load(garbage, model)
    with pytest.raises(FileNotFoundError):
        KVzipCache.load(tmp_path / "missing.kvzip", model)
    # reading a refused file changes nothing of the cache it was read for
    from kvzip_cache.persistence import read_cache

    cache = KVzipCache(model)
    with pytest.raises(ValueError):
        read_cache(corrupted, cache, model)
    assert cache.input_ids is None and cache.get_seq_length() == 0


def test_save_is_refused_until_it_can_be_faithful(tmp_path):
    model, _ = make_pair("llama")
    cache = KVzipCache(model)
    with pytest.raises(RuntimeError, match="compressed cache"):
        cache.save(tmp_path / "c.kvzip")
    cache.prefill(model, _ids(40, 13), context_start=4, chunk_size=16)
    with pytest.raises(RuntimeError, match="compressed cache"):
        cache.save(tmp_path / "c.kvzip")
    cache.compress(model, 0.5, tokenizer=TOK, chunk_size=16)
    model(input_ids=_ids(3, 14), past_key_values=cache)  # a question in the tail
    with pytest.raises(RuntimeError, match="rollback"):
        cache.save(tmp_path / "c.kvzip")
    cache.rollback()
    cache.inputs_for(_ids(3, 15, batch=2), shared=True)
    with pytest.raises(RuntimeError, match="repeated"):
        cache.save(tmp_path / "c.kvzip")
    assert not (tmp_path / "c.kvzip").exists()


def test_an_interrupted_save_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    model, path = _saved(tmp_path)
    before = path.read_bytes()
    cache = _compressed(model, _ids(44, 16), ratio=0.3)

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    import kvzip_cache.persistence as persistence

    monkeypatch.setattr(persistence, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.kvzip"]
    assert json.loads(safe_open(str(path), framework="pt").metadata()["ratio"]) == 0.4

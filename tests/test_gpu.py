"""The CUDA (Triton) backend end to end, against the reference backend and DynamicCache. Run with -m gpu."""

import pytest
import torch
from transformers import DynamicCache

from conftest import ByteTokenizer, make_pair
from kvzip_cache import KVzipCache
from kvzip_cache.backends import select_backend, use_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
TOK = ByteTokenizer()


def _on_gpu(arch, dtype):
    model, reference = make_pair(arch)
    return model.to("cuda", dtype), reference.to("cuda", dtype)


def _ids(n, seed, batch=1):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed)).cuda()


def test_triton_backend_is_selected_on_cuda():
    assert select_backend(torch.device("cuda")).name == "triton"


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_matches_reference_backend(arch, dtype):
    model, _ = _on_gpu(arch, dtype)
    context, question = _ids(300, 1), _ids(9, 2)

    def run():
        cache = KVzipCache(model)
        cache.prefill(model, context, context_start=7, chunk_size=128)
        cache.compress(model, 0.3, tokenizer=TOK, chunk_size=100)
        n = cache.get_seq_length()
        with torch.no_grad():
            logits = model(question, past_key_values=cache, position_ids=torch.arange(n, n + 9, device="cuda")[None])
        return cache, logits.logits.float()

    cache, fast = run()
    with use_backend("reference"):
        ref_cache, slow = run()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(cache.scores, ref_cache.scores, atol=tol, rtol=tol, equal_nan=True)
    if dtype == torch.float32:
        assert torch.equal(cache.keep_mask, ref_cache.keep_mask)
        torch.testing.assert_close(fast, slow, atol=1e-3, rtol=0)
    else:  # bf16 score ties can flip a few selections; the logits must still agree closely
        assert (cache.keep_mask != ref_cache.keep_mask).float().mean() < 0.02
        assert (fast - slow).abs().mean() < 5e-2


def test_greedy_generation_matches_dynamic_cache_on_cuda():
    model, reference = _on_gpu("llama", torch.float32)
    reference.set_attn_implementation("sdpa")
    context, question = _ids(200, 3), _ids(8, 4)
    full = torch.cat([context, question], 1)
    cache = KVzipCache(model)
    cache.prefill(model, context, context_start=4)
    cache.compress(model, 1.0, tokenizer=TOK)
    out = model.generate(full, past_key_values=cache, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    expected = reference.generate(full, past_key_values=DynamicCache(config=reference.config), max_new_tokens=12,
                                  min_new_tokens=12, do_sample=False)
    assert torch.equal(out, expected)


def test_left_padded_batch_on_cuda_matches_reference_backend():
    model, _ = _on_gpu("gemma3", torch.float32)
    ids, mask = _ids(120, 5, batch=3), torch.ones(3, 120, dtype=torch.long, device="cuda")
    mask[1, :30], mask[2, :71] = 0, 0
    starts = torch.tensor([3, 33, 74], device="cuda")

    def run():
        cache = KVzipCache(model)
        cache.prefill(model, ids, mask, context_start=starts)
        cache.compress(model, 0.4, tokenizer=TOK, chunk_size=32)
        inputs = cache.inputs_for(_ids(6, 6))
        return model.generate(**inputs, past_key_values=cache, max_new_tokens=10, do_sample=False)

    fast = run()
    with use_backend("reference"):
        slow = run()
    assert torch.equal(fast, slow)


def test_head_dropping_prefill_with_long_chunks_matches_the_cpu():
    """Chunks above LARGE_QUERY take the per-segment SDPA path on CUDA; the question then takes the kernels."""
    model, _ = make_pair("llama")
    context, question = _ids(1500, 3).cpu(), _ids(9, 4).cpu()
    head_scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])

    def run(device):
        cache = KVzipCache(model)
        cache.prefill(model, context.to(device), context_start=7, chunk_size=600, head_scores=head_scores,
                      ratio=0.5)
        n = cache.get_seq_length()
        with torch.no_grad():
            out = model(question.to(device), past_key_values=cache,
                        position_ids=torch.arange(n, n + 9, device=device)[None])
        return out.logits.float().cpu()

    on_cpu = run("cpu")
    model.to("cuda")
    try:
        torch.testing.assert_close(run("cuda"), on_cpu, atol=1e-3, rtol=0)
    finally:
        model.to("cpu")

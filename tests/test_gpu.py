"""The CUDA (Triton) backend end to end, against the reference backend and DynamicCache. Run with -m gpu."""

import contextlib
import copy
import logging

import pytest
import torch
from transformers import DynamicCache, Phi3Config, Phi3ForCausalLM

import conftest
from conftest import ByteTokenizer, make_pair
from kvzip_cache import KVzipCache
from kvzip_cache.backends import select_backend, triton_backend, use_backend

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


def _compress_and_ask(model, context, question, keep=None):
    """Prefill ``context``; compress at 0.3 (``keep`` None), evict exactly ``keep``, or (``keep`` False) nothing;
    return the cache and the float32 logits of ``question``."""
    cache = KVzipCache(model)
    cache.prefill(model, context, context_start=7, chunk_size=128)
    if keep is None:
        cache.compress(model, 0.3, tokenizer=TOK, chunk_size=100)
    elif keep is not False:
        cache.evict(keep)
    n = cache.get_seq_length()
    with torch.no_grad():
        logits = model(question, past_key_values=cache,
                       position_ids=torch.arange(n, n + question.shape[1], device="cuda")[None]).logits
    return cache, logits.float()


def _assert_bf16_matches_float32(model, ask, cache, logits, bounds):
    """A bfloat16 run (Triton) against float32 math: the same bf16-rounded weights upcast, the reference backend.

    ``ask(model, keep)`` is `_compress_and_ask` for the test's inputs; ``cache``, ``logits`` the bf16 run's.
    ``bounds``: ``(scores, logits_mean, logits_max)``. The scores (all below ~0.1: an absolute bound would pass
    zeros) are compared by relative L2 error; the logits with the bf16 run's own keep mask applied in float32, so
    that only the arithmetic differs. Guards: scores given to the other KV head, no eviction at all, and the keep mask
    with its KV heads swapped all land outside the bounds, which therefore lie below what eviction changes.
    """
    score_bound, mean_bound, max_bound = bounds
    full = copy.deepcopy(model).float()
    with use_backend("reference"):  # float32 math, no Triton: independent of the kernels under test
        ref_cache, _ = ask(full, None)
        _, same_mask = ask(full, cache.keep_mask)
        _, dense = ask(full, False)
        _, swapped = ask(full, cache.keep_mask.flip(2))
    valid = ~torch.isnan(ref_cache.scores)
    assert torch.equal(valid, ~torch.isnan(cache.scores))
    want = ref_cache.scores[valid].double()
    relative = lambda got: float((got - want).norm() / want.norm())  # noqa: E731
    error = relative(cache.scores[valid].double())
    assert error < score_bound, error
    swapped_heads = relative(ref_cache.scores.flip(2)[valid].double())
    assert swapped_heads > score_bound, swapped_heads  # scores of the wrong head fail
    flipped = (cache.keep_mask != ref_cache.keep_mask).float().mean()
    assert flipped < 0.03, flipped  # bf16 near-ties flip a few pairs
    error = (logits - same_mask).abs()
    assert error.mean() < mean_bound and error.max() < max_bound, (error.mean(), error.max())
    for wrong in (dense, swapped):
        effect = (wrong - same_mask).abs()
        assert effect.mean() > mean_bound and effect.max() > max_bound, (effect.mean(), effect.max())


@pytest.mark.parametrize("arch,backend", [("llama", "triton"), ("gemma3", "triton"), ("qwen2", "triton"),
                                          ("llama", "triton-two-launch"), ("gemma3", "triton-two-launch")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_matches_reference_backend(arch, backend, dtype):
    """float32: Triton gives the reference backend's scores, selection and logits. bfloat16: Triton's run agrees
    with float32 math within bounds below eviction's effect (measured on the CPU's bf16 reference backend: score
    error <= 0.009 relative, logits 0.0012 mean / 0.005 max, against eviction's 0.03 / 0.12). Both decode paths:
    the default ("triton": the split tail for rows of their own) and the two-launch kernels."""
    model, _ = _on_gpu(arch, dtype)
    context, question = _ids(300, 1), _ids(9, 2)

    def ask(m, keep=None):
        return _compress_and_ask(m, context, question, keep)

    with use_backend(backend):  # the run under test; the references below name the reference backend themselves
        cache, fast = ask(model)
    if dtype == torch.float32:
        with use_backend("reference"):
            ref_cache, slow = ask(model)
        torch.testing.assert_close(cache.scores, ref_cache.scores, atol=1e-4, rtol=1e-4, equal_nan=True)
        assert torch.equal(cache.keep_mask, ref_cache.keep_mask)
        torch.testing.assert_close(fast, slow, atol=1e-3, rtol=0)
    else:
        _assert_bf16_matches_float32(model, ask, cache, fast, bounds=(0.05, 0.006, 0.03))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("chunk", [100, 700])  # pass queries through the ragged kernels / through SDPA per segment
def test_rescoring_a_compressed_cache_on_cuda_matches_the_reference_backend(arch, chunk):
    """KVzip scores of a compressed cache's kept pairs (the passes read the ragged store through this backend's
    ragged attention): the Triton backend gives the reference backend's scores, selection and logits (float32)."""
    model, _ = _on_gpu(arch, torch.float32)
    context, question = _ids(900, 3), _ids(9, 4)

    def ask():
        cache = KVzipCache(model)
        cache.prefill(model, context, context_start=7, chunk_size=256)
        kept = torch.rand(cache.selectable_pairs().shape, generator=torch.Generator().manual_seed(5)) < 0.6
        cache.evict(kept.cuda())
        cache.compress(model, 0.3, scorer="kvzip", tokenizer=TOK, chunk_size=chunk)
        n = cache.get_seq_length()
        with torch.no_grad():
            logits = model(question, past_key_values=cache,
                           position_ids=torch.arange(n, n + question.shape[1], device="cuda")[None]).logits
        return cache, logits.float()

    cache, fast = ask()
    with use_backend("reference"):
        ref_cache, slow = ask()
    torch.testing.assert_close(cache.scores, ref_cache.scores, atol=1e-4, rtol=1e-4, equal_nan=True)
    assert torch.equal(cache.keep_mask, ref_cache.keep_mask)
    torch.testing.assert_close(fast, slow, atol=1e-3, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_pairs_on_cuda_match_the_reference_backend(arch, dtype):
    """fp8 kept pairs on the GPU: the Triton kernels (fp8 tiles converted in registers, scales folded in) give the
    reference backend's logits (PyTorch dequantization) on the same cache, whose store is the CPU's quantization of
    the plain store bit for bit; fp8 moves the logits, but by less than a logit.

    float32: within 1e-3. bfloat16: the two backends round differently (the reference dequantizes each pair to bf16,
    the kernel scales logits and probabilities in float32), so the bound is the plain bf16 store's own
    Triton-vs-reference gap on the same cache and question: fp8 may not widen it more than 2x (plus 0.01)."""
    model, _ = _on_gpu(arch, dtype)
    context, question = _ids(300, 5), _ids(9, 6)
    cache = KVzipCache(model)
    cache.prefill(model, context, context_start=7, chunk_size=128)
    plain = copy.deepcopy(cache)
    cache.compress(model, 0.3, tokenizer=TOK, chunk_size=100, kv_dtype="fp8")
    plain.compress(model, 0.3, tokenizer=TOK, chunk_size=100)
    failures = []  # every check runs, so that one GPU run says all that is wrong
    if not torch.equal(cache.keep_mask, plain.keep_mask):
        failures.append(f"fp8 changed the selection ({(cache.keep_mask != plain.keep_mask).sum()} pairs)")
    store, plain_store = (c.layers[c.compressible_layers[0]].context for c in (cache, plain))
    assert store.is_fp8 and store.keys.element_size() == 1 and store.keys.shape == plain_store.keys.shape
    cpu_quantized = plain_store.to("cpu").to_fp8().keys.view(torch.uint8)
    if not torch.equal(store.to("cpu").keys.view(torch.uint8), cpu_quantized):
        failures.append("the GPU quantized unlike the CPU")
    n = cache.get_seq_length()
    position = torch.arange(n, n + question.shape[1], device="cuda")[None]

    def logits(c):
        with torch.no_grad():
            out = model(question, past_key_values=c, position_ids=position).logits.float()
        c.rollback()
        return out

    def backend_gap(c):
        fast = logits(c)
        with use_backend("reference"):
            return fast, (fast - logits(c)).abs()

    fast, gap = backend_gap(cache)
    unquantized, plain_gap = backend_gap(plain)
    print(f"fp8 {arch} {dtype}: Triton vs reference, fp8 store: max {gap.max():.4g} mean {gap.mean():.4g}; "
          f"plain store: max {plain_gap.max():.4g} mean {plain_gap.mean():.4g}; "
          f"fp8 vs plain (Triton): {(fast - unquantized).abs().max():.4g}")
    bound = 2 * plain_gap.max() + 0.01 if dtype == torch.bfloat16 else 1e-3
    if gap.max() > bound or gap.mean() > 2 * plain_gap.mean() + 1e-3:
        failures.append(f"Triton's fp8 logits differ from the reference backend's: max {gap.max():.4g} "
                        f"(bound {bound:.4g}), mean {gap.mean():.4g}")
    difference = (fast - unquantized).abs().max()
    if not 1e-3 < difference < 1.0:
        failures.append(f"fp8 vs unquantized pairs: {difference}")
    assert not failures, "; ".join(failures)


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


# Phi-3-mini's head_dim: 3072 / 32 heads = 96, not a power of two (the kernels pad their tiles to 128 and mask).
PHI3_HEAD_DIM_96 = dict(conftest.COMMON, hidden_size=384, num_attention_heads=4, num_key_value_heads=2)


def _phi3_head_dim_96(monkeypatch, dtype):
    """`make_pair` (same weights, sharpened queries) for a Phi3 model of head_dim 96 and GQA group 2, on CUDA."""
    configs = conftest._configs
    extra = {"phi3-96": (Phi3Config(**PHI3_HEAD_DIM_96), Phi3ForCausalLM)}
    monkeypatch.setattr(conftest, "_configs", lambda: {**configs(), **extra})
    model, reference = make_pair("phi3-96")
    assert model.config.hidden_size // model.config.num_attention_heads == 96
    return model.to("cuda", dtype), reference.to("cuda", dtype)


def _count_kernel_calls(monkeypatch) -> list[tuple[str, int]]:
    """Record (kernel, head_dim) for each call of the Triton kernels from the backend (no silent fallback): "ragged"
    for either decode path, "scores" for the scoring kernel."""
    calls = []
    for name, label in (("ragged_attention_with_tail", "ragged"), ("ragged_attention_split_tail", "ragged"),
                        ("restricted_max_scores_triton", "scores")):
        kernel = getattr(triton_backend, name)

        def spy(query, *args, _kernel=kernel, _label=label, **kwargs):
            calls.append((_label, query.shape[-1]))
            return _kernel(query, *args, **kwargs)

        monkeypatch.setattr(triton_backend, name, spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_phi3_head_dim_96_matches_reference_backend(dtype, monkeypatch):
    """Prefill, compress, a question and greedy generation through the padded kernels agree with the reference."""
    model, _ = _phi3_head_dim_96(monkeypatch, dtype)
    calls = _count_kernel_calls(monkeypatch)
    context, question = _ids(300, 11), _ids(9, 12)

    def ask(m, keep=None):
        return _compress_and_ask(m, context, question, keep)

    def run():
        cache, logits = ask(model)
        cache.rollback()
        tokens = model.generate(**cache.inputs_for(question), past_key_values=cache, max_new_tokens=10,
                                min_new_tokens=10, do_sample=False)
        return cache, logits, tokens

    cache, fast, fast_tokens = run()
    assert {name for name, _ in calls} == {"ragged", "scores"}
    assert {head_dim for _, head_dim in calls} == {96}
    calls.clear()
    if dtype == torch.float32:
        with use_backend("reference"):
            ref_cache, slow, slow_tokens = run()
        assert not calls
        torch.testing.assert_close(cache.scores, ref_cache.scores, atol=1e-4, rtol=1e-4, equal_nan=True)
        assert torch.equal(cache.keep_mask, ref_cache.keep_mask)
        torch.testing.assert_close(fast, slow, atol=1e-3, rtol=0)
        assert torch.equal(fast_tokens, slow_tokens)
    else:  # CPU bf16 reference backend: scores 0.018 relative, logits 0.0056 / 0.023; eviction 0.25 / 1.06
        _assert_bf16_matches_float32(model, ask, cache, fast, bounds=(0.08, 0.03, 0.12))
        assert not calls


def test_phi3_head_dim_96_greedy_generation_matches_dynamic_cache(monkeypatch):
    """Nothing evicted (ratio 1): the padded kernels must reproduce dense attention token for token."""
    model, reference = _phi3_head_dim_96(monkeypatch, torch.float32)
    reference.set_attn_implementation("sdpa")
    calls = _count_kernel_calls(monkeypatch)
    context, question = _ids(200, 13), _ids(8, 14)
    full = torch.cat([context, question], 1)
    cache = KVzipCache(model)
    cache.prefill(model, context, context_start=4)
    cache.compress(model, 1.0, tokenizer=TOK)
    out = model.generate(full, past_key_values=cache, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    expected = reference.generate(full, past_key_values=DynamicCache(config=reference.config), max_new_tokens=12,
                                  min_new_tokens=12, do_sample=False)
    assert ("ragged", 96) in calls
    assert torch.equal(out, expected)


def _static_pair(model, context, ratio=0.3, room=48, kv_dtype=None):
    caches = []
    for _ in range(2):
        cache = KVzipCache(model)
        cache.prefill(model, context, context_start=7, chunk_size=128)
        cache.compress(model, ratio, tokenizer=TOK, chunk_size=100, kv_dtype=kv_dtype)
        caches.append(cache)
    caches[1].make_static(room)
    return caches


class _GraphRecordings(logging.Handler):
    """Collects inductor's "Recording cudagraph tree ..." messages (one per compiled graph and distinct set of its
    integer inputs: a step whose inputs change size records a new CUDA graph at every new size)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "Recording cudagraph tree" in record.getMessage():
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _cuda_graphs_required():
    """Fail if inductor runs a compiled step without CUDA graphs (it then launches every kernel from Python, and a
    step costs its launches: the 8B step with fp8 pairs, ~9.4 ms at 1K, 32K and 128K alike on an H100, looked like
    one). Where this torch has ``triton.cudagraph_or_error``, the skip raises with inductor's reason; the skip
    counter catches it otherwise. Yields the CUDA graph recordings made inside (`_GraphRecordings.messages`): a step
    recorded again at every token shows as one recording a step."""
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    strict = {"triton.cudagraph_or_error": True} if hasattr(torch._inductor.config.triton, "cudagraph_or_error") else {}
    recordings = _GraphRecordings()
    logger = logging.getLogger("torch._inductor.cudagraph_trees.__cudagraphs")
    torch._logging.set_logs(cudagraphs=True)
    logger.addHandler(recordings)
    try:
        with torch._inductor.config.patch(strict):
            yield recordings.messages
    finally:
        logger.removeHandler(recordings)
        torch._logging.set_logs()
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == skips, "inductor skipped CUDA graphs"


@pytest.mark.parametrize("arch,dtype,kv_dtype,backend", [
    ("llama", torch.float32, None, "triton"), ("gemma3", torch.float32, None, "triton"),
    ("llama", torch.bfloat16, "fp8", "triton"), ("llama", torch.float32, None, "triton-two-launch"),
    ("llama", torch.bfloat16, "fp8", "triton-two-launch")])
def test_compiled_static_decode_with_cuda_graphs_equals_eager_compressed_cache(arch, dtype, kv_dtype, backend):
    """torch.compile(mode="reduce-overhead"): the Triton kernels run inside CUDA graphs and give the eager tokens
    (Gemma3: with its sliding layers' windows in fixed buffers; fp8 kept pairs: their scales in fixed buffers too),
    through either decode path."""
    with use_backend(backend):
        _compiled_static_decode_equals_eager(arch, dtype, kv_dtype)


def _compiled_static_decode_equals_eager(arch, dtype, kv_dtype):
    torch._dynamo.reset()
    model, _ = _on_gpu(arch, dtype)
    context, question = _ids(300, 11), _ids(6, 12)
    eager, static = _static_pair(model, context, kv_dtype=kv_dtype)
    assert static.layers[static.compressible_layers[0]].context.is_fp8 == (kv_dtype == "fp8")
    compiled = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

    def greedy(cache, forward, steps=12):
        with torch.no_grad():
            n = int(cache.get_seq_length())
            logits = model(question, past_key_values=cache, position_ids=torch.arange(n, n + 6, device="cuda")[None])
            token, position = logits.logits[:, -1].argmax(-1, keepdim=True), torch.tensor([[n + 6]], device="cuda")
            tokens = [token]
            for _ in range(steps):
                torch.compiler.cudagraph_mark_step_begin()
                logits = forward(input_ids=token, past_key_values=cache, position_ids=position).logits
                token, position = logits[:, -1].argmax(-1, keepdim=True), position + 1
                tokens.append(token)
        cache.rollback()
        return torch.cat(tokens, 1)

    expected = greedy(eager, model)
    with torch._dynamo.config.patch(error_on_recompile=True), _cuda_graphs_required() as recordings:
        first, second = greedy(static, compiled), greedy(static, compiled)  # the second one replays the graph
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert 1 <= len(recordings) <= 2, recordings  # not one per step: no input changes size over the 24 steps


@pytest.mark.parametrize("kv_dtype", [None, "fp8"])
def test_generate_records_one_cuda_graph_however_long_the_answer(kv_dtype):
    """generate's own compiled steps on a static cache without eviction (the long-answer bench's off-compiled mode):
    the answer's tokens equal eager generate's, and the step is recorded as one CUDA graph, not again whenever an
    input changes size (that bench logged 9 distinct sizes during an 8K-token answer on an H100, at 18.8 ms a
    step against 10.0 with eviction)."""
    torch._dynamo.reset()
    model, _ = _on_gpu("llama", torch.bfloat16 if kv_dtype else torch.float32)
    context, question, new = _ids(300, 41), _ids(6, 42), 72
    eager, static = _static_pair(model, context, room=question.shape[1] + new, kv_dtype=kv_dtype)
    want = model.generate(**eager.inputs_for(question), past_key_values=eager, max_new_tokens=new,
                          min_new_tokens=new, do_sample=False)
    with _cuda_graphs_required() as recordings:
        got = model.generate(**static.inputs_for(question), past_key_values=static, max_new_tokens=new,
                             min_new_tokens=new, do_sample=False)
    lead = got.shape[1] if kv_dtype is None else got.shape[1] - new + 12  # bf16: compiled sums may round otherwise
    assert torch.equal(got[:, :lead], want[:, :lead])
    assert 1 <= len(recordings) <= 4, recordings  # not one per token (generate may record a few graph-tree nodes)


def test_compiled_decoding_with_eviction_equals_eager_eviction():
    """A static cache made after evict_while_decoding: compiled decode steps (CUDA graphs), with the kept pairs packed
    into the fixed tail between steps (`evict_between_steps`), give eager eviction's tokens, replay after rollback,
    and generate's own compiled steps give them too with `eviction_criteria`."""
    torch._dynamo.reset()
    model, _ = _on_gpu("llama", torch.float32)
    context, question, steps = _ids(300, 21), _ids(6, 22), 100

    def cache_for(static):
        cache = KVzipCache(model)
        cache.prefill(model, context, context_start=7, chunk_size=128)
        cache.compress(model, 0.3, tokenizer=TOK, chunk_size=100)
        cache.evict_while_decoding(model, "keydiff", 0.4, window=16, level="pair-uniform")
        if static:
            cache.make_static(question.shape[1] + steps)
        return cache

    eager, static = cache_for(False), cache_for(True)
    compiled = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

    def greedy(cache, forward, hook):
        n = int(cache.get_seq_length())
        with torch.no_grad():
            logits = model(question, past_key_values=cache, position_ids=torch.arange(n, n + 6, device="cuda")[None])
            token, position = logits.logits[:, -1].argmax(-1, keepdim=True), torch.tensor([[n + 6]], device="cuda")
            tokens = [token]
            for _ in range(steps - 1):
                if hook:
                    cache.evict_between_steps()
                torch.compiler.cudagraph_mark_step_begin()
                logits = forward(input_ids=token, past_key_values=cache, position_ids=position).logits
                token, position = logits[:, -1].argmax(-1, keepdim=True), position + 1
                tokens.append(token)
        return torch.cat(tokens, 1)

    expected = greedy(eager, model, hook=False)
    with torch._dynamo.config.patch(error_on_recompile=True), _cuda_graphs_required() as recordings:
        first = greedy(static, compiled, hook=True)
        evictions = len(static.decode_eviction.history)
        static.rollback()
        second = greedy(static, compiled, hook=True)  # replays the graph on the reset buffers
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert 1 <= len(recordings) <= 2, recordings  # evicting between steps changes no input's size
    assert evictions == len(eager.decode_eviction.history) >= 5
    eager.rollback()
    static.rollback()
    inputs = eager.inputs_for(question)
    want = model.generate(**inputs, past_key_values=eager, max_new_tokens=60, do_sample=False)
    got = model.generate(**inputs, past_key_values=static, max_new_tokens=60, do_sample=False,
                         stopping_criteria=[static.eviction_criteria()])
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_generate_compiles_decode_steps_for_a_static_cache(arch):
    """transformers' generate compiles its decode steps itself when the cache is compileable (CUDA)."""
    torch._dynamo.reset()
    model, _ = _on_gpu(arch, torch.float32)
    context, question = _ids(200, 13), _ids(5, 14)
    eager, static = _static_pair(model, context)
    inputs = eager.inputs_for(question)
    expected = model.generate(**inputs, past_key_values=eager, max_new_tokens=16, do_sample=False)
    for _ in range(2):  # compile, then replay
        got = model.generate(**inputs, past_key_values=static, max_new_tokens=16, do_sample=False)
        static.rollback()
        assert torch.equal(got, expected)
    kwargs = {"cache": static, "past_key_values": static}  # the key generate uses: "cache" on 5.24, the other on 5.17
    assert static.is_compileable and model._valid_auto_compile_criteria(kwargs, model.generation_config)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_predictor_compress_and_evicting_prefill_on_cuda_match_the_cpu(arch):
    """Predicted compress and eviction while prefilling (long chunks arrive as the tail of a ragged layer and go
    through the large-query path) give the CPU's keep mask and logits."""
    from kvzip_cache import ScorePredictor

    model, _ = make_pair(arch)
    predictor = ScorePredictor.init(model, "mlp", seed=4)
    context, question = _ids(1500, 5, batch=2), _ids(7, 6, batch=2)
    mask = torch.ones_like(context)
    mask[1, :40] = 0
    starts = torch.tensor([3, 45])

    def run(device):
        m = model.to(device)
        results = []
        for evicting in (False, True):
            cache = KVzipCache(m)
            if evicting:
                cache.prefill(m, context.to(device), mask.to(device), context_start=starts.to(device), chunk_size=600,
                              predictor=predictor, ratio=0.3)
            else:
                cache.prefill(m, context.to(device), mask.to(device), context_start=starts.to(device))
                cache.compress(m, 0.3, predictor=predictor)
            inputs = cache.inputs_for(question.to(device))
            positions = (inputs["attention_mask"].cumsum(-1) - 1)[:, -7:]
            with torch.no_grad():
                logits = m(input_ids=question.to(device), attention_mask=inputs["attention_mask"],
                           position_ids=positions, past_key_values=cache).logits
            results.append((cache.keep_mask.cpu(), logits.float().cpu()))
        return results

    cpu, gpu = run("cpu"), run("cuda")
    for (cpu_keep, cpu_logits), (gpu_keep, gpu_logits) in zip(cpu, gpu):
        assert (cpu_keep != gpu_keep).float().mean() < 1e-3  # fp32 near-ties may flip a pair
        torch.testing.assert_close(gpu_logits, cpu_logits, atol=2e-3, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_shared_questions_on_cuda_equal_each_question_alone_eager_and_compiled(arch):
    """Shared-context rows (the Triton kernels' stacked-query path) give each question's own tokens; made static,
    generate's compiled decode steps give them too, and a second document of the same bucket compiles nothing new."""
    from kvzip_cache.templates import left_pad

    torch._dynamo.reset()
    model, _ = _on_gpu(arch, torch.float32)
    ids, mask = left_pad([torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 8, 3)],
                         pad_id=0)
    ids, mask = ids.cuda(), mask.cuda()
    graphs = []
    for doc, length in enumerate((300, 280)):  # one length bucket (512)
        cache = KVzipCache(model)
        cache.prefill(model, _ids(length, 20 + doc), context_start=7, chunk_size=128)
        cache.compress(model, 0.3, tokenizer=TOK, chunk_size=100)
        alone = []
        for b in range(len(ids)):
            out = model.generate(**cache.inputs_for(ids[b : b + 1], mask[b : b + 1]), past_key_values=cache,
                                 max_new_tokens=10, do_sample=False, pad_token_id=0)
            alone.append(out)
            cache.rollback()
        inputs = cache.inputs_for(ids, mask, shared=True)
        shared = model.generate(**inputs, past_key_values=cache, max_new_tokens=10, do_sample=False, pad_token_id=0)
        for row, own in enumerate(alone):  # a row that stopped alone only pads in the batch afterwards
            assert torch.equal(shared[row, : own.shape[1]], own[0]), row
            assert (shared[row, own.shape[1] :] == 0).all(), row
        cache.rollback()
        cache.inputs_for(ids, mask, shared=True)
        cache.make_static(ids.shape[1] + 10)  # room for the question and the answer (16 slots overflowed once the
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # room was rounded to 16, not 64)
        for _ in range(2):
            with _cuda_graphs_required():
                got = model.generate(**inputs, past_key_values=cache, max_new_tokens=10, do_sample=False,
                                     pad_token_id=0)
            cache.rollback()
            assert torch.equal(got, shared)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - before)
    assert graphs[0] > 0 and graphs[1] == 0, graphs


def test_saved_cache_loads_on_cuda_and_from_cuda_to_cpu(tmp_path):
    """A cache compressed on the GPU, saved and loaded back on the GPU holds the saved tensors bit for bit and gives
    its tokens; loaded onto the CPU (the reference backend) it holds them too and gives them too (float32)."""
    from cache_state import assert_same_state, cache_state

    model, _ = _on_gpu("gemma3", torch.float32)
    cache = KVzipCache(model)
    cache.prefill(model, _ids(300, 30), context_start=7, chunk_size=128)
    cache.compress(model, 0.3, tokenizer=TOK, chunk_size=100)
    path = cache.save(tmp_path / "c.kvzip")
    saved = cache_state(cache)  # compared on the CPU, byte for byte
    question = _ids(6, 31)
    expected = model.generate(**cache.inputs_for(question), past_key_values=cache, max_new_tokens=10, do_sample=False)
    loaded = KVzipCache.load(path, model)
    assert loaded.layers[loaded.compressible_layers[0]].context.keys.is_cuda
    assert_same_state(saved, cache_state(loaded))
    got = model.generate(**loaded.inputs_for(question), past_key_values=loaded, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, expected)
    cpu_model = copy.deepcopy(model).to("cpu")
    on_cpu = KVzipCache.load(path, cpu_model, device="cpu")
    assert not on_cpu.layers[on_cpu.compressible_layers[0]].context.keys.is_cuda
    assert_same_state(saved, cache_state(on_cpu), ignore=("owner",))  # owner: the other model object's modules
    got = cpu_model.generate(**on_cpu.inputs_for(question.cpu()), past_key_values=on_cpu, max_new_tokens=10,
                             do_sample=False)
    assert torch.equal(got, expected.cpu())


def test_a_cache_saved_on_the_cpu_loads_onto_cuda(tmp_path):
    """The other direction: compressed and saved on the CPU, loaded onto the GPU (`device="cuda"`): the same tensors
    bit for bit, and the CPU's tokens from the Triton backend (float32)."""
    from cache_state import assert_same_state, cache_state

    model, _ = make_pair("llama")
    cache = KVzipCache(model)
    cache.prefill(model, _ids(300, 32).cpu(), context_start=7, chunk_size=128)
    cache.compress(model, 0.3, tokenizer=TOK, chunk_size=100)
    path = cache.save(tmp_path / "c.kvzip")
    saved = cache_state(cache)
    question = _ids(6, 33).cpu()
    expected = model.generate(**cache.inputs_for(question), past_key_values=cache, max_new_tokens=10, do_sample=False)
    gpu_model = copy.deepcopy(model).to("cuda")
    on_gpu = KVzipCache.load(path, gpu_model, device="cuda")
    assert on_gpu.layers[on_gpu.compressible_layers[0]].context.keys.is_cuda
    assert_same_state(saved, cache_state(on_gpu), ignore=("owner",))
    got = gpu_model.generate(**on_gpu.inputs_for(question.cuda()), past_key_values=on_gpu, max_new_tokens=10,
                             do_sample=False)
    assert torch.equal(got.cpu(), expected)

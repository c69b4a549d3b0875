"""Speed and memory benchmark: HF DynamicCache + SDPA against KVzipCache on a GPU.

    python -m kvzip_cache.bench --model llama3.1-8b    # or: kvzip-bench ... --contexts 8192 32768 131072 --batches 1 8 \\
        --out docs/benchmarks/h200

``--model`` is a path or hub name of a causal LM, or a built-in shape with random weights (``llama3.1-8b``,
``qwen2.5-7b``): speed and memory do not depend on trained weights. For every (context length, batch) that fits,
it reports for the baseline and for KVzip at each ratio: prefill time, compress time, decode ms/token (median of
``--decode-steps`` steps after warm-up, CUDA events; a direct forward loop, plus `model.generate` with left padding
at batch > 1), KV GB after compression, peak GPU GB during prefill / compress / decode, and the ragged attention
kernel's effective bandwidth (retained KV bytes read per second) against the measured copy bandwidth. The physical
floor of a decode step is ``(weight bytes + kept KV bytes) / copy bandwidth``.

Writes ``results.json``, ``report.md`` and ``decode.png`` (decode latency and KV memory vs context length) under
``--out``.

``--predictor linear|mlp`` adds, for every (context, batch), the rows of a `ScorePredictor` (random weights, see
`predictor_rows`): ``kvzip-pred`` (a plain prefill, then ``compress(predictor=p)``: no forward pass) and
``kvzip-evict`` (``prefill(predictor=p, ratio=r)``: evicts while prefilling), with their time against the plain
prefill and DynamicCache's, and the evicting prefill's peak memory beside its bound.

``--decode-eviction off on`` measures instead long answers (``--new-tokens``) after a compressed context, without and
with eviction while decoding (`kvzip_cache.bench_decode`).

``--capacity`` measures instead the longest context one GPU prefills with a dense cache and with eviction at the
smallest ``--ratios`` (`capacity_rows`), within ``--capacity-budget`` seconds; writes ``capacity.json`` and
``capacity.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import kvzip_cache  # noqa: F401  (registers "kvzip")
from kvzip_cache import KVzipCache, ScorePredictor
from kvzip_cache.compat import cache_kwarg
from kvzip_cache.config import kv_shape
from kvzip_cache.scorers.predictor import KINDS as PREDICTOR_KINDS

SHAPES = {
    "llama3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=262144,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=262144,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
}
GB = 1e9
CAPACITY_START = 131072  # the capacity search doubles from here...
CAPACITY_STEP = 65536  # ...then bisects down to this granularity


@dataclass
class Row:
    method: str  # "dynamic" or "kvzip"
    context: int
    batch: int
    ratio: float = 1.0
    prefill_s: float = float("nan")
    scoring_s: float = float("nan")
    compress_s: float = float("nan")
    decode_ms: float = float("nan")
    generate_ms: float = float("nan")
    kv_gb: float = float("nan")
    peak_prefill_gb: float = float("nan")
    peak_compress_gb: float = float("nan")
    peak_decode_gb: float = float("nan")
    floor_ms: float = float("nan")
    kernel_gbps: float = float("nan")
    compile_s: float = float("nan")  # compiled decoding (bench_compiled): torch.compile + CUDA graph recording
    # score-predictor rows ("kvzip-pred", "kvzip-evict", see predictor_rows) and capacity rows (capacity_rows):
    plain_prefill_s: float = float("nan")  # the plain KVzipCache prefill of the same context
    dynamic_prefill_s: float = float("nan")  # the DynamicCache + SDPA prefill of the same context
    chunk_gb: float = float("nan")  # one prefill chunk: its activations plus its own dense KV (see predictor_rows)
    bound_gb: float = float("nan")  # evicting prefill: GB allocated before it + ratio x full KV + chunk_gb
    fits: bool | None = None  # capacity rows: whether the try ran without running out of GPU memory
    notes: list[str] = field(default_factory=list)


def load_model(name: str, dtype: torch.dtype, device: str, max_positions: int | None = None):
    """The model, in eval mode, SDPA attention. ``max_positions``: raise a built-in shape's
    ``max_position_embeddings`` to at least this many positions (long contexts; a hub model keeps its own)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name in SHAPES:
        spec = dict(SHAPES[name])
        if max_positions is not None:
            spec["max_position_embeddings"] = max(spec["max_position_embeddings"], max_positions)
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa").to(device)
    return model.eval()


def copy_bandwidth(device: str, nbytes: int = 4 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), median of 10."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times[3:])


def _peak_gb() -> float:
    """Peak GPU GB allocated since the last `_reset_peak` (NaN without CUDA: the CPU smoke tests)."""
    return torch.cuda.max_memory_allocated() / GB if torch.cuda.is_available() else float("nan")


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _free() -> None:
    """Return freed GPU memory to the device between measurements (and after an out-of-memory error)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Measurement:
    seconds: float = float("nan")
    peak_gb: float = float("nan")  # peak GPU GB allocated during the block
    before_gb: float = float("nan")  # GPU GB allocated when the block started (weights, inputs, ...)


@contextmanager
def _measured() -> Iterator[Measurement]:
    """Time a block (synchronised) and take its peak GPU memory; filled in also when the block raises (OOM)."""
    _reset_peak()
    m = Measurement(before_gb=torch.cuda.memory_allocated() / GB if torch.cuda.is_available() else float("nan"))
    began = time.perf_counter()
    try:
        yield m
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        m.seconds, m.peak_gb = time.perf_counter() - began, _peak_gb()


def kv_bytes_per_token(config, itemsize: int) -> int:
    """Dense KV bytes of one token of one row: layers x 2 (keys, values) x KV heads x head_dim x itemsize."""
    num_heads, head_dim = kv_shape(config)
    return config.num_hidden_layers * 2 * num_heads * head_dim * itemsize


def _chunked_forward(model, cache, ids: torch.Tensor, mask: torch.Tensor, chunk: int, start: int = 0) -> None:
    """Forward ``ids[:, start:]`` into ``cache``, ``chunk`` tokens per pass, as a chunked prefill does from ``start``.

    ``ids``, ``mask``: ``[B, S]`` (mask 1 = token, 0 = left padding); position ids follow the mask.
    """
    kwarg = cache_kwarg(model)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        for lo in range(start, ids.shape[1], chunk):
            hi = min(lo + chunk, ids.shape[1])
            model(input_ids=ids[:, lo:hi], attention_mask=mask[:, :hi], position_ids=positions[:, lo:hi],
                  use_cache=True, logits_to_keep=1, **{kwarg: cache})


def _context(batch: int, length: int, vocab: int, device: str, padded: bool):
    """Random ids; with ``padded``, row b is left-padded by b * length // (4 * batch) tokens."""
    ids = torch.randint(10, vocab, (batch, length), device=device)
    mask = torch.ones_like(ids)
    if padded:
        for b in range(batch):
            mask[b, : b * length // (4 * batch)] = 0
    return ids, mask


def _decode_loop(model, cache, batch: int, start: int, steps: int, mask: torch.Tensor | None) -> float:
    """Median ms of one decode step (forward of one token per row), CUDA events, after 4 warm-up steps."""
    kwarg = cache_kwarg(model)
    token = torch.full((batch, 1), 11, device=model.device)
    times = []
    gc.disable()  # a collection inside the loop would land on one step of a CPU-bound eager decode
    for step in range(steps + 4):
        position = torch.full((batch, 1), start + step, device=model.device)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            position = mask.sum(1, keepdim=True) - 1
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        with torch.no_grad():
            model(input_ids=token, attention_mask=mask, position_ids=position, use_cache=True, **{kwarg: cache})
        end.record()
        torch.cuda.synchronize()
        if step >= 4:
            times.append(begin.elapsed_time(end))
    gc.enable()
    return statistics.median(times)


def _generate_ms(model, cache, ids, mask, steps: int, reset) -> float:
    """ms per new token through model.generate: (time of steps+8 tokens - time of 8 tokens) / steps."""
    timings = []
    _greedy(model, cache, ids, mask, 4)  # warm-up: the first generate pays one-time costs
    reset()
    for new_tokens in (8, steps + 8):
        torch.cuda.synchronize()
        began = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
        timings.append(time.perf_counter() - began)
        reset()
    return (timings[1] - timings[0]) / steps * 1e3


def _greedy(model, cache, ids, mask, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    return out[:, ids.shape[1]:]


def kernel_bandwidth(cache: KVzipCache, model, batch: int) -> float:
    """GB/s of retained KV read by the ragged context kernel on layer 0's kept pairs (decode, one token per row).

    Timed as CUDA-graph replays (triton.testing.do_bench_cudagraph), so it is the GPU's time, not Python's.
    """
    import triton

    from kvzip_cache.kernels import ragged_context_partials

    ctx = cache.layers[cache.compressible_layers[0]].context
    config = model.config
    group = config.num_attention_heads // config.num_key_value_heads
    query = torch.randn(batch, ctx.num_heads, group, ctx.keys.shape[-1], device=ctx.keys.device, dtype=ctx.keys.dtype)
    src = torch.arange(batch, dtype=torch.int32, device=ctx.keys.device)
    ms = triton.testing.do_bench_cudagraph(
        lambda: ragged_context_partials(query, ctx.keys, ctx.values, ctx.cu_seqlens, src, ctx.max_seqlen,
                                        ctx.keys.shape[-1] ** -0.5),
        rep=50,
    )
    return ctx.kv_bytes() / (ms / 1e3) / GB


def warm_up(model, device: str, predictor: ScorePredictor | None = None) -> None:
    """Compile the Triton kernels and fill caches outside the measurements (with ``predictor``: its paths too)."""
    model.set_attn_implementation("kvzip")
    ids = torch.randint(10, 1000, (2, 2048), device=device)
    cache = KVzipCache(model)
    cache.prefill(model, ids, context_start=16, chunk_size=1024)
    cache.compress(model, 0.5, tokenizer=_NoTemplateTokenizer(), chunk_size=512)
    _decode_loop(model, cache, 2, 2048, 2, None)
    del cache
    if predictor is not None:
        _warm_up_predictor(model, predictor, device)
    torch.cuda.empty_cache()


def _warm_up_predictor(model, predictor: ScorePredictor, device: str) -> None:
    """One small predicted compress and one small evicting prefill (first-call costs outside the measurements)."""
    ids = torch.randint(10, 1000, (1, 4096), device=device)
    cache = KVzipCache(model)
    cache.prefill(model, ids, context_start=16, chunk_size=2048)
    cache.compress(model, 0.5, predictor=predictor)
    cache = KVzipCache(model)
    cache.prefill(model, ids, context_start=16, chunk_size=1024, predictor=predictor, ratio=0.5)
    del cache
    _free()


def run(args) -> dict:
    device = "cuda"
    dtype = getattr(torch, args.dtype)
    model = load_model(args.model, dtype, device,
                       max_positions=max(args.contexts) + args.question_tokens + args.decode_steps + 64)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device)
    predictor = ScorePredictor.init(model, args.predictor, seed=0).to(device) if args.predictor else None
    warm_up(model, device, predictor)
    print(f"weights {weight_bytes / GB:.1f} GB, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    config = model.config
    kv_per_token = kv_bytes_per_token(config, dtype.itemsize)
    decode = args.decode_steps > 0  # --decode-steps 0: prefill and compress figures only
    rows: list[Row] = []
    capacity = torch.cuda.get_device_properties(0).total_memory
    for context in args.contexts:
        for batch in args.batches:
            need = weight_bytes + 2.3 * kv_per_token * context * batch
            if need > 0.92 * capacity:
                print(f"skip context {context} x batch {batch}: needs ~{need / GB:.0f} GB")
                continue
            padded = batch > 1
            ids, mask = _context(batch, context, config.vocab_size, device, padded)
            starts = torch.tensor([b * context // (4 * batch) if padded else 0 for b in range(batch)],
                                  device=device) + 16
            ask = torch.randint(10, config.vocab_size, (batch, args.question_tokens), device=device)
            full_ids, full_mask = torch.cat([ids, ask], 1), torch.cat([mask, torch.ones_like(ask)], 1)

            # ---- baseline: DynamicCache + SDPA
            from transformers import DynamicCache

            model.set_attn_implementation("sdpa")
            row = Row("dynamic", context, batch)
            cache = DynamicCache(config=config)
            with _measured() as m:
                _chunked_forward(model, cache, ids, mask, args.prefill_chunk)
            row.prefill_s, row.peak_prefill_gb = m.seconds, m.peak_gb
            row.kv_gb = kv_per_token * context * batch / GB
            back_to_context = lambda c=cache: c.crop(context - c.get_seq_length())  # noqa: E731
            if decode:
                _reset_peak()
                row.decode_ms = _decode_loop(model, cache, batch, context, args.decode_steps, mask if padded else None)
                row.peak_decode_gb = _peak_gb()
                back_to_context()
            if args.check_tokens > 0:
                reference_tokens = _greedy(model, cache, full_ids, full_mask, args.check_tokens)
                back_to_context()
            if decode and (batch > 1 or args.generate):
                row.generate_ms = _generate_ms(model, cache, full_ids, full_mask, args.decode_steps, back_to_context)
            row.floor_ms = (weight_bytes + kv_per_token * context * batch) / bandwidth * 1e3
            rows.append(row)
            print(_line(row))
            dynamic_prefill_s = row.prefill_s
            del cache, back_to_context  # the lambda holds the cache too: free it before the KVzip peaks are taken
            _free()

            # ---- KVzip at each ratio, scored once, re-selected for smaller ratios
            model.set_attn_implementation("kvzip")
            cache = KVzipCache(model)
            _reset_peak()
            began = time.perf_counter()
            cache.prefill(model, ids, mask, context_start=starts, chunk_size=args.prefill_chunk)
            torch.cuda.synchronize()
            prefill_s, peak_prefill = time.perf_counter() - began, _peak_gb()
            scoring_s = float("nan")
            for ratio in sorted(args.ratios, reverse=True):
                row = Row("kvzip", context, batch, ratio, prefill_s=prefill_s, peak_prefill_gb=peak_prefill)
                _reset_peak()
                began = time.perf_counter()
                report = cache.compress(model, ratio, tokenizer=_NoTemplateTokenizer(), chunk_size=args.score_chunk)
                torch.cuda.synchronize()
                row.compress_s = time.perf_counter() - began
                if scoring_s != scoring_s:  # first compress: scoring + eviction
                    scoring_s = row.compress_s
                row.scoring_s = scoring_s
                row.peak_compress_gb = _peak_gb()
                row.kv_gb = (cache.kv_bytes() + cache.metadata_bytes()) / GB
                row.notes.append(f"achieved ratio {report.achieved_ratio:.3f}")
                if ratio == 1.0 and args.check_tokens > 0:  # greedy tokens against DynamicCache (bf16 kernels may break near-ties)
                    tokens = _greedy(model, cache, full_ids, full_mask, args.check_tokens)
                    cache.rollback()
                    same = (tokens == reference_tokens).all(dim=0)
                    first = int((~same).nonzero()[0]) if not bool(same.all()) else len(same)
                    row.notes.append(f"greedy vs DynamicCache: {first}/{len(same)} leading tokens identical in all rows")
                if decode:
                    _reset_peak()
                    row.decode_ms = _decode_loop(model, cache, batch, context, args.decode_steps,
                                                 mask if padded else None)
                    row.peak_decode_gb = _peak_gb()
                    cache.rollback()
                if decode and (batch > 1 or args.generate):
                    row.generate_ms = _generate_ms(model, cache, full_ids, full_mask, args.decode_steps, cache.rollback)
                row.floor_ms = (weight_bytes + cache.kv_bytes()) / bandwidth * 1e3
                row.kernel_gbps = kernel_bandwidth(cache, model, batch)
                rows.append(row)
                print(_line(row))
            del cache
            _free()

            # ---- score predictor: predicted compress after a plain prefill, and eviction while prefilling
            if predictor is not None:
                for row in predictor_rows(model, predictor, ids, mask, starts, args.ratios, chunk=args.prefill_chunk,
                                          kv_per_token=kv_per_token, dynamic_prefill_s=dynamic_prefill_s,
                                          decode_steps=args.decode_steps):
                    if decode:
                        row.floor_ms = (weight_bytes + row.kv_gb * GB) / bandwidth * 1e3
                    rows.append(row)
    return result_record(args, weight_bytes, bandwidth, rows)


def predictor_rows(model, predictor: ScorePredictor, ids: torch.Tensor, mask: torch.Tensor, starts: torch.Tensor,
                   ratios: list[float], *, chunk: int, kv_per_token: int, dynamic_prefill_s: float = float("nan"),
                   decode_steps: int = 0) -> list[Row]:
    """Rows of a score predictor on one context; prints one line per row as it is measured.

    Args:
        model: loaded with (or set to) the kvzip attention.
        predictor: a `ScorePredictor` for the model (its weights do not change speed or memory).
        ids: ``[B, S]`` context ids (left padding when B > 1).
        mask: ``[B, S]`` padding mask (1 = token).
        starts: ``[B]`` first context position of each row (the protected prefix comes before).
        ratios: fractions of context pairs kept.
        chunk: prefill chunk size.
        kv_per_token: dense KV bytes per token (`kv_bytes_per_token`): full KV = kv_per_token x S x B.
        dynamic_prefill_s: the DynamicCache prefill time of the same context, to compare with (NaN: none).
        decode_steps: > 0 also times decode steps on each compressed cache (CUDA only).

    Returns, for each ratio r (largest first):

    - ``kvzip-pred``: a plain KVzipCache prefill (``prefill_s``, ``peak_prefill_gb``), then
      ``compress(model, r, predictor=p)`` (``compress_s``, ``peak_compress_gb``). The first ratio's compress predicts
      and evicts (``scoring_s``); later ones re-select with the stored predictions.
    - ``kvzip-evict``: ``prefill(..., predictor=p, ratio=r)`` (``prefill_s``, ``peak_prefill_gb``) beside the plain
      prefill (``plain_prefill_s``), DynamicCache's (``dynamic_prefill_s``) and the bound
      ``bound_gb = allocated before (weights, inputs) + r x full KV + chunk_gb``.

    ``chunk_gb``, "one chunk's activations" in the bound, is measured by `_one_chunk_gb` on the last ``chunk`` tokens
    of each row (they hold no left padding).
    """
    batch, context = ids.shape
    full_kv_gb = kv_per_token * context * batch / GB
    padded = not bool(mask.all())
    chunk_gb = _one_chunk_gb(model, ids[:, -chunk:])

    def decode_ms(cache: KVzipCache) -> float:
        if decode_steps <= 0:
            return float("nan")
        ms = _decode_loop(model, cache, batch, context, decode_steps, mask if padded else None)
        cache.rollback()
        return ms

    rows: list[Row] = []
    plain = KVzipCache(model)
    with _measured() as m:
        plain.prefill(model, ids, mask, context_start=starts, chunk_size=chunk)
    plain_s, plain_peak = m.seconds, m.peak_gb
    scoring_s = float("nan")
    for ratio in sorted(ratios, reverse=True):
        with _measured() as m:
            report = plain.compress(model, ratio, predictor=predictor)
        scoring_s = m.seconds if scoring_s != scoring_s else scoring_s
        row = Row("kvzip-pred", context, batch, ratio, prefill_s=plain_s, scoring_s=scoring_s, compress_s=m.seconds,
                  peak_prefill_gb=plain_peak, peak_compress_gb=m.peak_gb, plain_prefill_s=plain_s,
                  dynamic_prefill_s=dynamic_prefill_s, chunk_gb=chunk_gb,
                  kv_gb=(plain.kv_bytes() + plain.metadata_bytes()) / GB, decode_ms=decode_ms(plain))
        row.notes.append(f"achieved ratio {report.achieved_ratio:.3f}")
        rows.append(row)
        print(_predictor_line(row), flush=True)
    del plain
    _free()
    for ratio in sorted(ratios, reverse=True):
        cache = KVzipCache(model)
        with _measured() as m:
            cache.prefill(model, ids, mask, context_start=starts, chunk_size=chunk, predictor=predictor, ratio=ratio)
        row = Row("kvzip-evict", context, batch, ratio, prefill_s=m.seconds, peak_prefill_gb=m.peak_gb,
                  plain_prefill_s=plain_s, dynamic_prefill_s=dynamic_prefill_s, chunk_gb=chunk_gb,
                  bound_gb=m.before_gb + ratio * full_kv_gb + chunk_gb,
                  kv_gb=(cache.kv_bytes() + cache.metadata_bytes()) / GB, decode_ms=decode_ms(cache))
        achieved = int(cache.keep_mask.sum()) / max(int(cache.selectable_pairs().sum()), 1)
        row.notes.append(f"achieved ratio {achieved:.3f}")
        rows.append(row)
        print(_predictor_line(row), flush=True)
        del cache
        _free()
    return rows


def _one_chunk_gb(model, ids: torch.Tensor) -> float:
    """GB that a plain prefill of one chunk ``ids`` (``[B, chunk]``, no padding) peaks at above what was allocated
    before it (NaN without CUDA).

    This is how the bench MEASURES "one chunk's activations" in the bound of an evicting prefill: the chunk's
    activations plus its own dense KV, which an evicting prefill also holds until it has scored the chunk. (The
    alternative, a full plain prefill's peak minus weights minus full KV, leaves that KV out and adds the transient
    copy of one growing dense layer, which an evicting prefill never makes.)
    """
    cache = KVzipCache(model)
    with _measured() as m:
        cache.prefill(model, ids, chunk_size=ids.shape[1])
    del cache
    _free()
    return m.peak_gb - m.before_gb


def capacity_rows(model, predictor: ScorePredictor, ratio: float, *, cap: int, chunk: int, budget_s: float,
                  dense: str = "kvzip", start: int = CAPACITY_START,
                  step: int = CAPACITY_STEP) -> tuple[list[Row], dict]:
    """The longest context (batch 1, multiples of ``step`` up to ``cap``) that the model's GPU prefills with a dense
    cache, and with eviction at ``ratio`` by ``predictor``; prints one line per try.

    Tries, in this order, each catching `torch.cuda.OutOfMemoryError` and freeing memory afterwards:

    1. a real dense prefill of ``start`` tokens: the check of the stand-in below (compare the two peaks at ``start``);
    2. eviction (``prefill(predictor=p, ratio=ratio)``, real, the whole prefill): at ``cap`` first (the longest
       tries come first, so that the budget cuts the short ones); if it does not fit, bisection below it;
    3. dense (``dense``: ``"kvzip"``, a plain KVzipCache prefill, or ``"dynamic"``, DynamicCache + SDPA), through the
       last-chunk stand-in of `_dense_try`: doubling from ``start`` until a try fails, then bisection.

    A try starts only while ``budget_s`` seconds (from this call) are not spent; a try in flight is not interrupted.

    Returns:
        ``(rows, summary)``: one ``capacity-dense`` / ``capacity-evict`` row per try (``fits``, ``prefill_s``,
        ``peak_prefill_gb``, ``kv_gb``; eviction rows also ``bound_gb`` and ``chunk_gb`` as in `predictor_rows`) and
        the summary (longest fitting and shortest failing length of each, whether
        each search finished within the budget, the ratio of the two capacities, a memory-only projection).
    """
    began = time.perf_counter()
    deadline = began + budget_s
    rows: list[Row] = []
    longest_fit: list[tuple[int, Measurement]] = []
    kv_per_token = kv_bytes_per_token(model.config, model.dtype.itemsize)
    chunk_gb = _one_chunk_gb(model, torch.randint(10, model.config.vocab_size, (1, chunk), device=model.device))

    def record(row: Row) -> bool:
        rows.append(row)
        print(_capacity_line(row), flush=True)
        _free()
        return bool(row.fits)

    def evict_fits(length: int) -> bool:
        row, m = _evict_try(model, predictor, ratio, length, chunk)
        row.chunk_gb, row.bound_gb = chunk_gb, m.before_gb + ratio * kv_per_token * length / GB + chunk_gb
        if row.fits:
            longest_fit.append((length, m))
        return record(row)

    record(_dense_try(model, start, chunk, dense, real=True))
    evict_ok, evict_bad, evict_done = _longest(evict_fits, cap, cap, step, deadline)
    dense_ok, dense_bad, dense_done = _longest(
        lambda length: record(_dense_try(model, length, chunk, dense, real=False)), start, cap, step, deadline)
    projected = None
    if longest_fit and torch.cuda.is_available():
        # Peak = allocated before + a constant + a per-token slope: scaling (peak - before) linearly through the
        # longest fitting try under-estimates the capacity when that try fitted (conservative). Never run.
        length, m = max(longest_fit, key=lambda item: item[0])
        total = torch.cuda.get_device_properties(0).total_memory / GB
        projected = int(length * (total - m.before_gb) / (m.peak_gb - m.before_gb))
    summary = {
        "ratio": ratio, "predictor": predictor.kind, "dense_cache": dense, "chunk": chunk, "start": start,
        "step": step, "cap": cap, "budget_s": budget_s, "seconds": time.perf_counter() - began,
        "dense_tokens": dense_ok, "dense_failed_at": dense_bad, "dense_search_complete": dense_done,
        "evict_tokens": evict_ok, "evict_failed_at": evict_bad, "evict_search_complete": evict_done,
        # eviction fits >= evict_tokens and dense fits < dense_failed_at, so the ratio of capacities is at least:
        "evict_vs_dense_at_least": evict_ok / dense_bad if dense_bad else None,
        "evict_projected_tokens": projected,
    }
    return rows, summary


def _longest(fits: Callable[[int], bool], first: int, cap: int, step: int,
             deadline: float) -> tuple[int, int | None, bool]:
    """Longest length (<= ``cap``) for which ``fits(length)`` holds: doubling from ``first`` until a try fails or
    ``cap`` fits, then bisecting down to ``step``. No try starts after ``time.perf_counter()`` passes ``deadline``.

    Returns ``(longest that fitted (0: none), shortest that failed (None: none), whether the search finished)``.
    """
    ok, bad, length = 0, None, min(first, cap)
    while bad is None and ok < cap:
        if time.perf_counter() > deadline:
            return ok, bad, False
        if fits(length):
            ok, length = length, min(2 * length, cap)
        else:
            bad = length
    while bad is not None and bad - ok > step:
        if time.perf_counter() > deadline:
            return ok, bad, False
        mid = ok + max(step, (bad - ok) // 2 // step * step)
        if fits(mid):
            ok = mid
        else:
            bad = mid
    return ok, bad, True


def _oom_note(error: BaseException) -> str:
    return f"out of memory: {str(error).splitlines()[0][:200]}"


def _evict_try(model, predictor: ScorePredictor, ratio: float, length: int, chunk: int) -> tuple[Row, Measurement]:
    """A real evicting prefill of ``length`` random tokens (batch 1, protected prefix 16): its row and measurement."""
    ids = torch.randint(10, model.config.vocab_size, (1, length), device=model.device)
    cache = KVzipCache(model)
    row = Row("capacity-evict", length, 1, ratio)
    try:
        with _measured() as m:
            cache.prefill(model, ids, context_start=16, chunk_size=chunk, predictor=predictor, ratio=ratio)
        row.fits, row.kv_gb = True, (cache.kv_bytes() + cache.metadata_bytes()) / GB
    except torch.cuda.OutOfMemoryError as error:
        row.fits = False
        row.notes.append(_oom_note(error))
    row.prefill_s, row.peak_prefill_gb = m.seconds, m.peak_gb
    return row, m


def _dense_try(model, length: int, chunk: int, kind: str, real: bool) -> Row:
    """One dense prefill of ``length`` random tokens (batch 1) into a plain KVzipCache (``kind="kvzip"``) or into a
    DynamicCache with SDPA attention (``"dynamic"``).

    ``real``: the whole chunked prefill. Otherwise a stand-in for it: every layer is given the keys and values of the
    first ``fill`` tokens (random, through `Cache.update`), and only the prefill's last chunk ``[fill, length)`` runs,
    for real. A dense prefill's memory only grows, and its last chunk holds the most KV, attends over the most keys
    and makes the largest transient copies (a growing layer's concatenation, SDPA's mask and GQA copies), so the last
    chunk's peak is the prefill's peak; the earlier chunks cost time (their attention grows with the square of the
    length), not memory. The stand-in's fresh tensors fragment the allocator less than a real prefill's growing
    layers do, so it can only overstate the dense capacity: the comparison favours the dense cache.
    """
    from transformers import DynamicCache

    config = model.config
    ids = torch.randint(10, config.vocab_size, (1, length), device=model.device)
    mask = torch.ones_like(ids)
    fill = 0 if real else (length - 1) // chunk * chunk  # where a chunked prefill's last chunk starts
    row = Row("capacity-dense", length, 1, notes=[f"{kind} cache, " + (
        "real prefill" if real else f"stand-in: {fill} random cached tokens, then the last {length - fill} for real")])
    model.set_attn_implementation("kvzip" if kind == "kvzip" else "sdpa")
    cache = KVzipCache(model) if kind == "kvzip" else DynamicCache(config=config)
    try:
        with _measured() as m:
            if real and kind == "kvzip":
                cache.prefill(model, ids, context_start=16, chunk_size=chunk)
            else:
                if fill:
                    _fill_dense(cache, config, fill, model.dtype, model.device)
                _chunked_forward(model, cache, ids, mask, chunk, start=fill)
        row.fits, row.kv_gb = True, kv_bytes_per_token(config, model.dtype.itemsize) * length / GB
    except torch.cuda.OutOfMemoryError as error:
        row.fits = False
        row.notes.append(_oom_note(error))
    finally:
        model.set_attn_implementation("kvzip")
    row.peak_prefill_gb = m.peak_gb
    if real:
        row.prefill_s = m.seconds
    else:
        row.notes.append(f"{m.seconds:.1f}s")
    return row


def _fill_dense(cache, config, length: int, dtype: torch.dtype, device) -> None:
    """Give every layer of ``cache`` the keys and values of ``length`` tokens (batch 1, random), via `Cache.update`."""
    num_heads, head_dim = kv_shape(config)
    for idx in range(config.num_hidden_layers):
        keys = torch.randn(1, num_heads, length, head_dim, dtype=dtype, device=device)
        cache.update(keys, torch.randn_like(keys), idx)
        del keys


def run_capacity(args) -> dict:
    """``--capacity``: `capacity_rows` for the model on one GPU, within ``--capacity-budget`` seconds (loading
    included); the result record with a ``"capacity"`` summary."""
    began = time.perf_counter()
    device = "cuda"
    dtype = getattr(torch, args.dtype)
    model = load_model(args.model, dtype, device, max_positions=args.capacity_max + args.prefill_chunk)
    model.set_attn_implementation("kvzip")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device)
    predictor = ScorePredictor.init(model, args.predictor or "mlp", seed=0).to(device)
    _warm_up_predictor(model, predictor, device)
    ratio = min(args.ratios)
    print(f"weights {weight_bytes / GB:.1f} GB; capacity search: {args.capacity_dense} dense cache vs eviction at "
          f"ratio {ratio:g} ({predictor.kind} predictor), up to {args.capacity_max} tokens", flush=True)
    rows, summary = capacity_rows(model, predictor, ratio, cap=args.capacity_max, chunk=args.prefill_chunk,
                                  budget_s=args.capacity_budget - (time.perf_counter() - began),
                                  dense=args.capacity_dense)
    print(_capacity_summary(summary), flush=True)
    result = result_record(args, weight_bytes, bandwidth, rows)
    result["capacity"] = summary
    return result


def result_record(args, weight_bytes: int, bandwidth: float, rows: list[Row]) -> dict:
    """What a benchmark run writes to its JSON: the machine, the model, the bandwidth and every row."""
    return {
        "machine": _machine(),
        "model": args.model,
        "dtype": args.dtype,
        "weights_gb": weight_bytes / GB,
        "copy_bandwidth_tbps": bandwidth / 1e12,
        "rows": [asdict(r) for r in rows],
    }


class _NoTemplateTokenizer:
    """Random-weight shapes have no tokenizer; reconstruction prompts only need some fixed token ids."""

    chat_template = None
    bos_token_id = None

    def encode(self, text, add_special_tokens=False):
        return [10 + (ord(ch) % 1000) for ch in text]


def _line(row: Row) -> str:
    return (f"{row.method:8} ctx {row.context:>6} b {row.batch} r {row.ratio:.1f}: prefill {row.prefill_s:6.2f}s "
            f"compress {row.compress_s:6.2f}s decode {row.decode_ms:6.1f} ms gen {row.generate_ms:6.1f} ms "
            f"floor {row.floor_ms:5.1f} ms KV {row.kv_gb:6.2f} GB peaks {row.peak_prefill_gb:.1f}/"
            f"{row.peak_compress_gb:.1f}/{row.peak_decode_gb:.1f} GB kernel {row.kernel_gbps:6.0f} GB/s")


def _predictor_line(row: Row) -> str:
    head = f"{row.method:11} ctx {row.context:>6} b {row.batch} r {row.ratio:.1f}:"
    if row.method == "kvzip-pred":
        return (f"{head} plain prefill {row.prefill_s:6.2f}s, predicted compress {row.compress_s:6.3f}s = "
                f"{100 * row.compress_s / row.prefill_s:.1f}% of it; peaks {row.peak_prefill_gb:.1f}/"
                f"{row.peak_compress_gb:.1f} GB; KV {row.kv_gb:.2f} GB; {'; '.join(row.notes)}")
    return (f"{head} evicting prefill {row.prefill_s:6.2f}s = {row.prefill_s / row.plain_prefill_s:.2f}x plain "
            f"({row.plain_prefill_s:.2f}s), {row.prefill_s / row.dynamic_prefill_s:.2f}x DynamicCache; peak "
            f"{row.peak_prefill_gb:.1f} GB, bound {row.bound_gb:.1f} GB (one chunk {row.chunk_gb:.2f} GB); "
            f"KV {row.kv_gb:.2f} GB; {'; '.join(row.notes)}")


def _capacity_line(row: Row) -> str:
    prefill = f"prefill {row.prefill_s:6.1f}s, " if row.prefill_s == row.prefill_s else ""  # stand-ins: in the notes
    bound = f" (bound {row.bound_gb:.1f})" if row.bound_gb == row.bound_gb else ""
    return (f"{row.method:14} ctx {row.context:>7} r {row.ratio:.1f}: {'fits' if row.fits else 'DOES NOT FIT'}, "
            f"{prefill}peak {row.peak_prefill_gb:6.1f} GB{bound}, KV {row.kv_gb:6.2f} GB; {'; '.join(row.notes)}")


def _capacity_summary(c: dict) -> str:
    def side(ok: int, bad: int | None, done: bool) -> str:
        upper = f"; {bad} did not" if bad else ""
        return f"{ok} tokens fit{upper}{'' if done else ' (search cut by the budget)'}"

    ratio, projected, dense_bad = c["evict_vs_dense_at_least"], c["evict_projected_tokens"], c["dense_failed_at"]
    projection = "n/a" if projected is None else f"~{projected} tokens"
    if projected is not None and dense_bad:
        projection += f" = {projected / dense_bad:.1f}x the shortest dense context that did not fit"
    dense = side(c["dense_tokens"], dense_bad, c["dense_search_complete"])
    evict = side(c["evict_tokens"], c["evict_failed_at"], c["evict_search_complete"])
    return (f"capacity: dense ({c['dense_cache']}) {dense}; eviction at ratio {c['ratio']:g} ({c['predictor']}) {evict}"
            f"{' (the cap)' if c['evict_tokens'] == c['cap'] else ''}; eviction / dense >= "
            f"{'n/a' if ratio is None else f'{ratio:.2f}'}; memory-only projection for eviction: {projection} "
            f"(not run); {c['seconds']:.0f}s")


def _machine() -> dict:
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, check=True).stdout.strip()
        except Exception:  # noqa: BLE001 - not a checkout
            return "unknown"

    import transformers

    return {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        # The device copy of a checkout has no .git: scripts/gpu_check.sh passes the commit in KVZIP_COMMIT.
        "commit": os.environ.get("KVZIP_COMMIT") or git("rev-parse", "--short", "HEAD"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _header(result: dict, title: str) -> list[str]:
    m = result["machine"]
    return [
        f"# {title}: {result['model']} ({result['dtype']}) on {m['gpu']}",
        "",
        f"torch {m['torch']}, transformers {m['transformers']}, commit {m['commit']}, {m['date']}. Weights "
        f"{result['weights_gb']:.1f} GB, measured copy bandwidth {result['copy_bandwidth_tbps']:.2f} TB/s.",
        "",
    ]


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    lines = _header(result, "Benchmark") + [
        "| method | context | batch | ratio | prefill s | scoring s | compress s | decode ms/tok | generate ms/tok "
        "| floor ms | KV GB | peak prefill GB | peak compress GB | peak decode GB | kernel GB/s | kernel % of copy BW "
        "| notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    bw = result["copy_bandwidth_tbps"] * 1e3
    for r in result["rows"]:
        pct = r["kernel_gbps"] / bw * 100 if r["kernel_gbps"] == r["kernel_gbps"] else float("nan")
        lines.append(
            f"| {r['method']} | {r['context']} | {r['batch']} | {r['ratio']:.1f} | {r['prefill_s']:.2f} | "
            f"{r['scoring_s']:.2f} | {r['compress_s']:.2f} | {r['decode_ms']:.1f} | {r['generate_ms']:.1f} | "
            f"{r['floor_ms']:.1f} | {r['kv_gb']:.2f} | {r['peak_prefill_gb']:.1f} | {r['peak_compress_gb']:.1f} | "
            f"{r['peak_decode_gb']:.1f} | {r['kernel_gbps']:.0f} | {pct:.0f} | {'; '.join(r['notes'])} |"
        )
    predicted = [r for r in result["rows"] if r["method"] in ("kvzip-pred", "kvzip-evict")]
    if predicted:
        lines += [
            "",
            "## Score predictor (random weights): predicted compress, prefill with eviction",
            "",
            "kvzip-pred: a plain prefill, then `compress(predictor=p)` (prefill s is the plain prefill's). "
            "kvzip-evict: `prefill(predictor=p, ratio=r)`; bound = GB allocated before it + ratio x full KV + one "
            "chunk (the peak of a plain one-chunk prefill above what was allocated before it: activations plus the "
            "chunk's KV).",
            "",
            "| method | context | batch | ratio | prefill s | x plain prefill | x DynamicCache prefill | compress s "
            "| compress % of prefill | KV GB | peak prefill GB | peak compress GB | bound GB | one chunk GB | notes |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in predicted:
            lines.append(
                f"| {r['method']} | {r['context']} | {r['batch']} | {r['ratio']:.1f} | {r['prefill_s']:.2f} | "
                f"{r['prefill_s'] / r['plain_prefill_s']:.2f} | {r['prefill_s'] / r['dynamic_prefill_s']:.2f} | "
                f"{r['compress_s']:.3f} | {100 * r['compress_s'] / r['prefill_s']:.1f} | {r['kv_gb']:.2f} | "
                f"{r['peak_prefill_gb']:.1f} | {r['peak_compress_gb']:.1f} | {r['bound_gb']:.1f} | "
                f"{r['chunk_gb']:.2f} | {'; '.join(r['notes'])} |"
            )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    try:
        _plot(result, out / "decode.png")
    except ImportError:
        print("matplotlib is not installed: no plot")


def write_capacity_report(result: dict, out: Path) -> None:
    """``capacity.json`` and ``capacity.md`` (the summary line and one table row per try) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.json").write_text(json.dumps(result, indent=2))
    lines = _header(result, "Prefill capacity") + [
        _capacity_summary(result["capacity"]),
        "",
        "| method | context | ratio | fits | prefill s | peak GB | bound GB | KV GB | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['context']} | {r['ratio']:.1f} | {'yes' if r['fits'] else 'no'} | "
            f"{r['prefill_s']:.1f} | {r['peak_prefill_gb']:.1f} | {r['bound_gb']:.1f} | {r['kv_gb']:.2f} | "
            f"{'; '.join(r['notes'])} |"
        )
    (out / "capacity.md").write_text("\n".join(lines) + "\n")


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[tuple, list] = {}
    for r in result["rows"]:
        if r["batch"] != 1:
            continue
        key = (r["method"], r["ratio"])
        series.setdefault(key, []).append((r["context"], r["decode_ms"], r["kv_gb"]))
    for (method, ratio), points in sorted(series.items()):
        points.sort()
        label = {"dynamic": "DynamicCache + SDPA", "kvzip-pred": f"KVzip predicted, ratio {ratio:g}",
                 "kvzip-evict": f"KVzip evicting prefill, ratio {ratio:g}"}.get(method, f"KVzip ratio {ratio:g}")
        ax1.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax2.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=label)
    for ax, title in ((ax1, "decode ms/token (batch 1)"), (ax2, "KV cache GB (batch 1)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax1.legend()
    fig.suptitle(f"{result['model']} on {result['machine']['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3.1-8b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.5, 0.3])
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--prefill-chunk", type=int, default=16384)
    parser.add_argument("--score-chunk", type=int, default=2048)
    parser.add_argument("--check-tokens", type=int, default=16, help="greedy tokens compared at ratio 1.0 (0: skip)")
    parser.add_argument("--generate", action="store_true", help="also time model.generate at batch 1")
    parser.add_argument("--compiled", action="store_true",
                        help="compiled decoding instead: StaticCache + torch.compile vs a static KVzip cache "
                             "(kvzip_cache.bench_compiled)")
    parser.add_argument("--predictor", choices=PREDICTOR_KINDS, default=None,
                        help="also the rows of a score predictor of this kind (random weights): predicted compress "
                             "and prefill with eviction (see predictor_rows)")
    parser.add_argument("--capacity", action="store_true",
                        help="instead: the longest context one GPU prefills, dense vs evicting at the smallest "
                             "--ratios (predictor: --predictor, default mlp); writes capacity.json, capacity.md")
    parser.add_argument("--capacity-max", type=int, default=1 << 20, help="longest context a capacity try uses")
    parser.add_argument("--capacity-budget", type=float, default=420.0,
                        help="seconds for the whole capacity run, loading included: no try starts after them")
    parser.add_argument("--capacity-dense", choices=("kvzip", "dynamic"), default="kvzip",
                        help="the dense cache of the capacity run: a plain KVzipCache or DynamicCache + SDPA")
    parser.add_argument("--shared", type=int, nargs="+", default=None, metavar="QUESTIONS",
                        help="instead: QUESTIONS questions about one context decoded together (compiled), against "
                             "one question, per-row context reads and sequential questions "
                             "(kvzip_cache.bench_shared); writes shared.json, shared.md")
    parser.add_argument("--compile-reuse", action="store_true",
                        help="with --shared: also time the first generate on a second document of the same bucket")
    parser.add_argument("--decode-eviction", nargs="+", choices=("off", "on"), default=None, metavar="MODE",
                        help="instead: long answers of --new-tokens tokens after a context compressed to the smallest "
                             "--ratios, without (off) and with (on) evict_while_decoding at that ratio "
                             "(kvzip_cache.bench_decode); writes decode_eviction_<mode>.json, decode_eviction.md/.png")
    parser.add_argument("--new-tokens", type=int, default=8192, help="with --decode-eviction: tokens generated")
    parser.add_argument("--window", type=int, default=128, help="with --decode-eviction: evict_while_decoding's window")
    parser.add_argument("--repeats", type=int, default=1,
                        help="with --decode-eviction: run the modes alternately this many times on one context")
    parser.add_argument("--sample-every", type=int, default=256,
                        help="with --decode-eviction: generated tokens between two KV memory samples")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs a CUDA GPU")
    if args.capacity:
        write_capacity_report(run_capacity(args), args.out)
        print(f"wrote {args.out}/capacity.json, capacity.md")
        return
    if args.decode_eviction:
        from .bench_decode import run_decode, write_decode_report

        run_decode(args)
        write_decode_report(args.out)
        print(f"wrote {args.out}/decode_eviction_<mode>.json, decode_eviction.md, decode_eviction.png")
        return
    if args.shared:
        from .bench_shared import run_shared, write_shared_report

        write_shared_report(run_shared(args), args.out)
        print(f"wrote {args.out}/shared.json, shared.md")
        return
    if args.compiled:
        from .bench_compiled import run_compiled, write_compiled_report

        write_compiled_report(run_compiled(args), args.out)
        print(f"wrote {args.out}/compiled.json, compiled.md")
        return
    result = run(args)
    write_report(result, args.out)
    print(f"wrote {args.out}/results.json, report.md, decode.png")


if __name__ == "__main__":
    main()

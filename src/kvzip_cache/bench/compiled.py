"""Compiled decoding benchmark: CUDA-graph decode steps with a static KVzip cache against HF's StaticCache.

    python -m kvzip_cache.bench --compiled --contexts 32768 131072 --batches 1 8 --ratios 0.3 --out DIR

For every (context, batch) that fits, one row per method, decode ms/token measured the same way (median of
``--decode-steps`` one-token forward steps after warm-up, CUDA events; no padding):

- ``dynamic-eager``: `DynamicCache` + SDPA, eager (transformers' default);
- ``static-compiled``: `StaticCache` + SDPA, ``torch.compile(model.forward, mode="reduce-overhead")`` (the fastest
  HF-native decoding: CUDA graphs);
- ``quantized-fp8-eager``: transformers' own `QuantizedCache(backend="fp8")` on the full context (per-tensor fp8,
  dequantized whole at every step), eager, where the installed transformers has it;
- ``kvzip-eager``: `KVzipCache` compressed to ``ratio``, eager;
- ``kvzip-compiled``: the same cache after `KVzipCache.make_static`, the same compiled forward as StaticCache;
- ``kvzip-fp8-eager`` / ``kvzip-fp8-compiled``: the same with the kept pairs stored in fp8
  (``compress(..., kv_dtype="fp8")``), when ``--kv-dtypes`` includes ``fp8``.

Beside each: the physical floor ``(weight bytes + KV bytes read per step) / copy bandwidth``. For KVzip it also
checks that greedy tokens from the compiled static cache equal those of the eager compressed cache, and times
``model.generate`` with the static cache (transformers compiles its decode steps itself).
"""

from __future__ import annotations

import gc
import json
import time

import torch

from ..cache import KVzipCache
from ..compat import cache_kwarg
from .common import (GB, NoTemplateTokenizer, Row, compiled_forward, copy_bandwidth, cudagraph_skips, generate_ms,
                     load_model, skip_note,
                     question_step, random_context, result_record, timed_steps)


def _prefill_static(model, cache, ids: torch.Tensor, chunk: int) -> None:
    kwarg = cache_kwarg(model)
    with torch.no_grad():
        for lo in range(0, ids.shape[1], chunk):
            hi = min(lo + chunk, ids.shape[1])
            model(input_ids=ids[:, lo:hi], position_ids=torch.arange(lo, hi, device=ids.device)[None].expand(
                ids.shape[0], -1), use_cache=True, logits_to_keep=1, **{kwarg: cache})


def _fp8_quantized_cache(config):
    """transformers' `QuantizedCache(backend="fp8")` for ``config``, or None where the installed version lacks it."""
    try:
        from transformers import QuantizedCache

        return QuantizedCache("fp8", config)
    except (ImportError, ValueError, TypeError):
        return None


def run_compiled(args) -> dict:
    from transformers import DynamicCache, StaticCache

    device = "cuda"
    dtype = getattr(torch, args.dtype)
    model = load_model(args.model, dtype, device)
    config = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype.itemsize
    capacity = torch.cuda.get_device_properties(0).total_memory
    steps, room = args.decode_steps, args.question_tokens + args.decode_steps + 8
    rows: list[Row] = []
    torch._dynamo.config.cache_size_limit = 64

    def floor(kv_bytes: float) -> float:
        return (weight_bytes + kv_bytes) / bandwidth * 1e3

    def record(row: Row) -> None:
        rows.append(row)
        print(f"{row.method:16} ctx {row.context:>6} b {row.batch} r {row.ratio:.1f}: decode {row.decode_ms:6.2f} ms "
              f"(floor {row.floor_ms:5.2f}) generate {row.generate_ms:6.2f} ms KV {row.kv_gb:6.2f} GB "
              f"peak {row.peak_decode_gb:5.1f} GB compile {row.compile_s:5.1f}s {'; '.join(row.notes)}", flush=True)

    for context in args.contexts:
        for batch in args.batches:
            need = weight_bytes + 1.3 * kv_per_token * (context + room) * batch
            if need > 0.92 * capacity:
                print(f"skip context {context} x batch {batch}: a full cache needs ~{need / GB:.0f} GB")
                continue
            ids, _ = random_context(batch, context, config.vocab_size, device, padded=False)
            ask = torch.randint(10, config.vocab_size, (batch, args.question_tokens), device=device)
            start = context + args.question_tokens

            # ---- baselines on the full cache: eager DynamicCache, compiled StaticCache, transformers' fp8 cache
            model.set_attn_implementation("sdpa")
            baselines = getattr(args, "baselines", None) or ["dynamic-eager", "static-compiled"] + (
                ["quantized-fp8-eager"] if "fp8" in (getattr(args, "kv_dtypes", None) or []) else [])
            for method in baselines:
                compiled, quantized = method == "static-compiled", method == "quantized-fp8-eager"
                cache = (StaticCache(config=config, max_cache_len=context + room) if compiled
                         else _fp8_quantized_cache(config) if quantized else DynamicCache(config=config))
                if cache is None:
                    print(f"skip {method}: this transformers has no QuantizedCache(backend='fp8')")
                    continue
                _prefill_static(model, cache, ids, args.prefill_chunk)
                token, position = question_step(model, cache, ask, context)
                forward = compiled_forward(model) if compiled else model
                token_bytes = kv_per_token // dtype.itemsize if quantized else kv_per_token  # fp8: 1 byte an element
                row = Row(method, context, batch, kv_gb=token_bytes * context * batch / GB)
                began, skips = time.perf_counter(), cudagraph_skips()
                timed_steps(forward, model, cache, token, position, 1, warmup=2)  # compile + record the graph
                row.compile_s = time.perf_counter() - began if compiled else float("nan")
                torch.cuda.reset_peak_memory_stats()
                row.decode_ms, _ = timed_steps(forward, model, cache, token, position + 3, steps)
                row.notes += skip_note(skips)
                row.peak_decode_gb = torch.cuda.max_memory_allocated() / GB
                row.floor_ms = floor(token_bytes * (context + room) * batch)
                record(row)
                del cache, forward
                gc.collect()
                torch.cuda.empty_cache()

            # ---- KVzip: eager compressed cache, then the same cache made static and compiled; per storage type
            model.set_attn_implementation("kvzip")
            for kv_dtype in getattr(args, "kv_dtypes", None) or ["model"]:
                _kvzip_rows(args, model, ids, ask, context, batch, room, steps, floor, record,
                            None if kv_dtype == "model" else kv_dtype)
    return result_record(args, weight_bytes, bandwidth, rows)


def _kvzip_rows(args, model, ids, ask, context: int, batch: int, room: int, steps: int, floor, record,
                kv_dtype: str | None) -> None:
    """The eager rows of every ratio and the compiled row of the last one, the kept pairs stored as ``kv_dtype``."""
    name = "kvzip" if kv_dtype is None else f"kvzip-{kv_dtype}"
    cache = KVzipCache(model)
    cache.prefill(model, ids, context_start=16, chunk_size=args.prefill_chunk)
    for ratio in args.ratios:
        cache.compress(model, ratio, tokenizer=NoTemplateTokenizer(), chunk_size=args.score_chunk,
                       kv_dtype=kv_dtype)
        kept_kv = cache.kv_bytes()
        token, position = question_step(model, cache, ask, context)
        row = Row(f"{name}-eager", context, batch, ratio, kv_gb=kept_kv / GB)
        torch.cuda.reset_peak_memory_stats()
        row.decode_ms, eager_tokens = timed_steps(model, model, cache, token, position, steps, warmup=0)
        row.peak_decode_gb = torch.cuda.max_memory_allocated() / GB
        row.floor_ms = floor(kept_kv)
        record(row)
        cache.rollback()

    cache.make_static(room)
    token, position = question_step(model, cache, ask, context)
    forward = compiled_forward(model)
    row = Row(f"{name}-compiled", context, batch, args.ratios[-1], kv_gb=cache.kv_bytes() / GB)
    began, skips = time.perf_counter(), cudagraph_skips()
    _, warm_tokens = timed_steps(forward, model, cache, token, position, 1, warmup=2)
    row.compile_s = time.perf_counter() - began
    cache.rollback()
    token, position = question_step(model, cache, ask, context)
    torch.cuda.reset_peak_memory_stats()
    row.decode_ms, compiled_tokens = timed_steps(forward, model, cache, token, position, steps, warmup=0)
    row.peak_decode_gb = torch.cuda.max_memory_allocated() / GB
    row.floor_ms = floor(cache.kv_bytes())
    same = torch.cat(compiled_tokens, 1) == torch.cat(eager_tokens, 1)
    first = int((~same.all(0)).nonzero()[0]) if not bool(same.all()) else same.shape[1]
    row.notes.append(f"greedy vs eager KVzip: {first}/{same.shape[1]} leading tokens identical in all rows")
    row.notes += skip_note(skips)
    cache.rollback()
    try:
        # generate compiles its decode steps itself: the warm-up call inside pays the compilation
        if not getattr(args, "no_generate", False):
            row.generate_ms = generate_ms(model, cache, torch.cat([ids, ask], 1), None, steps, cache.rollback)
    except Exception as error:  # noqa: BLE001 - report, keep the other figures
        row.notes.append(f"generate failed: {type(error).__name__}: {error}"[:300])
    record(row)
    del cache, forward
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def write_compiled_report(result: dict, out) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compiled.json").write_text(json.dumps(result, indent=2))
    m = result["machine"]
    lines = [
        f"# Compiled decoding: {result['model']} ({result['dtype']}) on {m['gpu']}",
        "",
        f"torch {m['torch']}, transformers {m['transformers']}, commit {m['commit']}, {m['date']}. Weights "
        f"{result['weights_gb']:.1f} GB, copy bandwidth {result['copy_bandwidth_tbps']:.2f} TB/s.",
        "",
        "| method | context | batch | ratio | decode ms/tok | floor ms | x floor | generate ms/tok | KV GB "
        "| peak decode GB | compile s | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['context']} | {r['batch']} | {r['ratio']:.1f} | {r['decode_ms']:.2f} | "
            f"{r['floor_ms']:.2f} | {r['decode_ms'] / r['floor_ms']:.2f} | {r['generate_ms']:.2f} | {r['kv_gb']:.2f} | "
            f"{r['peak_decode_gb']:.1f} | {r['compile_s']:.1f} | {'; '.join(r['notes'])} |"
        )
    (out / "compiled.md").write_text("\n".join(lines) + "\n")

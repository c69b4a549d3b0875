"""Prefill, compress and decode of a model sharded over the visible GPUs (device_map="auto"), with peak memory per GPU.

    python scripts/bench_multi_gpu.py --contexts 32768 131072 --ratio 0.3 --out docs/benchmarks/h200x2

Random weights of the Llama-3.1-8B shape (speed and memory do not depend on trained weights), split evenly over the
GPUs by accelerate. Writes ``multi_gpu.json`` and ``multi_gpu.md`` under ``--out``; compare with the single-GPU
figures in docs/benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from accelerate import dispatch_model, infer_auto_device_map
from transformers import AutoConfig, AutoModelForCausalLM

import kvzip_cache  # noqa: F401  (registers "kvzip")
from kvzip_cache import KVzipCache
from kvzip_cache.bench import GB, SHAPES, NoTemplateTokenizer, machine_record
from kvzip_cache.compat import cache_kwarg


def peaks() -> list[float]:
    return [torch.cuda.max_memory_allocated(i) / GB for i in range(torch.cuda.device_count())]


def reset_peaks() -> None:
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)
        torch.cuda.reset_peak_memory_stats(i)


def load_sharded(shape: str, dtype: torch.dtype):
    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gpus = torch.cuda.device_count()
    per_gpu = sum(p.numel() * p.element_size() for p in empty.parameters()) / gpus * 1.05
    device_map = infer_auto_device_map(empty, max_memory={i: int(per_gpu) for i in range(gpus)},
                                       no_split_module_classes=["LlamaDecoderLayer", "Qwen2DecoderLayer"])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="kvzip")
    return dispatch_model(model.eval(), device_map=device_map), device_map


def decode_ms(model, cache, start: int, steps: int) -> float:
    kwarg, token, times = cache_kwarg(model), torch.full((1, 1), 11, device="cuda:0"), []
    for step in range(steps + 4):
        torch.cuda.synchronize()
        began = time.perf_counter()
        with torch.no_grad():
            model(input_ids=token, position_ids=torch.full((1, 1), start + step, device="cuda:0"), use_cache=True,
                  **{kwarg: cache})
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)
        if step >= 4:
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("bench_multi_gpu"))
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs at least 2 GPUs")
    model, device_map = load_sharded(args.shape, torch.bfloat16)
    rows = []
    for context in args.contexts:
        ids = torch.randint(10, model.config.vocab_size, (1, context), device="cuda:0")
        cache = KVzipCache(model)
        reset_peaks()
        began = time.perf_counter()
        cache.prefill(model, ids, context_start=16, chunk_size=16384)
        torch.cuda.synchronize()
        row = {"context": context, "prefill_s": time.perf_counter() - began, "peak_prefill_gb": peaks()}
        reset_peaks()
        began = time.perf_counter()
        cache.compress(model, args.ratio, tokenizer=NoTemplateTokenizer(), chunk_size=2048)
        torch.cuda.synchronize()
        row.update(compress_s=time.perf_counter() - began, peak_compress_gb=peaks())
        devices = sorted({str(layer.context.keys.device) for layer in cache.layers})
        reset_peaks()
        row.update(decode_ms=decode_ms(model, cache, context, args.decode_steps), peak_decode_gb=peaks(),
                   kv_gb=cache.kv_bytes() / GB, cache_devices=devices)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del cache
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine_record(), "shape": args.shape, "ratio": args.ratio,
              "device_map": {k: str(v) for k, v in device_map.items()}, "rows": rows}
    (args.out / "multi_gpu.json").write_text(json.dumps(result, indent=2))
    lines = ["| context | prefill s | compress s | decode ms/token | KV GB | peak GB per GPU: prefill / compress / "
             "decode |", "|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
        lines.append(f"| {r['context']} | {r['prefill_s']:.2f} | {r['compress_s']:.2f} | {r['decode_ms']:.1f} | "
                     f"{r['kv_gb']:.2f} | {fmt(r['peak_prefill_gb'])} / {fmt(r['peak_compress_gb'])} / "
                     f"{fmt(r['peak_decode_gb'])} |")
    (args.out / "multi_gpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Where a shared-context decode step spends its time: one question against R questions on one compressed context.

Issue #31 asks that 64 questions sharing a 32K context decode at <= 1.3x the single question's step. This script
builds the benchmark's 8B-shaped model (random weights), prefills a random context, keeps a random ``--ratio`` of each
head's pairs (the decode cost does not depend on which pairs), and for 1 and ``--questions`` rows
(`KVzipCache.inputs_for(..., shared=True)`):
- the compiled step (CUDA graphs, static cache with room for the question and ``--steps`` tokens), as
  ``python -m kvzip_cache.bench --shared`` times it, and the KV bytes split into the context and the rows' tails;
- a torch.profiler table of a few eager steps, and the CUDA time grouped into attention kernels, matrix products and
  the rest (the kernels are the same ones a CUDA graph replays).

    python scripts/profile_shared_step.py --context 32768 --questions 64 --out prof_shared   # CUDA only
    python scripts/profile_shared_step.py ... --backend triton-two-launch   # one decode path forced
    python scripts/profile_shared_step.py --context 1024 --questions 1 --kv-dtype fp8   # one row, fp8 kept pairs
"""

from __future__ import annotations

import argparse
import copy
import json
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kvzip_cache import KVzipCache
from kvzip_cache.backends import use_backend
from kvzip_cache.bench.common import GB, compiled_forward, load_model, question_step, timed_steps
from kvzip_cache.bench.shared import context_kv_bytes


def kernel_groups(prof) -> dict[str, float]:
    """CUDA ms of the profiled steps, by kind of kernel."""
    groups = {"attention (ragged split)": 0.0, "attention (tail + merge)": 0.0, "matmul": 0.0, "other": 0.0}
    for event in prof.key_averages():
        ms = getattr(event, "device_time_total", 0) / 1e3
        if event.device_type != torch.autograd.DeviceType.CUDA or ms == 0:
            continue
        name = event.key.lower()
        if "ragged_split" in name:
            groups["attention (ragged split)"] += ms
        elif "tail_merge" in name or "tail_split" in name or "merge_kernel" in name:  # either decode path
            groups["attention (tail + merge)"] += ms
        elif "gemm" in name or "gemv" in name or "cutlass" in name or "sm90" in name or "matmul" in name:
            groups["matmul"] += ms
        else:
            groups["other"] += ms
    return groups


def kernel_count(prof) -> int:
    """How many CUDA kernels the profiled steps ran."""
    return sum(event.count for event in prof.key_averages()
               if event.device_type == torch.autograd.DeviceType.CUDA and getattr(event, "device_time_total", 0) > 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3.1-8b")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("prof_shared"))
    parser.add_argument("--backend", default=None, help="an attention backend by name (e.g. triton-split-tail); "
                        "default: the device's own")
    parser.add_argument("--kv-dtype", default=None, help="fp8: store the kept pairs as float8; model (default): in the model's dtype")
    args = parser.parse_args()
    with use_backend(args.backend) if args.backend else nullcontext():
        profile_rows(args)


def profile_rows(args) -> None:
    """Profile 1 and ``args.questions`` rows (see the module docstring)."""
    args.out.mkdir(parents=True, exist_ok=True)
    torch._dynamo.config.cache_size_limit = 64
    model = load_model(args.model, torch.bfloat16, "cuda", max_positions=args.context + 4096)
    model.set_attn_implementation("kvzip")
    base = KVzipCache(model)
    base.prefill(model, torch.randint(10, model.config.vocab_size, (1, args.context), device="cuda"),
                 context_start=16, chunk_size=16384)
    base.evict(torch.rand(base.selectable_pairs().shape, device="cuda") < args.ratio,
               kv_dtype=None if args.kv_dtype in (None, "model") else args.kv_dtype)
    result = {"context": args.context, "ratio": args.ratio, "device": torch.cuda.get_device_name(),
              "backend": args.backend, "kv_dtype": args.kv_dtype, "rows": {}}
    steps_per_profile = 4
    for rows in dict.fromkeys((1, args.questions)):  # one pass when --questions 1
        ask = torch.randint(10, model.config.vocab_size, (rows, args.question_tokens), device="cuda")
        record = result["rows"][rows] = {}
        # a static copy (its rows stay through rollback); its eager steps run the kernels a CUDA graph replays
        cache = copy.deepcopy(base)
        cache.inputs_for(ask, shared=rows > 1)
        cache.make_static(args.question_tokens + args.steps + 8)
        record["kv_gb"], record["context_kv_gb"] = cache.kv_bytes() / GB, context_kv_bytes(cache) / GB
        token, position = question_step(model, cache, ask, args.context)
        timed_steps(model, model, cache, token, position, 2, warmup=0)  # the kernels' first calls
        cache.rollback()
        token, position = question_step(model, cache, ask, args.context)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            timed_steps(model, model, cache, token, position, steps_per_profile, warmup=0)
        cache.rollback()
        record["eager_cuda_ms_per_step"] = {k: v / steps_per_profile for k, v in kernel_groups(prof).items()}
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14)
        (args.out / f"rows{rows}_cuda_time.txt").write_text(table)
        print(f"== {rows} row(s): top kernels by CUDA time, {steps_per_profile} steps\n{table}", flush=True)
        # the compiled step
        forward = compiled_forward(model)
        token, position = question_step(model, cache, ask, args.context)
        timed_steps(forward, model, cache, token, position, 1, warmup=2)
        cache.rollback()
        token, position = question_step(model, cache, ask, args.context)
        record["compiled_step_ms"], _ = timed_steps(forward, model, cache, token, position, args.steps, warmup=0)
        cache.rollback()
        # the compiled step's own kernels (CUPTI records the kernels a CUDA graph replays): what inductor added
        token, position = question_step(model, cache, ask, args.context)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            timed_steps(forward, model, cache, token, position, steps_per_profile, warmup=0)
        record["compiled_cuda_ms_per_step"] = {k: v / steps_per_profile for k, v in kernel_groups(prof).items()}
        record["compiled_kernels_per_step"] = kernel_count(prof) / steps_per_profile
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        (args.out / f"rows{rows}_compiled_cuda_time.txt").write_text(table)
        print(f"== {rows} row(s), compiled: top kernels by CUDA time, {steps_per_profile} steps\n{table}", flush=True)
        print(f"{rows} row(s): compiled step {record['compiled_step_ms']:.2f} ms, KV {record['kv_gb']:.3f} GB "
              f"(context {record['context_kv_gb']:.3f}), eager CUDA ms/step {record['eager_cuda_ms_per_step']}, "
              f"compiled CUDA ms/step {record['compiled_cuda_ms_per_step']} "
              f"({record['compiled_kernels_per_step']:.0f} kernels)", flush=True)
        del cache, forward
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    one, many = result["rows"][1], result["rows"][args.questions]
    result["step_ratio"] = many["compiled_step_ms"] / one["compiled_step_ms"]
    result["context_kv_ratio"] = many["context_kv_gb"] / one["context_kv_gb"]
    print(json.dumps(result, indent=1))
    (args.out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

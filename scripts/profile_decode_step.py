"""Where an eager decode step of a compressed cache spends its time: bf16 kept pairs against fp8 kept pairs.

Issue #30 asks that eager decoding of fp8 pairs be no slower than bf16's. This script builds the benchmark's 8B-shaped
model (random weights), prefills a random context, keeps a random ``--ratio`` of each head's pairs (the decode cost
does not depend on which pairs), stores one copy in the model's dtype and one in fp8, and for each:
- the median eager step (CUDA events, as `kvzip_cache.bench`), alternating the two stores ``--rounds`` times;
- the host time of a step with no device sync inside it (what launches cost);
- a torch.profiler table of a few steps (self CPU time and CUDA time per op).

    python scripts/profile_decode_step.py --context 32768 --out prof_out   # CUDA only
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kvzip_cache import KVzipCache
from kvzip_cache.bench.common import load_model, question_step, random_context, timed_steps


def host_ms(model, cache, token, position, steps: int) -> float:
    """Median host time of a step: launching its kernels, no synchronisation inside the step."""
    times = []
    with torch.no_grad():
        for _ in range(steps):
            torch.cuda.synchronize()
            began = time.perf_counter()
            model(input_ids=token, position_ids=position, past_key_values=cache, logits_to_keep=1)
            times.append((time.perf_counter() - began) * 1e3)
            position = position + 1
    torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3.1-8b")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("prof_out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model, torch.bfloat16, "cuda")
    model.set_attn_implementation("kvzip")
    ids, _ = random_context(1, args.context, model.config.vocab_size, "cuda", padded=False)
    ask = torch.randint(10, model.config.vocab_size, (1, 32), device="cuda")
    plain = KVzipCache(model)
    plain.prefill(model, ids, context_start=16, chunk_size=16384)
    keep = torch.rand(plain.selectable_pairs().shape, device="cuda") < args.ratio
    fp8 = copy.deepcopy(plain)
    plain.evict(keep)
    fp8.evict(keep, kv_dtype="fp8")
    stores = {"bf16": plain, "fp8": fp8}
    result = {"context": args.context, "ratio": args.ratio, "device": torch.cuda.get_device_name(),
              "kv_gb": {name: cache.kv_bytes() / 1e9 for name, cache in stores.items()},
              "step_ms": {name: [] for name in stores}, "host_ms": {name: [] for name in stores}}
    for _ in range(args.rounds):
        for name, cache in stores.items():
            token, position = question_step(model, cache, ask, args.context)
            timed_steps(model, model, cache, token, position, 2, warmup=0)  # JIT specialisations of a decode step
            cache.rollback()
            token, position = question_step(model, cache, ask, args.context)
            ms, _ = timed_steps(model, model, cache, token, position, args.steps, warmup=1)
            result["step_ms"][name].append(ms)
            result["host_ms"][name].append(host_ms(model, cache, token, position + args.steps + 1, args.steps))
            cache.rollback()
    for name, cache in stores.items():
        token, position = question_step(model, cache, ask, args.context)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            timed_steps(model, model, cache, token, position, 4, warmup=0)
        cache.rollback()
        for key in ("self_cpu_time_total", "cuda_time_total"):
            table = prof.key_averages().table(sort_by=key, row_limit=18)
            (args.out / f"{name}_{key}.txt").write_text(table)
        print(f"== {name}: top ops by CUDA time\n" + prof.key_averages().table(sort_by="cuda_time_total",
                                                                                row_limit=10))
    print(json.dumps(result, indent=1))
    (args.out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

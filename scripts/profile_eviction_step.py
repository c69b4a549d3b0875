"""Where one eviction while decoding spends its time, on a static cache (issue #31's eviction step).

#31 asks that a compiled answer with eviction while decoding cost at most 1.1x one without. On an H100 the 8K-token
answer's evicting steps each took ~45 ms more than a steady step (63 of them: 0.35 ms a token). This script builds the
benchmark's 8B-shaped model (random weights), prefills a random ``--context`` and compresses it with a random-weight
predictor, turns on eviction while decoding (``level="pair-uniform"``, as a static tail needs), makes the cache static
and then, ``--repeats`` times: fills the tail eagerly to just past ``2 x window`` tokens, and times one
`KVzipCache.evict_between_steps` (what `generate`'s `eviction_criteria` runs between compiled steps), synchronised.

It reports the median wall time, the CUDA time the profiler saw, the number of kernel launches, of CUDA
synchronisations, of operators issued (those that compute apart from views) and of host reads (counted by wrapping
the calls that read a value, also on the CPU), and a cProfile of the library's functions (cumulative time: a
function that synchronises absorbs the device work queued before it).

    python scripts/profile_eviction_step.py --out evict_prof            # CUDA, the 8B shape
    python scripts/profile_eviction_step.py --tiny 32 --device cpu      # the host's share, on the CPU
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import json
import pstats
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import kvzip_cache
from kvzip_cache import KVzipCache
from kvzip_cache.bench.common import load_model
from kvzip_cache.scorers.predictor import ScorePredictor

# operators that only make a view (no kernel, no data read): counted apart from those that compute
VIEW_OPS = {"aten::slice", "aten::select", "aten::expand", "aten::view", "aten::transpose", "aten::unsqueeze",
            "aten::squeeze", "aten::as_strided", "aten::alias", "aten::permute", "aten::t", "aten::narrow",
            "aten::unbind", "aten::split", "aten::detach", "aten::lift_fresh", "aten::_unsafe_view", "aten::reshape",
            "aten::flatten"}
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync")


@contextlib.contextmanager
def counting_host_reads():
    """Count, while the block runs, the calls that bring a tensor's value to the host (``int()``, ``bool()``,
    ``float()``, ``.item()``, ``.tolist()``, ``torch.equal``): on a GPU each is a synchronisation, and so they can be
    counted on the CPU too. The methods are wrapped for the block only and restored after it."""
    counts: collections.Counter[str] = collections.Counter()
    names = ("item", "tolist", "__int__", "__bool__", "__float__")
    originals = {name: getattr(torch.Tensor, name) for name in names}
    original_equal = torch.equal

    def counted(name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)
        return wrapper

    try:
        for name, function in originals.items():
            setattr(torch.Tensor, name, counted(name, function))
        torch.equal = counted("equal", original_equal)
        yield counts
    finally:
        for name, function in originals.items():
            setattr(torch.Tensor, name, function)
        torch.equal = original_equal


def tiny_model(device: str, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    return LlamaForCausalLM(config).to(device).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fill_tail(model, cache: KVzipCache, tokens: int, device: str) -> None:
    """Roll the cache back to its context and append ``tokens`` random tokens in one eager forward (batch 1)."""
    cache.rollback()
    ids = torch.randint(10, model.config.vocab_size, (1, tokens), device=device)
    start = cache.context_length
    with torch.no_grad():
        model(input_ids=ids, position_ids=torch.arange(start, start + tokens, device=device)[None],
              past_key_values=cache, use_cache=True, logits_to_keep=1)
    sync(device)


def evictions(cache: KVzipCache) -> int:
    return len(cache.decode_eviction.history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3.1-8b")
    parser.add_argument("--tiny", type=int, default=0, metavar="LAYERS",
                        help="a small random Llama of this many layers instead (CPU runs: the host's share)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("evict_prof"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = args.device
    if args.tiny:
        model = tiny_model(device, args.tiny)
    else:
        model = load_model(args.model, torch.bfloat16, device, max_positions=args.context + 4096)
    model.set_attn_implementation("kvzip")
    predictor = ScorePredictor.init(model, "mlp", seed=0).to(device)
    ids = torch.randint(10, model.config.vocab_size, (1, args.context), device=device)
    cache = KVzipCache(model)
    cache.prefill(model, ids, context_start=16, chunk_size=8192)
    cache.compress(model, args.ratio, predictor=predictor)
    cache.evict_while_decoding(model, predictor, args.ratio, window=args.window, level="pair-uniform")
    cache.make_static(4 * args.window)
    fill = 2 * args.window + 3  # past the trigger: one window of the tail is due

    def one_eviction() -> float:
        fill_tail(model, cache, fill, device)
        before = evictions(cache)
        began = time.perf_counter()
        cache.evict_between_steps(1)
        sync(device)
        took = 1e3 * (time.perf_counter() - began)
        if evictions(cache) != before + 1:
            raise RuntimeError("the call did not evict: the tail was not due")
        return took

    for _ in range(2):  # first-call costs (allocator, Triton/JIT caches) outside the measurement
        one_eviction()
    wall = [one_eviction() for _ in range(args.repeats)]

    fill_tail(model, cache, fill, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        cache.evict_between_steps(1)
        sync(device)
    events = prof.key_averages()
    counts = {e.key: e.count for e in events}
    device_us = sum(getattr(e, "self_device_time_total", 0) for e in events if e.device_type.name == "CUDA")
    launches = sum(n for key, n in counts.items()
                   if key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    syncs = {key: counts[key] for key in SYNC_CALLS if key in counts}
    # operators the host issued (not those nested in another): what each costs a dispatch, and on CUDA a launch
    issued = [e.name for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
    computing = sum(1 for name in issued if name not in VIEW_OPS)
    (args.out / "ops_by_cpu.txt").write_text(events.table(sort_by="self_cpu_time_total", row_limit=30))
    if device == "cuda":
        (args.out / "ops_by_cuda.txt").write_text(events.table(sort_by="self_device_time_total", row_limit=20))

    fill_tail(model, cache, fill, device)
    with counting_host_reads() as host_reads:
        cache.evict_between_steps(1)
        sync(device)

    fill_tail(model, cache, fill, device)
    profiler = cProfile.Profile()
    profiler.enable()
    cache.evict_between_steps(1)
    sync(device)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive calls, total s, cumulative s, ..)}
    rows = sorted(((cum, total, calls, f"{Path(file).name}:{line}({name})")
                   for (file, line, name), (_, calls, total, cum, _) in stats.items() if "kvzip_cache" in file),
                  reverse=True)
    text = "cumulative ms | own ms | calls | function\n" + "\n".join(
        f"{1e3 * cum:9.2f} | {1e3 * total:7.2f} | {calls:5d} | {name}" for cum, total, calls, name in rows[:40])
    (args.out / "cprofile.txt").write_text(text + "\n")

    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "model": "tiny" if args.tiny
              else args.model, "library": str(Path(kvzip_cache.__file__).parent), "context": args.context,
              "ratio": args.ratio, "window": args.window,
              "layers": model.config.num_hidden_layers, "eviction_ms": wall, "median_ms": statistics.median(wall),
              "device_busy_ms": device_us / 1e3, "kernel_launches": launches, "syncs": syncs,
              "operators_issued": len(issued), "computing_operators": computing,
              "host_reads": sum(host_reads.values()), "host_reads_by_call": dict(host_reads)}
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "eviction_ms"}, indent=1))
    print(text)


if __name__ == "__main__":
    main()

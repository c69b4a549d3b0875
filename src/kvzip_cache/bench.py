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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import kvzip_cache  # noqa: F401  (registers "kvzip")
from kvzip_cache import KVzipCache
from kvzip_cache.compat import cache_kwarg

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
    notes: list[str] = field(default_factory=list)


def load_model(name: str, dtype: torch.dtype, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    if name in SHAPES:
        spec = dict(SHAPES[name])
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
    return torch.cuda.max_memory_allocated() / GB


def _reset_peak() -> None:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()


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


def warm_up(model, device: str) -> None:
    """Compile the Triton kernels and fill caches outside the measurements."""
    model.set_attn_implementation("kvzip")
    ids = torch.randint(10, 1000, (2, 2048), device=device)
    cache = KVzipCache(model)
    cache.prefill(model, ids, context_start=16, chunk_size=1024)
    cache.compress(model, 0.5, tokenizer=_NoTemplateTokenizer(), chunk_size=512)
    _decode_loop(model, cache, 2, 2048, 2, None)
    del cache
    torch.cuda.empty_cache()


def run(args) -> dict:
    device = "cuda"
    dtype = getattr(torch, args.dtype)
    model = load_model(args.model, dtype, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device)
    warm_up(model, device)
    print(f"weights {weight_bytes / GB:.1f} GB, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype.itemsize
    rows: list[Row] = []
    capacity = torch.cuda.get_device_properties(0).total_memory
    kwarg = cache_kwarg(model)
    for context in args.contexts:
        for batch in args.batches:
            need = weight_bytes + 2.3 * kv_per_token * context * batch
            if need > 0.92 * capacity:
                print(f"skip context {context} x batch {batch}: needs ~{need / GB:.0f} GB")
                continue
            padded = batch > 1
            ids, mask = _context(batch, context, config.vocab_size, device, padded)
            ask = torch.randint(10, config.vocab_size, (batch, args.question_tokens), device=device)
            full_ids, full_mask = torch.cat([ids, ask], 1), torch.cat([mask, torch.ones_like(ask)], 1)

            # ---- baseline: DynamicCache + SDPA
            from transformers import DynamicCache

            model.set_attn_implementation("sdpa")
            row = Row("dynamic", context, batch)
            cache = DynamicCache(config=config)
            _reset_peak()
            began = time.perf_counter()
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                for lo in range(0, context, args.prefill_chunk):
                    hi = min(lo + args.prefill_chunk, context)
                    model(input_ids=ids[:, lo:hi], attention_mask=mask[:, :hi], position_ids=positions[:, lo:hi],
                          use_cache=True, logits_to_keep=1, **{kwarg: cache})
            torch.cuda.synchronize()
            row.prefill_s = time.perf_counter() - began
            row.peak_prefill_gb = _peak_gb()
            row.kv_gb = kv_per_token * context * batch / GB
            _reset_peak()
            row.decode_ms = _decode_loop(model, cache, batch, context, args.decode_steps, mask if padded else None)
            row.peak_decode_gb = _peak_gb()
            back_to_context = lambda c=cache: c.crop(context - c.get_seq_length())  # noqa: E731
            back_to_context()
            if args.check_tokens > 0:
                reference_tokens = _greedy(model, cache, full_ids, full_mask, args.check_tokens)
                back_to_context()
            if batch > 1 or args.generate:
                row.generate_ms = _generate_ms(model, cache, full_ids, full_mask, args.decode_steps, back_to_context)
            row.floor_ms = (weight_bytes + kv_per_token * context * batch) / bandwidth * 1e3
            rows.append(row)
            print(_line(row))
            del cache
            torch.cuda.empty_cache()

            # ---- KVzip at each ratio, scored once, re-selected for smaller ratios
            model.set_attn_implementation("kvzip")
            cache = KVzipCache(model)
            _reset_peak()
            began = time.perf_counter()
            cache.prefill(model, ids, mask, context_start=torch.tensor([b * context // (4 * batch) if padded else 0
                                                                        for b in range(batch)], device=device) + 16,
                          chunk_size=args.prefill_chunk)
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
                _reset_peak()
                row.decode_ms = _decode_loop(model, cache, batch, context, args.decode_steps, mask if padded else None)
                row.peak_decode_gb = _peak_gb()
                cache.rollback()
                if batch > 1 or args.generate:
                    row.generate_ms = _generate_ms(model, cache, full_ids, full_mask, args.decode_steps, cache.rollback)
                row.floor_ms = (weight_bytes + cache.kv_bytes()) / bandwidth * 1e3
                row.kernel_gbps = kernel_bandwidth(cache, model, batch)
                rows.append(row)
                print(_line(row))
            del cache
            torch.cuda.empty_cache()
    return result_record(args, weight_bytes, bandwidth, rows)


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


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    m = result["machine"]
    lines = [
        f"# Benchmark: {result['model']} ({result['dtype']}) on {m['gpu']}",
        "",
        f"torch {m['torch']}, transformers {m['transformers']}, commit {m['commit']}, {m['date']}. Weights "
        f"{result['weights_gb']:.1f} GB, measured copy bandwidth {result['copy_bandwidth_tbps']:.2f} TB/s.",
        "",
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
    (out / "report.md").write_text("\n".join(lines) + "\n")
    try:
        _plot(result, out / "decode.png")
    except ImportError:
        print("matplotlib is not installed: no plot")


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
        label = "DynamicCache + SDPA" if method == "dynamic" else f"KVzip ratio {ratio:g}"
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
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs a CUDA GPU")
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

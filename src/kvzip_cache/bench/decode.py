"""The default benchmark: HF DynamicCache + SDPA against KVzipCache on a GPU (``python -m kvzip_cache.bench``).

For every (context length, batch) that fits, `run` measures the baseline and KVzip at each ratio: prefill time,
compress time, decode ms/token, KV GB, peak GPU GB and the ragged kernel's bandwidth (`kernel_bandwidth`); with
``--predictor`` also the rows of `kvzip_cache.bench.predictor.predictor_rows`. `write_report` writes
``results.json``, ``report.md`` and ``decode.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from kvzip_cache import KVzipCache, ScorePredictor

from .common import (GB, NoTemplateTokenizer, Row, chunked_forward, copy_bandwidth, decode_loop, free_memory,
                     generate_ms, greedy, kv_bytes_per_token, load_model, measured, peak_gb, random_context,
                     report_header, reset_peak, result_record, warm_up)
from .predictor import predictor_rows


def kernel_bandwidth(cache: KVzipCache, model, batch: int) -> float:
    """GB/s of retained KV read by the ragged context kernel on layer 0's kept pairs (decode, one token per row).

    Timed as CUDA-graph replays (triton.testing.do_bench_cudagraph), so it is the GPU's time, not Python's.
    """
    import triton

    from kvzip_cache.kernels import ragged_context_partials

    ctx = cache.layers[cache.compressible_layers[0]].context
    config = model.config
    group = config.num_attention_heads // config.num_key_value_heads
    query = torch.randn(batch, ctx.num_heads, group, ctx.keys.shape[-1], device=ctx.keys.device, dtype=ctx.dtype)
    src = torch.arange(batch, dtype=torch.int32, device=ctx.keys.device)
    ms = triton.testing.do_bench_cudagraph(
        lambda: ragged_context_partials(query, ctx.keys, ctx.values, ctx.cu_seqlens, src, ctx.max_seqlen,
                                        ctx.keys.shape[-1] ** -0.5, key_scales=ctx.key_scales,
                                        value_scales=ctx.value_scales),
        rep=50,
    )
    return ctx.kv_bytes() / (ms / 1e3) / GB


def run(args) -> dict:
    """The default benchmark's result record (see `result_record`) for the parsed command-line ``args`` (with
    ``--predictor``, the rows of `predictor_rows` too)."""
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
            ids, mask = random_context(batch, context, config.vocab_size, device, padded)
            starts = torch.tensor([b * context // (4 * batch) if padded else 0 for b in range(batch)],
                                  device=device) + 16
            ask = torch.randint(10, config.vocab_size, (batch, args.question_tokens), device=device)
            full_ids, full_mask = torch.cat([ids, ask], 1), torch.cat([mask, torch.ones_like(ask)], 1)

            # ---- baseline: DynamicCache + SDPA
            from transformers import DynamicCache

            model.set_attn_implementation("sdpa")
            row = Row("dynamic", context, batch)
            cache = DynamicCache(config=config)
            with measured() as m:
                chunked_forward(model, cache, ids, mask, args.prefill_chunk)
            row.prefill_s, row.peak_prefill_gb = m.seconds, m.peak_gb
            row.kv_gb = kv_per_token * context * batch / GB
            back_to_context = lambda c=cache: c.crop(context - c.get_seq_length())  # noqa: E731
            if decode:
                reset_peak()
                row.decode_ms = decode_loop(model, cache, batch, context, args.decode_steps, mask if padded else None)
                row.peak_decode_gb = peak_gb()
                back_to_context()
            if args.check_tokens > 0:
                reference_tokens = greedy(model, cache, full_ids, full_mask, args.check_tokens)
                back_to_context()
            if decode and (batch > 1 or args.generate):
                row.generate_ms = generate_ms(model, cache, full_ids, full_mask, args.decode_steps, back_to_context)
            row.floor_ms = (weight_bytes + kv_per_token * context * batch) / bandwidth * 1e3
            rows.append(row)
            print(_line(row))
            dynamic_prefill_s = row.prefill_s
            del cache, back_to_context  # the lambda holds the cache too: free it before the KVzip peaks are taken
            free_memory()

            # ---- KVzip at each ratio, scored once, re-selected for smaller ratios
            model.set_attn_implementation("kvzip")
            cache = KVzipCache(model)
            reset_peak()
            began = time.perf_counter()
            cache.prefill(model, ids, mask, context_start=starts, chunk_size=args.prefill_chunk)
            torch.cuda.synchronize()
            prefill_s, peak_prefill = time.perf_counter() - began, peak_gb()
            scoring_s = float("nan")
            for ratio in sorted(args.ratios, reverse=True):
                row = Row("kvzip", context, batch, ratio, prefill_s=prefill_s, peak_prefill_gb=peak_prefill)
                reset_peak()
                began = time.perf_counter()
                report = cache.compress(model, ratio, tokenizer=NoTemplateTokenizer(), chunk_size=args.score_chunk)
                torch.cuda.synchronize()
                row.compress_s = time.perf_counter() - began
                if scoring_s != scoring_s:  # first compress: scoring + eviction
                    scoring_s = row.compress_s
                row.scoring_s = scoring_s
                row.peak_compress_gb = peak_gb()
                row.kv_gb = (cache.kv_bytes() + cache.metadata_bytes()) / GB
                row.notes.append(f"achieved ratio {report.achieved_ratio:.3f}")
                if ratio == 1.0 and args.check_tokens > 0:  # greedy tokens against DynamicCache (bf16 kernels may break near-ties)
                    tokens = greedy(model, cache, full_ids, full_mask, args.check_tokens)
                    cache.rollback()
                    same = (tokens == reference_tokens).all(dim=0)
                    first = int((~same).nonzero()[0]) if not bool(same.all()) else len(same)
                    row.notes.append(f"greedy vs DynamicCache: {first}/{len(same)} leading tokens identical in all rows")
                if decode:
                    reset_peak()
                    row.decode_ms = decode_loop(model, cache, batch, context, args.decode_steps,
                                                 mask if padded else None)
                    row.peak_decode_gb = peak_gb()
                    cache.rollback()
                if decode and (batch > 1 or args.generate):
                    row.generate_ms = generate_ms(model, cache, full_ids, full_mask, args.decode_steps, cache.rollback)
                row.floor_ms = (weight_bytes + cache.kv_bytes()) / bandwidth * 1e3
                row.kernel_gbps = kernel_bandwidth(cache, model, batch)
                rows.append(row)
                print(_line(row))
            del cache
            free_memory()

            # ---- score predictor: predicted compress after a plain prefill, and eviction while prefilling
            if predictor is not None:
                for row in predictor_rows(model, predictor, ids, mask, starts, args.ratios, chunk=args.prefill_chunk,
                                          kv_per_token=kv_per_token, dynamic_prefill_s=dynamic_prefill_s,
                                          decode_steps=args.decode_steps, score_chunk=args.score_chunk):
                    if decode:
                        row.floor_ms = (weight_bytes + row.kv_gb * GB) / bandwidth * 1e3
                    rows.append(row)
    return result_record(args, weight_bytes, bandwidth, rows)


def _line(row: Row) -> str:
    return (f"{row.method:8} ctx {row.context:>6} b {row.batch} r {row.ratio:.1f}: prefill {row.prefill_s:6.2f}s "
            f"compress {row.compress_s:6.2f}s decode {row.decode_ms:6.1f} ms gen {row.generate_ms:6.1f} ms "
            f"floor {row.floor_ms:5.1f} ms KV {row.kv_gb:6.2f} GB peaks {row.peak_prefill_gb:.1f}/"
            f"{row.peak_compress_gb:.1f}/{row.peak_decode_gb:.1f} GB kernel {row.kernel_gbps:6.0f} GB/s")


def write_report(result: dict, out: Path) -> None:
    """``results.json``, ``report.md`` (with a score-predictor table when there are such rows) and ``decode.png``
    under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    lines = report_header(result, "Benchmark") + [
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
    predicted = [r for r in result["rows"] if r["method"] in ("kvzip-pred", "kvzip-evict", "kvzip-evict+kvzip")]
    if predicted:
        lines += [
            "",
            "## Score predictor (random weights): predicted compress, prefill with eviction",
            "",
            "kvzip-pred: a plain prefill, then `compress(predictor=p)` (prefill s is the plain prefill's). "
            "kvzip-evict: `prefill(predictor=p, ratio=r)`; bound = GB allocated before it + ratio x full KV + one "
            "chunk (the peak of a plain one-chunk prefill above what was allocated before it: activations plus the "
            "chunk's KV). kvzip-evict+kvzip: `prefill(predictor=p, ratio=min(1, 2r))` (its bound with 2r), then "
            "`compress(model, r, scorer=\"kvzip\")` on the survivors (compress s; peak compress GB).",
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
                 "kvzip-evict": f"KVzip evicting prefill, ratio {ratio:g}",
                 "kvzip-evict+kvzip": f"evicting prefill to {min(1.0, 2 * ratio):g} + KVzip, ratio {ratio:g}",
                 }.get(method, f"KVzip ratio {ratio:g}")
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

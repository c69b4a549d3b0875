"""Sweep launch configurations of the ragged context kernel on Llama-3.1-8B-shaped decode inputs (bf16 queries;
kept pairs in bf16, and in fp8 at ratio 0.3).

    python scripts/kernel_sweep.py            # prints GB/s of retained KV per config; the best per shape last
    python scripts/kernel_sweep.py --quick    # the same for one row at 32K and 128K, ratio 0.3, split factor 4
    python scripts/kernel_sweep.py --splits OUT.json   # one layer's whole decode attention (context splits, then
                                                        # tail + merge) against the number of splits
    python scripts/kernel_sweep.py --shared OUT.json   # 64 rows sharing 32K: the split kernel's launch configurations
                                                        # (query block, key block, stages, warps, splits)
    python scripts/kernel_sweep.py --fp8 OUT.json      # fp8 kept pairs: float16 against bf16 products, and the
                                                        # split kernel's launches, beside bf16 pairs
    python scripts/kernel_sweep.py --fp8 OUT.json --quick   # the same at the default launches (and register caps)

``--splits``: one decode step's attention of one layer at ratio 0.3, a static tail of 80 slots (40 written), for one
row at 32K and 128K and 64 shared rows at 32K (query blocks of 64 and 128 rows), bf16 and fp8 kept pairs: the split
kernel alone and split + merge, for the default split count and fixed ones. The merge reads every split's partial
result back, so more splits than the keys need cost the merge what they save the split kernel.

Per-head kept lengths are drawn around ratio x context (x0.3 .. x1.7), as pair-level selection gives unequal heads.
Times are CUDA-graph replays (triton.testing.do_bench_cudagraph), so they measure the GPU, not Python launches.
"""

import inspect
import itertools
import json
import sys

import torch
import triton

from kvzip_cache.kernels import ragged_attention_split_tail, ragged_attention_with_tail, ragged_context_partials
from kvzip_cache.kernels.ragged_attention import shared_launch
from kvzip_cache.storage import quantize_fp8

HEADS, GROUP, DIM = 8, 4, 128
# the split kernel's own launch defaults, for labelling rows that leave them to it
KERNEL_DEFAULTS = {name: p.default for name, p in inspect.signature(ragged_context_partials).parameters.items()
                   if name in ("block_n", "num_stages", "num_warps")}


def shape(context, ratio, batch, gen):
    lengths = (ratio * context * (0.3 + 1.4 * torch.rand(batch * HEADS, generator=gen))).long().clamp(min=1)
    total = int(lengths.sum())
    keys = torch.randn(total, DIM, device="cuda", dtype=torch.bfloat16)
    values = torch.randn(total, DIM, device="cuda", dtype=torch.bfloat16)
    cu = torch.zeros(batch * HEADS + 1, dtype=torch.int32, device="cuda")
    cu[1:] = lengths.cumsum(0).cuda()
    query = torch.randn(batch, HEADS, GROUP, DIM, device="cuda", dtype=torch.bfloat16)
    src = torch.arange(batch, dtype=torch.int32, device="cuda")
    return query, keys, values, cu, src, int(lengths.max())


def main(quick: bool = False):
    gen = torch.Generator().manual_seed(0)
    factors = [4] if quick else [2, 4, 8, 16]
    configs = list(itertools.product([32, 64, 128], [2, 3], [4, 8], factors))  # block_n, stages, warps, factor
    results = []
    for context, ratio, batch, pairs in itertools.product([32768, 131072], [1.0, 0.3], [1, 8], ["bf16", "fp8"]):
        if context * batch > 32768 * 8 or (pairs == "fp8" and ratio == 1.0):
            continue
        if quick and (ratio, batch) != (0.3, 1):
            continue
        query, keys, values, cu, src, max_len = shape(context, ratio, batch, gen)
        scales = {}
        if pairs == "fp8":  # the kept pairs as an fp8 store holds them
            (keys, key_scales), (values, value_scales) = quantize_fp8(keys), quantize_fp8(values)
            scales = {"key_scales": key_scales, "value_scales": value_scales}
        nbytes = keys.nbytes + values.nbytes + sum(t.nbytes for t in scales.values())
        best = None
        for block_n, stages, warps, factor in configs:
            fn = lambda: ragged_context_partials(query, keys, values, cu, src, max_len, 0.088, block_n=block_n,  # noqa: E731
                                                 num_stages=stages, num_warps=warps, split_factor=factor, **scales)
            try:
                ms = triton.testing.do_bench_cudagraph(fn, rep=20)
            except Exception as error:  # noqa: BLE001 - a config that does not fit (shared memory) is skipped
                print(f"  skip {block_n, stages, warps, factor}: {type(error).__name__}")
                continue
            gbps = nbytes / ms / 1e6
            results.append((context, ratio, batch, pairs, block_n, stages, warps, factor, ms, gbps))
            if best is None or gbps > best[-1]:
                best = (block_n, stages, warps, factor, ms, gbps)
        tail_k = torch.randn(batch, HEADS, 64, DIM, device="cuda", dtype=torch.bfloat16)
        block_n, stages, warps, factor = best[:4]
        full = lambda: ragged_attention_with_tail(query.reshape(batch, HEADS, GROUP, DIM), keys, values, cu, src,  # noqa: E731
                                                  max_len, tail_k, tail_k, None, 0.088, 1, block_n=block_n, **scales,
                                                  num_stages=stages, num_warps=warps, split_factor=factor)
        full_ms = triton.testing.do_bench_cudagraph(full, rep=20)
        print(f"ctx {context:>6} r {ratio} b {batch} {pairs}: {nbytes / 1e6:8.1f} MB  best block_n={best[0]} "
              f"stages={best[1]} warps={best[2]} factor={best[3]}: {best[4] * 1e3:7.1f} us {best[5]:6.0f} GB/s; "
              f"with tail+merge {full_ms * 1e3:7.1f} us {nbytes / full_ms / 1e6:6.0f} GB/s", flush=True)
    print("\nall configs (context, ratio, batch, pairs, block_n, stages, warps, factor, ms, GB/s):")
    for row in results:
        print(*row[:8], f"{row[8]:.4f}", f"{row[9]:.0f}")


def split_sweep(path: str) -> None:
    """Whole decode attention of one layer against the number of splits (see the module docstring)."""
    gen = torch.Generator().manual_seed(0)
    records = []
    configs = [(32768, 1, "bf16", 80, 40), (32768, 1, "fp8", 80, 40), (131072, 1, "bf16", 80, 40),
               (131072, 1, "fp8", 80, 40), (32768, 64, "bf16", 80, 40), (32768, 64, "fp8", 80, 40),
               (32768, 1, "bf16", 8256, 8200)]  # (context, rows, pairs, tail slots, written): last, a long answer
    for context, share, kv_dtype, tail_slots, written in configs:
        query, keys, values, cu, _, max_len = shape(context, 0.3, 1, gen)
        bucket = 1 << (context - 1).bit_length()  # what a static cache passes: its length bucket
        scales = {}
        if kv_dtype == "fp8":
            (keys, key_scales), (values, value_scales) = quantize_fp8(keys), quantize_fp8(values)
            scales = {"key_scales": key_scales, "value_scales": value_scales}
        query = torch.randn(share, HEADS, GROUP, DIM, device="cuda", dtype=torch.bfloat16)
        src = torch.zeros(share, dtype=torch.int32, device="cuda")
        tail = torch.randn(share, HEADS, tail_slots, DIM, device="cuda", dtype=torch.bfloat16)
        end = torch.tensor(written, device="cuda")
        stacked = query.reshape(1, share, HEADS, GROUP, DIM).transpose(1, 2).reshape(1, HEADS, share * GROUP, DIM)
        # (splits, query block, path): the two-launch path, then the split tail (kernels.split_tail)
        variants = [(splits, block_m, "two-launch") for splits in (None, 8, 16, 24, 33, 48, 66, 132)
                    for block_m in ([None, 128] if share > 1 else [None])]
        variants += [(splits, None, "split-tail") for splits in (None, 16, 33)]
        for splits, block_m, path in variants:
            kernel = ragged_attention_with_tail if path == "two-launch" else ragged_attention_split_tail
            whole = lambda: kernel(query, keys, values, cu, src, bucket, tail, tail, None, 0.088, 1,  # noqa: E731
                                   tail_end=end, share=share, num_splits=splits, context_block_m=block_m, **scales)
            launch = ({"block_m": block_m or 16} if block_m or share == 1 else  # the split kernel's own choice
                      shared_launch(share * GROUP, DIM, query.dtype, keys.dtype, query.device))
            split = lambda: ragged_context_partials(stacked, keys, values, cu, src[:1], bucket, 0.088,  # noqa: E731
                                                    **{**launch, "num_splits": splits}, **scales)
            parts = split()[0]
            whole_us = triton.testing.do_bench_cudagraph(whole, rep=30) * 1e3
            split_us = triton.testing.do_bench_cudagraph(split, rep=30) * 1e3
            record = {"context": context, "rows": share, "kv": kv_dtype, "tail": f"{written}/{tail_slots}",
                      "path": path, "splits": splits or "default", "used_splits": parts.shape[2],
                      "block_m": launch["block_m"],
                      "whole_us": round(whole_us, 1), "split_us": round(split_us, 1),
                      "merge_us": round(whole_us - split_us, 1), "kv_mb": round((keys.nbytes + values.nbytes) / 1e6, 1)}
            records.append(record)
            print(json.dumps(record), flush=True)
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "records": records}, f, indent=1)
    with open(path.removesuffix(".json") + ".md", "w") as f:
        f.write(split_table(records, torch.cuda.get_device_name()))


def split_table(records: list[dict], device: str) -> str:
    """The split sweep's records as a markdown table (microseconds per layer)."""
    lines = [f"# One layer's decode attention against the split count ({device})", "",
             "`python scripts/kernel_sweep.py --splits splits.json`: see the script's docstring. `split kernel us` is "
             "the context's split kernel alone; `rest us` is the whole path minus it (two-launch: the tail-and-merge "
             "kernel; split-tail: the tail's splits and the merge).", "",
             "| context | rows | pairs | tail (written/slots) | path | splits (used) | query block | split kernel us "
             "| rest us | whole us |", "|---:|---:|---|---|---|---|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['context']} | {r['rows']} | {r['kv']} | {r['tail']} | {r['path']} | {r['splits']} "
                     f"({r['used_splits']}) | {r['block_m']} | {r['split_us']} | {r['merge_us']} | {r['whole_us']} |")
    return "\n".join(lines) + "\n"


def shared_sweep(path: str, share: int = 64, context: int = 32768) -> None:
    """The context split kernel for ``share`` rows stacked on one context (``share`` x 4 query rows a KV head): every
    launch configuration, split kernel alone, bf16 and fp8 kept pairs; then the whole two-launch attention (tail of
    80 slots, merge) for the default and the three fastest configurations."""
    gen = torch.Generator().manual_seed(0)
    _, keys_bf16, values_bf16, cu, _, max_len = shape(context, 0.3, 1, gen)
    bucket = 1 << (context - 1).bit_length()
    query = torch.randn(share, HEADS, GROUP, DIM, device="cuda", dtype=torch.bfloat16)
    stacked = query.reshape(1, share, HEADS, GROUP, DIM).transpose(1, 2).reshape(1, HEADS, share * GROUP, DIM)
    src = torch.zeros(share, dtype=torch.int32, device="cuda")
    tail = torch.randn(share, HEADS, 80, DIM, device="cuda", dtype=torch.bfloat16)
    end = torch.tensor(40, device="cuda")
    flops = 4 * share * GROUP * (cu[-1].item()) * DIM  # QK and PV over every kept pair of every KV head
    records = []
    for kv_dtype in ("bf16", "fp8"):
        keys, values, scales = keys_bf16, values_bf16, {}
        if kv_dtype == "fp8":
            (keys, key_scales), (values, value_scales) = quantize_fp8(keys), quantize_fp8(values)
            scales = {"key_scales": key_scales, "value_scales": value_scales}
        timed = []
        for block_m, block_n, stages, warps, splits in itertools.product(
                (64, 128, 256), (64, 128), (2, 3), (4, 8, 16), (None, 8)):
            if warps not in ((4, 8) if block_m == 64 else (8, 16)):  # (the kernel takes >= 8 for larger blocks)
                continue
            config = dict(block_m=block_m, block_n=block_n, num_stages=stages, num_warps=warps, num_splits=splits)
            split = lambda: ragged_context_partials(stacked, keys, values, cu, src[:1], bucket, 0.088,  # noqa: E731
                                                    **config, **scales)
            try:
                split_us = triton.testing.do_bench_cudagraph(split, rep=20) * 1e3
            except Exception as error:  # noqa: BLE001 - a config that does not fit (shared memory, registers)
                print(f"  skip {config}: {type(error).__name__}", flush=True)
                continue
            record = {"kv": kv_dtype, **config, "splits": splits or "default", "used_splits": split()[0].shape[2],
                      "split_us": round(split_us, 1), "tflops": round(flops / split_us / 1e6, 1)}
            timed.append(record)
            print(json.dumps(record), flush=True)
        fields = ("block_m", "block_n", "num_stages", "num_warps", "num_splits")
        best = [{k: r[k] for k in fields} for r in sorted(timed, key=lambda r: r["split_us"])[:3]]
        for config in [None] + best:  # None: the library's own launch (`shared_launch`), no launch arguments
            context_config = {} if config is None else {
                ("context_block_m" if k == "block_m" else k): v for k, v in config.items()}
            whole = lambda: ragged_attention_with_tail(  # noqa: E731
                query, keys, values, cu, src, bucket, tail, tail, None, 0.088, 1, tail_end=end, share=share,
                **context_config, **scales)
            whole_us = triton.testing.do_bench_cudagraph(whole, rep=30) * 1e3
            if config is None:  # labelled with what the library chose (the kernel's defaults for what it leaves)
                chosen = {**KERNEL_DEFAULTS, "num_splits": "default",
                          **shared_launch(share * GROUP, DIM, query.dtype, keys.dtype, query.device)}
                config = {k: chosen[k] for k in fields} | {"default": True}
            record = {"kv": kv_dtype, "whole": True, **config, "whole_us": round(whole_us, 1)}
            print(json.dumps(record), flush=True)
            records.append(record)
        records.extend(timed)
        with open(path, "w") as f:  # after each dtype: a timed-out run keeps what it measured
            json.dump({"device": torch.cuda.get_device_name(), "share": share, "context": context,
                       "records": records}, f, indent=1)
        with open(path.removesuffix(".json") + ".md", "w") as f:
            f.write(shared_table(records, torch.cuda.get_device_name(), share, context))


def fp8_sweep(path: str, quick: bool = False) -> None:
    """The context split kernel over fp8 kept pairs with float16 products (the default) and bf16 products (the kernel
    before: a scalar conversion per element), for key blocks of 32, 64 and 128, 2 and 3 stages, 4 and 8 warps,
    default splits, and the default launch with registers capped at 168 and 128 (3 and 4 programs per SM instead of
    2, with spills); bf16 pairs at the default launch beside them. ``quick``: the default launches and the register
    caps only (a few compilations instead of thirty a shape). One row at 32K and 128K, 64 shared rows at 32K,
    ratio 0.3. GB/s counts the bytes each storage type reads (fp8: pairs and scales)."""
    gen = torch.Generator().manual_seed(0)
    records = []
    for context, share in ((32768, 1), (131072, 1), (32768, 64)):
        _, keys, values, cu, _, _ = shape(context, 0.3, 1, gen)
        query = torch.randn(share, HEADS, GROUP, DIM, device="cuda", dtype=torch.bfloat16)
        stacked = query.reshape(1, share, HEADS, GROUP, DIM).transpose(1, 2).reshape(1, HEADS, share * GROUP, DIM)
        src = torch.zeros(1, dtype=torch.int32, device="cuda")
        bucket = 1 << (context - 1).bit_length()
        (fp8_keys, key_scales), (fp8_values, value_scales) = quantize_fp8(keys), quantize_fp8(values)
        fp8 = {"key_scales": key_scales, "value_scales": value_scales}
        fp8_bytes = fp8_keys.nbytes + fp8_values.nbytes + key_scales.nbytes + value_scales.nbytes
        # (pairs, products, launch): the library's own launches first, then the register caps (3 and 4 programs
        # per SM) and, unless quick, every key block, stage count and warp count
        variants = [("bf16", None, {}), ("fp8", torch.float16, {}), ("fp8", torch.bfloat16, {})]
        variants += [("fp8", torch.float16, {"maxnreg": cap}) for cap in (168, 128)]
        variants += [] if quick else [
            ("fp8", dots, {"block_n": block_n, "num_stages": stages, "num_warps": warps})
            for dots in (torch.float16, torch.bfloat16) for block_n in (32, 64, 128) for stages in (2, 3)
            for warps in (4, 8)]
        for pairs, dots, config in variants:
            if pairs == "bf16":
                args, nbytes, extra = (keys, values), keys.nbytes + values.nbytes, {}
            else:
                args, nbytes, extra = (fp8_keys, fp8_values), fp8_bytes, {**fp8, "fp8_dots": dots}
            launch = {} if share == 1 else shared_launch(share * GROUP, DIM, query.dtype, args[0].dtype, query.device)
            split = lambda: ragged_context_partials(stacked, *args, cu, src, bucket, 0.088,  # noqa: E731
                                                    **{**launch, **config}, **extra)
            try:
                us = triton.testing.do_bench_cudagraph(split, rep=30) * 1e3
            except Exception as error:  # noqa: BLE001 - a config that does not fit (shared memory, registers)
                print(f"  skip {pairs} {dots} {config}: {type(error).__name__}", flush=True)
                continue
            record = {"context": context, "rows": share, "pairs": pairs,
                      "products": str(dots).removeprefix("torch.") if dots else "bf16",
                      "launch": config or "default", "us": round(us, 1), "gbps": round(nbytes / us / 1e3)}
            records.append(record)
            print(json.dumps(record), flush=True)
        with open(path, "w") as f:  # after each shape: a timed-out run keeps what it measured
            json.dump({"device": torch.cuda.get_device_name(), "records": records}, f, indent=1)


def shared_table(records: list[dict], device: str, share: int, context: int) -> str:
    """Markdown of a `shared_sweep`: the whole attention for the default and the fastest launches, then the split
    kernel alone, fastest first, per storage type."""
    lines = [f"# {share} rows sharing a {context}-token context at 0.3, one layer ({device})", "",
             "Whole attention (context splits, tail, merge), CUDA-graph replays:", "",
             "| pairs | query block | key block | stages | warps | splits | us |", "|---|---|---|---|---|---|---|"]
    for r in (r for r in records if r.get("whole")):
        block = "default" if r["block_m"] is None else f"default ({r['block_m']})" if r.get("default") else r["block_m"]
        lines.append(f"| {r['kv']} | {block} | {r['block_n']} | {r['num_stages']} | "
                     f"{r['num_warps']} | {r['num_splits'] or 'default'} | {r['whole_us']} |")
    lines += ["", "The split kernel alone (every configuration that fits):", "",
              "| pairs | query block | key block | stages | warps | splits (used) | us | TFLOP/s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in records if not r.get("whole")), key=lambda r: (r["kv"], r["split_us"])):
        lines.append(f"| {r['kv']} | {r['block_m']} | {r['block_n']} | {r['num_stages']} | {r['num_warps']} | "
                     f"{r['splits']} ({r['used_splits']}) | {r['split_us']} | {r['tflops']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--splits":
        split_sweep(sys.argv[2])
    elif len(sys.argv) > 2 and sys.argv[1] == "--shared":
        shared_sweep(sys.argv[2])
    elif len(sys.argv) > 2 and sys.argv[1] == "--fp8":
        fp8_sweep(sys.argv[2], quick="--quick" in sys.argv)
    else:
        main(quick="--quick" in sys.argv)

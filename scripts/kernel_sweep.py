"""Sweep launch configurations of the ragged context kernel on Llama-3.1-8B-shaped decode inputs (bf16).

    python scripts/kernel_sweep.py            # prints GB/s of retained KV per config; the best per shape last

Per-head kept lengths are drawn around ratio x context (x0.3 .. x1.7), as pair-level selection gives unequal heads.
Times are CUDA-graph replays (triton.testing.do_bench_cudagraph), so they measure the GPU, not Python launches.
"""

import itertools

import torch
import triton

from kvzip_cache.kernels import ragged_attention_with_tail, ragged_context_partials

HEADS, GROUP, DIM = 8, 4, 128


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


def main():
    gen = torch.Generator().manual_seed(0)
    configs = list(itertools.product([32, 64, 128], [2, 3], [4, 8], [2, 4, 8, 16]))  # block_n, stages, warps, factor
    results = []
    for context, ratio, batch in itertools.product([32768, 131072], [1.0, 0.3], [1, 8]):
        if context * batch > 32768 * 8:
            continue
        query, keys, values, cu, src, max_len = shape(context, ratio, batch, gen)
        nbytes = keys.nbytes + values.nbytes
        best = None
        for block_n, stages, warps, factor in configs:
            fn = lambda: ragged_context_partials(query, keys, values, cu, src, max_len, 0.088, block_n=block_n,  # noqa: E731
                                                 num_stages=stages, num_warps=warps, split_factor=factor)
            try:
                ms = triton.testing.do_bench_cudagraph(fn, rep=20)
            except Exception as error:  # noqa: BLE001 - a config that does not fit (shared memory) is skipped
                print(f"  skip {block_n, stages, warps, factor}: {type(error).__name__}")
                continue
            gbps = nbytes / ms / 1e6
            results.append((context, ratio, batch, block_n, stages, warps, factor, ms, gbps))
            if best is None or gbps > best[-1]:
                best = (block_n, stages, warps, factor, ms, gbps)
        tail_k = torch.randn(batch, HEADS, 64, DIM, device="cuda", dtype=torch.bfloat16)
        block_n, stages, warps, factor = best[:4]
        full = lambda: ragged_attention_with_tail(query.reshape(batch, HEADS, GROUP, DIM), keys, values, cu, src,  # noqa: E731
                                                  max_len, tail_k, tail_k, None, 0.088, 1, block_n=block_n,
                                                  num_stages=stages, num_warps=warps, split_factor=factor)
        full_ms = triton.testing.do_bench_cudagraph(full, rep=20)
        print(f"ctx {context:>6} r {ratio} b {batch}: {nbytes / 1e6:8.1f} MB  best block_n={best[0]} stages={best[1]} "
              f"warps={best[2]} factor={best[3]}: {best[4] * 1e3:7.1f} us {best[5]:6.0f} GB/s; "
              f"with tail+merge {full_ms * 1e3:7.1f} us {nbytes / full_ms / 1e6:6.0f} GB/s", flush=True)
    print("\nall configs (context, ratio, batch, block_n, stages, warps, factor, ms, GB/s):")
    for row in results:
        print(*row[:7], f"{row[7]:.4f}", f"{row[8]:.0f}")


if __name__ == "__main__":
    main()

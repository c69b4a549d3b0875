"""What eviction while decoding pays to add the kept pairs to one layer's ragged store: packed vs reserved room.

Eager eviction while decoding appends every ``--window`` tokens the pairs it keeps of the oldest tail tokens to each
full layer's `CompressedContext`. A packed append moves every pair (O(context)); an append into reserved room
(`CompressedContext.append(..., room=True)`) writes the new pairs in place and rebuilds only when a segment's room
runs out. This times both for one layer of the 8B shape (8 KV heads, head_dim 128, bf16) holding a context compressed
to ``--ratio`` per head, over ``--evictions`` appends of ``--window`` tokens each keeping ``--ratio`` of them per head
(a random choice: the cost does not depend on which), and checks that both give the same pairs.

    python scripts/bench_store_append.py --contexts 32768 131072 --out docs/results/store-append-cpu

Prints one line per (context, mode) and writes ``store_append.json`` and ``store_append.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from kvzip_cache.storage import CompressedContext


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(context: int, args, device: str) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(context)
    heads, dim, dtype = 8, 128, torch.bfloat16
    keep = torch.rand(1, heads, context, generator=gen, device=device) < args.ratio
    keys = torch.randn(1, heads, context, dim, generator=gen, device=device).to(dtype)
    base = CompressedContext.from_dense(keys, keys, keep)
    del keys
    spans = [(torch.randn(1, heads, args.window, dim, generator=gen, device=device).to(dtype),
              torch.rand(1, heads, args.window, generator=gen, device=device) < args.ratio)
             for _ in range(args.evictions)]
    rows, results = [], {}
    for mode in ("packed", "room"):
        store, times, rebuilds = base, [], 0
        for i, (span, kept) in enumerate(spans):
            before = store.lease
            _sync(device)
            began = time.perf_counter()
            store = store.append(span, span, kept, context + i * args.window, room=mode == "room")
            _sync(device)
            times.append(1e3 * (time.perf_counter() - began))
            rebuilds += mode == "room" and (before is None or store.lease[0] is not before[0])
        results[mode] = store
        packed_bytes = store.compact().kv_bytes()
        rows.append({"context": context, "mode": mode, "evictions": args.evictions, "window": args.window,
                     "ratio": args.ratio, "mean_ms": statistics.mean(times), "median_ms": statistics.median(times),
                     "max_ms": max(times), "last_quarter_mean_ms": statistics.mean(times[-len(times) // 4:]),
                     "rebuilds": rebuilds if mode == "room" else len(times), "kv_mb": store.kv_bytes() / 1e6,
                     "packed_kv_mb": packed_bytes / 1e6})
        print(f"ctx {context:>6} {mode:6}: append mean {rows[-1]['mean_ms']:7.3f} ms, median "
              f"{rows[-1]['median_ms']:7.3f}, max {rows[-1]['max_ms']:7.2f}; rebuilds {rows[-1]['rebuilds']:3}; "
              f"store {rows[-1]['kv_mb']:.1f} MB (packed {packed_bytes / 1e6:.1f})", flush=True)
    got, expected = results["room"].compact(), results["packed"]
    assert got.offsets == expected.offsets and torch.equal(got.keys, expected.keys)
    assert torch.equal(got.positions, expected.positions)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--evictions", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("store_append"))
    args = parser.parse_args()
    machine = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    rows = [row for context in args.contexts for row in run(context, args, args.device)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "store_append.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    lines = [f"# Appending kept pairs to one layer's store ({machine['device']}, {machine['threads']} threads, torch "
             f"{machine['torch']})", "",
             f"8B shape (8 KV heads, head_dim 128, bf16), context kept at {args.ratio}, {args.evictions} appends of "
             f"{args.window} tokens at {args.ratio}.", "",
             "| context | mode | mean ms | median ms | max ms | last quarter mean ms | rebuilds | store MB | packed MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['context']} | {r['mode']} | {r['mean_ms']:.3f} | {r['median_ms']:.3f} | {r['max_ms']:.2f} | "
              f"{r['last_quarter_mean_ms']:.3f} | {r['rebuilds']} | {r['kv_mb']:.1f} | {r['packed_kv_mb']:.1f} |"
              for r in rows]
    (args.out / "store_append.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

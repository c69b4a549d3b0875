"""Which part of fp8 storage costs answers: the kept pairs quantized in several ways, answered from the same selection.

Issue #30 measured kvzip at 0.3 with fp8 kept pairs 4.5 points below bf16 on needle 4K (SmolLM2-135M, bf16, GPU).
This probe compresses each context once (KVzip, ratio 0.3, the model's dtype), then answers every question from
copies of that cache whose kept pairs went through a quantize -> dequantize round trip of one kind (the store stays
in the model's dtype, so every variant runs the same attention code; ``fp8`` itself runs the real fp8 store and its
kernels, which the round trip ``pair`` should match):

- ``bf16``: the pairs as kept (the reference);
- ``fp8``: the real fp8 store (`compress(..., kv_dtype="fp8")`);
- ``pair``: keys and values per pair (one scale per pair, the fp8 store's scheme);
- ``pair-keys`` / ``pair-values``: only the keys, only the values;
- ``pair-prefix``: per pair, but the protected prefix (the system prompt: attention sinks) left exact;
- ``channel``: keys divided by their segment's per-channel max |k| (one scale per (row, KV head, channel), which a
  kernel can fold into the query), then per pair; values per pair;
- ``channel-sqrt``: the same with the square root of the channel max (half way between per pair and per channel).

Prints the accuracy of each, its paired difference to ``bf16`` with a 95% interval resampling contexts, and how often
its answer is word for word bf16's; writes ``results.jsonl`` (the eval's row format) and ``summary.json`` to --out.

    python scripts/fp8_quality_probe.py --device cuda --dtype bfloat16 --num-contexts 67 --context-tokens 4000 \\
        --batch-contexts 17 --out fp8_probe
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import torch

from kvzip_cache import KVzipCache
from kvzip_cache.eval.runner import answer_shared, cell_stats, paired_stats
from kvzip_cache.eval.tasks import load_task, question_prompt, score, task_max_new_tokens
from kvzip_cache.storage import dequantize_fp8, quantize_fp8
from kvzip_cache.templates import encode_contexts
from kvzip_cache.zoo.loading import load_model

VARIANTS = ("bf16", "fp8", "pair", "pair-keys", "pair-values", "pair-prefix", "channel", "channel-sqrt")


def round_trip(pairs: torch.Tensor) -> torch.Tensor:
    """``[N, D]`` -> the same pairs after per-pair fp8 quantization, in their own dtype."""
    return dequantize_fp8(*quantize_fp8(pairs), pairs.dtype)


def channel_round_trip(keys: torch.Tensor, offsets: tuple[int, ...], power: float) -> torch.Tensor:
    """Keys divided by ``(per-segment channel max |k|) ** power``, quantized per pair, multiplied back."""
    out = torch.empty_like(keys)
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        if hi > lo:
            segment = keys[lo:hi].float()
            scale = segment.abs().amax(dim=0).clamp(min=1e-6) ** power
            out[lo:hi] = (round_trip(segment / scale) * scale).to(keys.dtype)
    return out


def apply_variant(cache: KVzipCache, variant: str, model, ratio: float) -> None:
    """Quantize ``cache``'s kept pairs as ``variant`` says, in place."""
    if variant == "bf16":
        return
    if variant == "fp8":
        cache.compress(model, ratio, kv_dtype="fp8")  # the same selection (stored scores), stored in fp8
        return
    for layer in cache.layers:
        ctx = getattr(layer, "context", None)
        if ctx is None:
            continue  # sliding-window layers keep dense windows
        ctx = ctx.compact()
        keys, values = ctx.keys, ctx.values
        if variant in ("pair", "pair-keys", "pair-prefix"):
            new_keys = round_trip(keys)
        elif variant.startswith("channel"):
            new_keys = channel_round_trip(keys, ctx.offsets, 1.0 if variant == "channel" else 0.5)
        else:
            new_keys = keys
        new_values = values if variant == "pair-keys" else round_trip(values)
        if variant == "pair-prefix":  # the protected prefix exact: pair n of segment s = row * H + h
            counts = torch.tensor(ctx.offsets[1:], device=keys.device) - torch.tensor(ctx.offsets[:-1],
                                                                                       device=keys.device)
            rows = torch.repeat_interleave(torch.arange(counts.numel(), device=keys.device), counts) // ctx.num_heads
            prefix = ctx.positions.long() < cache.context_start.to(keys.device)[rows]
            new_keys = torch.where(prefix[:, None], keys, new_keys)
            new_values = torch.where(prefix[:, None], values, new_values)
        layer.context = dataclasses.replace(ctx, keys=new_keys, values=new_values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--task", default="needle")
    parser.add_argument("--num-contexts", type=int, default=67)
    parser.add_argument("--context-tokens", type=int, default=4000)
    parser.add_argument("--batch-contexts", type=int, default=17)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", type=Path, default=Path("fp8_probe"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    contexts = load_task(args.task, tokenizer, args.num_contexts, args.context_tokens)
    rows = []
    with (args.out / "results.jsonl").open("w") as handle:
        for lo in range(0, len(contexts), args.batch_contexts):
            batch = contexts[lo : lo + args.batch_contexts]
            ids, mask, starts = (t.to(model.device) for t in encode_contexts(tokenizer, [c.text for c in batch]))
            base = KVzipCache(model)
            base.prefill(model, ids, mask, context_start=starts)
            base.compress(model, args.ratio, tokenizer=tokenizer)
            prompts = [[question_prompt(args.task, q.question) for q in c.questions] for c in batch]
            for variant in args.variants:
                cache = copy.deepcopy(base)
                apply_variant(cache, variant, model, args.ratio)
                with torch.no_grad():
                    answers = answer_shared(model, tokenizer, cache, prompts, task_max_new_tokens(args.task))
                for context, predictions in zip(batch, answers):
                    for question, prediction in zip(context.questions, predictions):
                        row = {"task": args.task, "context_id": context.cid, "question_id": question.qid,
                               "method": variant, "ratio": args.ratio, "model": args.model,
                               "prediction": prediction, "answers": question.answers,
                               "scores": score(args.task, prediction, question.answers)}
                        rows.append(row)
                        handle.write(json.dumps(row) + "\n")
                del cache
            print(f"contexts {lo + len(batch)}/{len(contexts)}", flush=True)
    reference = {(r["context_id"], r["question_id"]): r["prediction"] for r in rows if r["method"] == "bf16"}
    cells, paired = cell_stats(rows), paired_stats(rows, "bf16", [args.ratio])
    summary = []
    for variant in args.variants:
        for (task, metric, method, _), cell in sorted(cells.items()):
            if method != variant:
                continue
            same = [r["prediction"] == reference.get((r["context_id"], r["question_id"])) for r in rows
                    if r["method"] == variant]
            diff = paired.get((task, metric, method, float(args.ratio)))
            record = {"variant": variant, "metric": metric, "n": cell.n, "contexts": cell.contexts,
                      "mean": cell.mean, "interval": [cell.lo, cell.hi], "same_answer_as_bf16": sum(same) / len(same),
                      "minus_bf16": None if diff is None else [diff.mean, diff.lo, diff.hi]}
            summary.append(record)
            delta = "" if diff is None else f"  - bf16 {diff.mean:+.3f} [{diff.lo:+.3f}, {diff.hi:+.3f}]"
            print(f"{variant:>13} {metric}: {cell.mean:.3f} [{cell.lo:.3f}, {cell.hi:.3f}] n={cell.n}{delta}  "
                  f"same answer {sum(same) / len(same):.2f}")
    (args.out / "summary.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "device": str(model.device), "cells": summary}, indent=1))


if __name__ == "__main__":
    main()

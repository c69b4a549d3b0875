"""How close each predicted path's keep mask comes to exact KVzip's, on the evaluation's needle documents.

For every context: exact KVzip at ``--ratio`` after a plain prefill (the reference), then

- ``predicted``: a plain prefill, then ``compress(predictor=p)``;
- ``predicted-prefill``: ``prefill(..., predictor=p, ratio=r)`` (chunks of 512 tokens, as the evaluation);
- ``predicted-prefill+kvzip``: ``prefill(..., ratio=min(1, 2r))``, then ``compress(r, scorer="kvzip")`` on the survivors;

and reports each one's overlap with the reference (the fraction of exact KVzip's kept context pairs it keeps too;
both keep the same number) and the fraction of the needles' digit pairs it keeps. Overlap is a proxy; answers are
the evaluation's business (``python -m kvzip_cache.eval --methods kvzip predicted-prefill predicted-prefill+kvzip``).

    python scripts/rescored_overlap.py --model smollm2-135m --contexts 12 --context-tokens 2000 --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kvzip_cache import KVzipCache, ScorePredictor
from kvzip_cache.eval.methods import PREDICTED_PREFILL_CHUNK, RESCORED_LOOSENESS
from kvzip_cache.eval.tasks import needle_contexts
from kvzip_cache.templates import encode_contexts
from kvzip_cache.zoo.loading import load_model


def keep_masks(model, tokenizer, predictor, ids, mask, starts, ratio: float) -> dict[str, torch.Tensor]:
    """``{path: [L, 1, H, C] bool}`` keep masks of one context (see the module docstring)."""
    masks = {}
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=starts)
    plain = KVzipCache(model)
    plain.prefill(model, ids, mask, context_start=starts)
    cache.compress(model, ratio, tokenizer=tokenizer)
    masks["kvzip"] = cache.keep_mask
    plain.compress(model, ratio, predictor=predictor)
    masks["predicted"] = plain.keep_mask
    for name, loose in (("predicted-prefill", ratio), ("predicted-prefill+kvzip", min(1.0, RESCORED_LOOSENESS * ratio))):
        evicting = KVzipCache(model)
        evicting.prefill(model, ids, mask, context_start=starts, chunk_size=PREDICTED_PREFILL_CHUNK, predictor=predictor,
                         ratio=loose)
        if loose != ratio:
            evicting.compress(model, ratio, scorer="kvzip", tokenizer=tokenizer)
        masks[name] = evicting.keep_mask
    return masks


def needle_positions(tokenizer, text: str, answers: list[str], offset: int, length: int) -> torch.Tensor:
    """``[C]`` bool: the context positions whose token overlaps a needle's digits (by character offsets)."""
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    spans = []
    for answer in answers:
        start = text.find(answer)
        if start >= 0:
            spans.append((start, start + len(answer)))
    digits = torch.zeros(length, dtype=torch.bool)
    for index, (lo, hi) in enumerate(encoded["offset_mapping"]):
        if index + offset < length and any(lo < b and hi > a for a, b in spans):
            digits[index + offset] = True
    return digits


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--predictor", default=None, help="default: the one shipped for --model")
    parser.add_argument("--contexts", type=int, default=12)
    parser.add_argument("--context-tokens", type=int, default=2000)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    predictor = ScorePredictor.from_pretrained(args.predictor or args.model)
    rows = []
    for context in needle_contexts(tokenizer, args.contexts, args.context_tokens):
        started = time.perf_counter()
        ids, mask, starts = (t.to(model.device) for t in encode_contexts(tokenizer, [context.text]))
        masks = keep_masks(model, tokenizer, predictor, ids, mask, starts, args.ratio)
        exact = masks["kvzip"]
        # column 0 of the masks is the first context token: the text's first token (encode_context)
        digits = needle_positions(tokenizer, context.text, [a for q in context.questions for a in q.answers], 0,
                                  exact.shape[-1]).to(exact.device)
        row = {"context": context.cid, "tokens": int(mask.sum()), "seconds": time.perf_counter() - started}
        for name, keep in masks.items():
            row[f"overlap {name}"] = int((keep & exact).sum()) / max(int(exact.sum()), 1)
            row[f"needle digits kept {name}"] = float(keep[..., digits].float().mean()) if bool(digits.any()) else None
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    summary = {key: statistics.mean(r[key] for r in rows if r[key] is not None)
               for key in rows[0] if key.startswith(("overlap", "needle"))}
    result = {"model": args.model, "ratio": args.ratio, "context_tokens": args.context_tokens,
              "dtype": args.dtype, "device": args.device, "rows": rows, "mean": summary}
    print(json.dumps(result["mean"], indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

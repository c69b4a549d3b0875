"""The predictor study of issue #29 (GPU): exact scores of a varied corpus, predictors fitted with each objective and
capacity, held-out quality against training tokens, the winners saved as predictor files.

    python scripts/predictor_study.py --model smollm2-135m --tokens 1200000 --out study

Held out: the evaluation's SQuAD and HotpotQA contexts and its needle documents (never trained on). Prints and writes
``<out>/study.json`` and ``<out>/study.md``; ``<out>/predictor-<variant>.safetensors`` for every variant a
`ScorePredictor` can hold.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvzip_cache import ScorePredictor
from kvzip_cache.tools.fitting import fit_mlp, gather_features
from kvzip_cache.tools.shipped import model_label
from kvzip_cache.tools.training import (
    OVERLAP_RATIOS, ScoreDataset, collect_dataset, evaluate_predictor, fit_predictor, heldout_corpus,
    training_corpus,
)
from kvzip_cache.zoo import load_model

# name -> (kind, objective, hidden (None: F / 8), previous position's features too)
VARIANTS = {
    "mlp-rank": ("mlp", "rank", None, False),
    "mlp-mse": ("mlp", "mse", None, False),
    "mlp-rank-wide": ("mlp", "rank", 256, False),
    "linear": ("linear", None, None, False),
    "mlp-rank-previous": ("mlp", "rank", None, True),
    "mlp-censored": ("mlp", "censored", None, False),
}


def stack_predict(stack, data: ScoreDataset, previous: bool):
    @torch.no_grad()
    def predict(index: torch.Tensor) -> torch.Tensor:
        return stack(gather_features(data.features, index, data.bounds, previous))

    return predict


def fit_variant(name: str, train: ScoreDataset, model, steps: int, seed: int = 0, model_name: str = ""):
    """``(predictor or None, predict-function factory)`` of one variant fitted on ``train``."""
    kind, objective, hidden, previous = VARIANTS[name]
    predictor = ScorePredictor.init(model, kind, hidden=hidden, model_name=model_name)
    if not previous:
        fit_predictor(train, predictor, objective=objective or "mse", progress=False,
                      **({"steps": steps, "seed": seed} if kind == "mlp" else {}))
        return predictor, None
    stack = fit_mlp(train.features, train.targets, train.bounds, hidden=predictor.hidden, objective=objective,
                    steps=steps, previous=True, seed=seed)
    return None, lambda data: stack_predict(stack, data, True)


def line(name: str, metrics: dict, seconds: float | None = None) -> str:
    overlap = " | ".join(f"{metrics['overlap'][f'{r:g}']:.3f}" for r in OVERLAP_RATIOS)
    sources = " | ".join(f"{metrics['overlap_by_source'][s]['0.3']:.3f}" for s in ("squad", "hotpotqa", "needles"))
    took = "" if seconds is None else f" {seconds:.0f} s |"
    return f"| {name} | {metrics['mean_r2']:.3f} | {metrics['mean_spearman']:.3f} | {overlap} | {sources} |{took}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=1_200_000)
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="training context lengths")
    parser.add_argument("--heldout", type=int, default=12, help="held-out contexts per source")
    parser.add_argument("--heldout-tokens", type=int, default=2000)
    parser.add_argument("--needle-tokens", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32_768, 131_072, 524_288])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--scaling-variant", default=None, help="default: the best MLP variant at 0.3")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", default="study")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"args": vars(args)}
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    hub_id = model_label(args.model)[1]
    corpus = training_corpus(tokenizer, args.tokens, **({"lengths": tuple(args.lengths)} if args.lengths else {}))
    held = heldout_corpus(tokenizer, 3 * args.heldout, args.heldout_tokens, args.needle_tokens)
    t0 = time.perf_counter()
    train = collect_dataset(model, tokenizer, [t for _, t in corpus], sources=[s for s, _ in corpus],
                            desc="exact scores (train)")
    test = collect_dataset(model, tokenizer, [t for _, t in held], sources=[s for s, _ in held],
                           desc="exact scores (held out)")
    report["scoring_seconds"] = round(time.perf_counter() - t0, 1)
    report["train"] = {"tokens": train.tokens, "contexts": len(train),
                       "by_source": {s: sum(int(train.bounds[i + 1] - train.bounds[i]) for i in range(len(train))
                                            if train.sources[i] == s) for s in sorted(set(train.sources))}}
    report["heldout"] = {"tokens": test.tokens, "contexts": len(test)}
    print(f"scored {train.tokens} training tokens ({len(train)} texts) and {test.tokens} held-out tokens in "
          f"{report['scoring_seconds']} s", flush=True)
    header = ["| predictor | R2 | Spearman | overlap 0.5 | 0.3 | 0.1 | squad 0.3 | hotpotqa 0.3 | needles 0.3 | fit |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = list(header)
    report["variants"] = {}
    try:
        shipped = ScorePredictor.from_pretrained(args.model)
        metrics = evaluate_predictor(shipped, test)
        report["variants"]["shipped"] = metrics
        rows.append(line("shipped (mse, 32K essay tokens)", metrics, 0.0))
        print(rows[-1], flush=True)
    except (ValueError, FileNotFoundError) as error:
        print(f"no shipped predictor: {error}")
    best, best_overlap = None, -1.0

    def write(scale_rows=()) -> None:  # after every fit: a run cut short still leaves what it measured
        report["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        (out / "study.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "study.md").write_text("\n".join([f"device: {report['device']}", *rows, "", *scale_rows]) + "\n")

    for name in args.variants:
        t0 = time.perf_counter()
        predictor, factory = fit_variant(name, train, model, args.steps, model_name=hub_id)
        seconds = time.perf_counter() - t0
        metrics = evaluate_predictor(predictor if predictor is not None else factory(test), test)
        report["variants"][name] = {**metrics, "fit_seconds": round(seconds, 1)}
        rows.append(line(name, metrics, seconds))
        print(rows[-1], flush=True)
        if predictor is not None:
            predictor.training = {"data": f"varied corpus (kvzip_cache.tools.corpus), {train.tokens} tokens in "
                                          f"{len(train)} texts", "tokens": train.tokens, "texts": len(train),
                                  "variant": name, "steps": args.steps, "device": str(train.features.device)}
            predictor.metrics = metrics
            predictor.save(out / f"predictor-{name}.safetensors")
        if VARIANTS[name][0] == "mlp" and predictor is not None and metrics["overlap"]["0.3"] > best_overlap:
            best, best_overlap = name, metrics["overlap"]["0.3"]
            (out / "best.txt").write_text(str(out / f"predictor-{name}.safetensors"))
        write()
    scaling = args.scaling_variant or best
    report["scaling_variant"] = scaling
    scale_rows = [f"held-out quality of {scaling} against training tokens", *header]
    report["scaling"] = {}
    for size in [*args.sizes, train.tokens]:
        subset = train.head(size)
        t0 = time.perf_counter()
        predictor, factory = fit_variant(scaling, subset, model, args.steps)
        metrics = evaluate_predictor(predictor if predictor is not None else factory(test), test)
        report["scaling"][str(subset.tokens)] = metrics
        scale_rows.append(line(f"{subset.tokens} tokens", metrics, time.perf_counter() - t0))
        print(scale_rows[-1], flush=True)
        write(scale_rows)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write(scale_rows)
    print(f"done in {report['seconds']} s; best MLP at 0.3: {best}")


if __name__ == "__main__":
    main()

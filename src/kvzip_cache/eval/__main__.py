"""Command line: ``python -m kvzip_cache.eval`` (or ``kvzip-eval``); see `kvzip_cache.eval`."""

from __future__ import annotations

import argparse

from .methods import DEFAULT_METHODS, METHODS
from .runner import EvalConfig, run_eval
from .tasks import TASKS


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    parser = argparse.ArgumentParser(prog="kvzip-eval", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m", help="a short name from kvzip_cache.models.PYPI_MODELS")
    parser.add_argument("--task", nargs="+", default=["needle"], choices=TASKS, dest="tasks")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS,
                        help="default: every method but predicted and predicted-prefill (they need a predictor)")
    parser.add_argument("--ratios", nargs="+", type=float, default=[1.0, 0.5, 0.3, 0.2, 0.1],
                        help="fractions of context KV pairs kept")
    parser.add_argument("--num-contexts", type=int, default=2, help="contexts per task (gsm8k: problems)")
    parser.add_argument("--context-tokens", type=int, default=1500)
    parser.add_argument("--max-questions", type=int, default=8, help="questions per context (squad, hotpotqa)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="answer length; default per task (32, or 256 for gsm8k's step-by-step answers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output folder (resumable)")
    parser.add_argument("--head-scores", default=None,
                        help="HeadScores file, folder or Hub repo for kvzip-head(-duo); default: from each context")
    parser.add_argument("--predictor", default=None,
                        help="ScorePredictor for predicted(-prefill): a shipped short name, file, folder or Hub repo; "
                             "default: the one shipped for --model")
    return EvalConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    run_eval(config)
    print(open(f"{config.out}/summary.md").read())


if __name__ == "__main__":
    main()

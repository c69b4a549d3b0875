"""Compression methods for the evaluation, all query-agnostic and swept over decreasing ratios.

``ratio`` is the fraction of selectable context pairs KEPT. ``kvzip`` / ``kvzip-uniform`` score the context once by
reconstruction (`KVzipCache.compress` at 1.0) and re-select among the kept pairs for each smaller ratio; ``kvzip+``
does the same with KVzip+ scores (``score="kvzip+"``, KVzap's output-norm-weighted reconstruction attention).
``predicted`` scores every pair with a trained `ScorePredictor` (no forward pass) and re-selects likewise;
``predicted-prefill`` evicts while prefilling (``prefill(predictor=..., ratio=...)``, ``PREDICTED_PREFILL_CHUNK``
tokens per chunk), a fresh prefill per ratio.
``kvzip-head`` keeps whole KV heads (``ratio`` = fraction of heads), ranked by precomputed `HeadScores` when the run
has them, else by the maximum of the same context's KVzip pair scores over positions (`head_scores_from_pairs`).
``kvzip-head-duo`` is the DuoAttention-style variant: the dropped heads keep their first ``DUO_SINK`` and last
``DUO_RECENT`` context tokens ("streaming heads") instead of nothing, so it keeps slightly more than ``ratio``. The baselines
score every pair once, rank it within its (layer, row, KV head), and keep the top ``round(ratio * n)`` of each head
(``n`` = selectable positions), so the masks of decreasing ratios are nested and `KVzipCache.evict` only drops pairs.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import DynamicCache

from ..cache import KVzipCache
from ..compat import cache_kwarg
from ..scorers.predictor import ScorePredictor
from ..scoring import score_by_reconstruction
from ..selection import head_scores_from_pairs, kept_count, select_heads

KVZIP_LEVELS = {"kvzip": "pair", "kvzip-uniform": "pair-uniform"}  # these two share one context's KVzip scores
KVZIP_PLUS = "kvzip+"
BASELINES = ("random", "streaming", "snapkv", "h2o")
HEAD_METHODS = ("kvzip-head", "kvzip-head-duo")
PREDICTED_METHODS = ("predicted", "predicted-prefill")  # need a ScorePredictor
METHODS = ("full", *KVZIP_LEVELS, KVZIP_PLUS, *HEAD_METHODS, *PREDICTED_METHODS, *BASELINES)
DEFAULT_METHODS = tuple(m for m in METHODS if m not in PREDICTED_METHODS)  # what runs without a predictor

SINK_TOKENS = 4
SNAPKV_WINDOW = 32
SNAPKV_KERNEL = 7
H2O_RECENT = 32
DUO_SINK = 16  # streaming heads of kvzip-head-duo: sink and recent tokens (scaled to the eval's short contexts)
DUO_RECENT = 64
PREDICTED_PREFILL_CHUNK = 512  # predicted-prefill's chunk: small, so that the eval's short contexts span chunks


# -------------------------------------------------------------------------------------------------- selection
def nested_masks(scores: torch.Tensor, ratios: list[float]) -> dict[float, torch.Tensor]:
    """Per-head top-k keep masks for several ratios from one ranking.

    Args:
        scores: ``[L, B, H, C]`` float, NaN where a pair is not selectable; higher = keep first.
        ratios: fractions kept, in (0, 1].

    Returns:
        ``{ratio: [L, B, H, C] bool}`` with exactly ``kept_count(ratio, n)`` True per (layer, row, head), where ``n``
        is the number of non-NaN entries of that head; never True on NaN; a smaller ratio's mask is a subset.
    """
    valid = ~torch.isnan(scores)
    order = torch.sort(scores.nan_to_num(float("-inf")), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1]).expand_as(order).contiguous())
    counts = valid.sum(dim=-1)  # [L, B, H]
    masks = {}
    for ratio in ratios:
        k = torch.tensor([kept_count(ratio, int(n)) for n in counts.flatten()], dtype=torch.long).view_as(counts)
        masks[ratio] = (rank < k[..., None]) & valid
    return masks


# ------------------------------------------------------------------------------------------------------ scores
def random_scores(selectable: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``[L, B, H, C]`` uniform random scores (seeded), NaN where not selectable.

    Each row draws ``[L, H, n]`` values for its own ``n`` columns (from its first selectable one to the end: left
    padding) with the same seed, so a context gets the same scores alone or in a padded batch.
    """
    selectable = selectable.cpu()
    values = torch.full(selectable.shape, float("nan"))
    used = selectable.any(dim=2).any(dim=0)  # [B, C]
    for row in range(selectable.shape[1]):
        columns = used[row].nonzero()
        if not len(columns):
            continue
        first = int(columns[0])
        generator = torch.Generator().manual_seed(seed)
        shape = (selectable.shape[0], selectable.shape[2], selectable.shape[3] - first)
        values[:, row, :, first:] = torch.rand(shape, generator=generator)
    return values.masked_fill(~selectable, float("nan"))


def streaming_scores(selectable: torch.Tensor, context_start: torch.Tensor, offset: int, sinks: int = SINK_TOKENS):
    """StreamingLLM: the first ``sinks`` context tokens of each row first, then the most recent ones.

    Args:
        selectable: ``[L, B, H, C]`` bool; column ``j`` is position ``offset + j`` (padded coordinates).
        context_start: ``[B]`` first context position of each row.

    Returns:
        ``[L, B, H, C]`` float: position ``j`` scores ``j`` (recency), sinks score ``2 C``; NaN where not selectable.
    """
    length = selectable.shape[-1]
    columns = torch.arange(length, dtype=torch.float32)
    in_context = torch.arange(offset, offset + length)[None, :] - context_start.cpu()[:, None]  # [B, C]
    per_row = torch.where((in_context >= 0) & (in_context < sinks), float(2 * length), columns[None, :])
    values = per_row[None, :, None, :].expand(selectable.shape).clone()
    return values.masked_fill(~selectable.cpu(), float("nan"))


@torch.no_grad()
def observed_attention(model, cache: KVzipCache, first_query: int, chunk: int = 512) -> list[torch.Tensor]:
    """Attention that the prefilled keys receive from the queries at positions ``>= first_query``.

    The prefilled ids run again through a separate `DynamicCache`: positions before ``first_query`` with the
    model's own attention (the kvzip attention also serves a plain DynamicCache), the rest ``chunk`` queries at a
    time with eager attention and ``output_attentions``, so at most ``[B, Hq, chunk, seq]`` probabilities per
    layer exist at once. Padding queries do not vote.

    Returns:
        one ``[B, H, seq]`` float32 tensor per layer: probabilities summed over the voting queries and averaged over
        the query heads of each KV head's group.
    """
    ids, mask = cache.input_ids, cache.attention_mask.long()
    batch, seq = ids.shape
    heads = cache.num_kv_heads
    kwarg = cache_kwarg(model)
    dense = DynamicCache(config=model.config)
    if first_query > 0:
        model(input_ids=ids[:, :first_query], attention_mask=mask[:, :first_query], use_cache=True,
              logits_to_keep=1, **{kwarg: dense})
    totals: list[torch.Tensor] | None = None
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        for lo in range(first_query, seq, chunk):
            hi = min(lo + chunk, seq)
            out = model(input_ids=ids[:, lo:hi], attention_mask=mask[:, :hi], use_cache=True, output_attentions=True,
                        logits_to_keep=1, **{kwarg: dense})
            voters = mask[:, lo:hi].float()[:, None, :, None]  # [B, 1, q, 1]
            # [B, Hq, q, k] -> [B, H, seq]; the k keys are the LAST k positions before hi (a sliding layer's
            # cache holds only its window)
            votes = [
                torch.nn.functional.pad((attn.float() * voters).sum(dim=2), (hi - attn.shape[-1], seq - hi))
                .view(batch, heads, -1, seq).mean(dim=2)
                for attn in out.attentions
            ]
            totals = votes if totals is None else [t + v for t, v in zip(totals, votes)]
    finally:
        model.set_attn_implementation(previous)
    return totals


def _finish(per_layer: list[torch.Tensor], cache: KVzipCache, always_kept: int) -> torch.Tensor:
    """Stack per-layer ``[B, H, seq]`` votes into ``[L, B, H, C]`` scores; the last ``always_kept`` positions rank
    first; NaN where not selectable."""
    seq = cache.input_ids.shape[1]
    values = torch.stack([votes[..., cache.context_offset :] for votes in per_layer]).cpu()
    if always_kept:
        values[..., values.shape[-1] - min(always_kept, seq - cache.context_offset) :] = float("inf")
    finite = values[torch.isfinite(values)]
    values = values.masked_fill(torch.isinf(values), (float(finite.max()) if finite.numel() else 0.0) + 1.0)
    return values.masked_fill(~cache.selectable_pairs().cpu(), float("nan"))


def snapkv_scores(
    model, cache: KVzipCache, window: int = SNAPKV_WINDOW, kernel: int = SNAPKV_KERNEL
) -> torch.Tensor:
    """SnapKV: attention of the last ``window`` context tokens to every key, computed once, without a question.

    The probabilities (`observed_attention`) are averaged over the window's queries and the query heads of each KV
    head's group, then smoothed by an average pool of width ``kernel`` along the keys. The window itself ranks
    first (SnapKV always keeps it), within the same budget.

    Returns:
        ``[L, B, H, C]`` float scores in the layout of ``cache.scores``, NaN where not selectable.
    """
    window = min(window, cache.input_ids.shape[1] - 1)
    pooled = [
        torch.nn.functional.avg_pool1d(votes, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
        for votes in observed_attention(model, cache, cache.input_ids.shape[1] - window)
    ]
    return _finish(pooled, cache, window)


def h2o_scores(model, cache: KVzipCache, recent: int = H2O_RECENT) -> torch.Tensor:
    """H2O-style heavy hitters: the attention each key accumulates over the whole prefill (every query, causal).

    Keys are ranked per KV head by the probabilities they received, summed over all queries of the prefill and
    averaged over the query group; the last ``recent`` context tokens rank first (H2O keeps a recent window).

    Returns:
        ``[L, B, H, C]`` float scores in the layout of ``cache.scores``, NaN where not selectable.
    """
    return _finish(observed_attention(model, cache, 0), cache, recent)


def _streaming_window(cache: KVzipCache, selectable: torch.Tensor) -> torch.Tensor:
    """``[L, B, H, C]`` bool: the first ``DUO_SINK`` and last ``DUO_RECENT`` context tokens of every row."""
    offset, length = cache.context_offset, selectable.shape[-1]
    start = cache.context_start.to(selectable.device)[:, None]
    index = torch.arange(offset, offset + length, device=selectable.device)[None, :] - start  # [B, C]
    size = offset + length - start  # each row's context runs to the end (left padding)
    window = (index >= 0) & ((index < DUO_SINK) | (index >= size - DUO_RECENT))
    return selectable & window[None, :, None, :]


def baseline_scores(method: str, model, cache: KVzipCache, seed: int = 0) -> torch.Tensor:
    """``[L, B, H, C]`` query-agnostic scores of a baseline, from the prefilled dense ``cache``."""
    selectable = cache.selectable_pairs()
    if method == "random":
        return random_scores(selectable, seed)
    if method == "streaming":
        return streaming_scores(selectable, cache.context_start, cache.context_offset)
    if method == "snapkv":
        return snapkv_scores(model, cache)
    if method == "h2o":
        return h2o_scores(model, cache)
    raise ValueError(f"unknown baseline {method!r}; choose one of {BASELINES}")


# ------------------------------------------------------------------------------------------------------- sweeps
def sweep(
    method: str, model, tokenizer, cache: KVzipCache, ratios: list[float], *, seed: int = 0,
    kvzip_scores: torch.Tensor | None = None, head_scores: torch.Tensor | None = None,
    predictor: ScorePredictor | None = None,
) -> Iterator[float]:
    """Compress ``cache`` in place to each ratio (largest first) and yield the ratio once it is applied.

    ``kvzip_scores``: reuse these ``[L, B, H, C]`` KVzip scores instead of a scoring pass (the other kvzip level
    scores the same context identically). ``head_scores``: ``[L, H]`` precomputed head scores for the head methods
    (default: derived from this context's KVzip scores). ``predictor``: the `ScorePredictor` of ``predicted`` and
    ``predicted-prefill`` (required for them).

    ``predicted-prefill`` does not compress the prefilled ``cache``: for every ratio it resets it and prefills the
    same ids again with ``predictor`` and that ratio, ``PREDICTED_PREFILL_CHUNK`` tokens per chunk, each chunk
    keeping ``round(ratio * n)`` of its ``n`` selectable pairs per row (the result at one ratio is not a
    re-selection of a larger one, since the later chunks attend to what the earlier ones kept).
    """
    ratios = sorted(set(ratios), reverse=True)
    if method == "full":
        yield 1.0
        return
    if method in KVZIP_LEVELS or method == KVZIP_PLUS:
        level = KVZIP_LEVELS.get(method, "pair")
        score = "kvzip+" if method == KVZIP_PLUS else None
        if kvzip_scores is not None and score is None:
            cache.scores = kvzip_scores.clone()
        cache.compress(model, 1.0, tokenizer=tokenizer, level=level, score=score)  # scores once; evicts nothing
        for ratio in ratios:
            if ratio < 1.0:
                cache.compress(model, ratio, level=level)  # re-selects among the kept pairs with the stored scores
            yield ratio
        return
    if method in PREDICTED_METHODS:
        if predictor is None:
            raise ValueError(f"method {method!r} needs a ScorePredictor: sweep(..., predictor=...)")
        if method == "predicted":
            cache.compress(model, 1.0, predictor=predictor)  # predicts every pair's score; evicts nothing
            for ratio in ratios:
                if ratio < 1.0:
                    cache.compress(model, ratio)  # re-selects among the kept pairs with the predicted scores
                yield ratio
            return
        ids, mask, starts = cache.input_ids, cache.attention_mask, cache.context_start
        for ratio in ratios:
            cache.reset()
            cache.prefill(model, ids, mask, context_start=starts, chunk_size=PREDICTED_PREFILL_CHUNK,
                          predictor=predictor, ratio=ratio)
            yield ratio
        return
    if method in HEAD_METHODS:
        selectable = cache.selectable_pairs()
        if head_scores is None:  # each row (context) ranks its heads by its own pair scores
            if kvzip_scores is None:
                kvzip_scores = score_by_reconstruction(cache, model, tokenizer)
            per_row = [head_scores_from_pairs(kvzip_scores[:, row : row + 1]) for row in range(selectable.shape[1])]
        else:
            per_row = [torch.as_tensor(head_scores)] * selectable.shape[1]
        streaming = _streaming_window(cache, selectable) if method == "kvzip-head-duo" else None
        for ratio in ratios:
            keep = torch.cat([select_heads(selectable[:, row : row + 1], scores, ratio)
                              for row, scores in enumerate(per_row)], dim=1)
            cache.evict(keep if streaming is None else keep | streaming)
            yield ratio
        return
    masks = nested_masks(baseline_scores(method, model, cache, seed), ratios)
    for ratio in ratios:
        cache.evict(masks[ratio].to(cache.attention_mask.device))
        yield ratio

"""Compression methods for the evaluation, all query-agnostic and swept over decreasing ratios.

``ratio`` is the fraction of selectable context pairs KEPT. ``kvzip`` / ``kvzip-uniform`` score the context once by
reconstruction (`KVzipCache.compress` at 1.0) and re-select among the kept pairs for each smaller ratio. The baselines
score every pair once, rank it within its (layer, row, KV head), and keep the top ``round(ratio * n)`` of each head
(``n`` = selectable positions), so the masks of decreasing ratios are nested and `KVzipCache.evict` only drops pairs.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import DynamicCache

from ..cache import KVzipCache
from ..compat import cache_kwarg
from ..selection import kept_count

KVZIP_LEVELS = {"kvzip": "pair", "kvzip-uniform": "pair-uniform"}
BASELINES = ("random", "streaming", "snapkv")
METHODS = ("full", *KVZIP_LEVELS, *BASELINES)

SINK_TOKENS = 4
SNAPKV_WINDOW = 32
SNAPKV_KERNEL = 7


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
    """``[L, B, H, C]`` uniform random scores (seeded), NaN where not selectable."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(selectable.shape, generator=generator)
    return values.masked_fill(~selectable.cpu(), float("nan"))


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
def snapkv_scores(
    model, cache: KVzipCache, window: int = SNAPKV_WINDOW, kernel: int = SNAPKV_KERNEL
) -> torch.Tensor:
    """SnapKV: attention of the last ``window`` context tokens to every key, computed once, without a question.

    The prefilled ids are run again through a separate `DynamicCache` (the last ``window`` tokens with eager
    attention and ``output_attentions``); the probabilities are averaged over the window's queries and the query
    heads of each KV head's group, then smoothed by an average pool of width ``kernel`` along the keys. The window
    itself scores highest (SnapKV always keeps it), within the same budget.

    Returns:
        ``[L, B, H, C]`` float scores in the layout of ``cache.scores``, NaN where not selectable.
    """
    ids, mask = cache.input_ids, cache.attention_mask.long()
    seq = ids.shape[1]
    window = min(window, seq - 1)
    previous = model.config._attn_implementation
    kwarg = cache_kwarg(model)
    dense = DynamicCache(config=model.config)
    # The long prefix runs with the model's own attention (the kvzip attention also serves a plain DynamicCache);
    # only the short window needs eager attention, which returns its probabilities.
    model(input_ids=ids[:, :-window], attention_mask=mask[:, :-window], use_cache=True, logits_to_keep=1,
          **{kwarg: dense})
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=ids[:, -window:], attention_mask=mask, use_cache=True, output_attentions=True,
                    logits_to_keep=1, **{kwarg: dense})
    finally:
        model.set_attn_implementation(previous)
    selectable = cache._selectable()
    num_layers, batch, heads, length = selectable.shape
    per_layer = []
    for attn in out.attentions:  # [B, Hq, window, seq]
        votes = attn.float().mean(dim=2)  # [B, Hq, seq]
        votes = votes.view(batch, heads, -1, seq).mean(dim=2)  # [B, H, seq]
        votes = torch.nn.functional.avg_pool1d(votes, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
        votes[..., seq - window :] = float("inf")
        per_layer.append(votes[..., cache.context_offset :])
    values = torch.stack(per_layer).cpu()  # [L, B, H, C]
    values = values.masked_fill(torch.isinf(values), float(values[torch.isfinite(values)].max()) + 1.0)
    return values.masked_fill(~selectable.cpu(), float("nan"))


def baseline_scores(method: str, model, cache: KVzipCache, seed: int = 0) -> torch.Tensor:
    """``[L, B, H, C]`` query-agnostic scores of a baseline, from the prefilled dense ``cache``."""
    selectable = cache._selectable()
    if method == "random":
        return random_scores(selectable, seed)
    if method == "streaming":
        return streaming_scores(selectable, cache.context_start, cache.context_offset)
    if method == "snapkv":
        return snapkv_scores(model, cache)
    raise ValueError(f"unknown baseline {method!r}; choose one of {BASELINES}")


# ------------------------------------------------------------------------------------------------------- sweeps
def sweep(
    method: str, model, tokenizer, cache: KVzipCache, ratios: list[float], *, seed: int = 0,
    kvzip_scores: torch.Tensor | None = None,
) -> Iterator[float]:
    """Compress ``cache`` in place to each ratio (largest first) and yield the ratio once it is applied.

    ``kvzip_scores``: reuse these ``[L, B, H, C]`` KVzip scores instead of a scoring pass (the other kvzip level
    scores the same context identically).
    """
    ratios = sorted(set(ratios), reverse=True)
    if method == "full":
        yield 1.0
        return
    if method in KVZIP_LEVELS:
        level = KVZIP_LEVELS[method]
        if kvzip_scores is not None:
            cache.scores = kvzip_scores.clone()
        cache.compress(model, 1.0, tokenizer=tokenizer, level=level)  # scores once; evicts nothing
        for ratio in ratios:
            if ratio < 1.0:
                cache.compress(model, ratio, level=level)  # re-selects among the kept pairs
            yield ratio
        return
    masks = nested_masks(baseline_scores(method, model, cache, seed), ratios)
    for ratio in ratios:
        cache.evict(masks[ratio].to(cache.attention_mask.device))
        yield ratio

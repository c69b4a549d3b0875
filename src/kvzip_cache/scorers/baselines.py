"""Query-agnostic baselines, as context scorers: random, StreamingLLM, SnapKV and H2O.

Each rates every context pair once from the prefilled cache; with ``level="pair-uniform"`` (their ``level``) every
(layer, row, KV head) keeps the top ``round(ratio * n)`` of its ``n`` context positions, so the masks of decreasing
ratios are nested and a second ``compress`` at a smaller ratio only drops pairs. SnapKV and H2O run the prefilled
ids once more through a separate `DynamicCache` with eager attention to read attention probabilities (the model is
switched to ``"eager"`` with its public ``set_attn_implementation`` for that pass and back afterwards).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..compat import cache_kwarg
from .base import PrefilledContext

SINK_TOKENS = 4
SNAPKV_WINDOW = 32
SNAPKV_KERNEL = 7
H2O_RECENT = 32


class RandomScorer:
    """Uniform random scores (seeded). Each row draws ``[L, H, n]`` values for its own ``n`` columns (from its first
    selectable one to the end: left padding) with the same seed, so a context gets the same scores alone or in a
    padded batch."""

    name, level = "random", "pair-uniform"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def score_context(self, model, context: PrefilledContext) -> torch.Tensor:
        selectable = context.selectable.cpu()
        values = torch.full(selectable.shape, float("nan"))
        used = selectable.any(dim=2).any(dim=0)  # [B, C]
        for row in range(selectable.shape[1]):
            columns = used[row].nonzero()
            if not len(columns):
                continue
            first = int(columns[0])
            generator = torch.Generator().manual_seed(self.seed)
            shape = (selectable.shape[0], selectable.shape[2], selectable.shape[3] - first)
            values[:, row, :, first:] = torch.rand(shape, generator=generator)
        return context.local_heads(values.masked_fill(~selectable, float("nan")), dim=2)


class StreamingScorer:
    """StreamingLLM: the first ``sinks`` context tokens of each row first, then the most recent ones (column ``j``
    scores ``j``, sinks ``2 C``)."""

    name, level = "streaming", "pair-uniform"

    def __init__(self, sinks: int = SINK_TOKENS) -> None:
        self.sinks = sinks

    def score_context(self, model, context: PrefilledContext) -> torch.Tensor:
        selectable = context.selectable
        offset, length = context.offset, selectable.shape[-1]
        columns = torch.arange(length, dtype=torch.float32)
        in_context = torch.arange(offset, offset + length)[None, :] - context.context_start.cpu()[:, None]  # [B, C]
        per_row = torch.where((in_context >= 0) & (in_context < self.sinks), float(2 * length), columns[None, :])
        values = per_row[None, :, None, :].expand(selectable.shape).clone()
        return context.local_heads(values.masked_fill(~selectable.cpu(), float("nan")), dim=2)


class SnapKVScorer:
    """SnapKV: attention of the last ``window`` context tokens to every key, computed once, without a question.

    The probabilities (`observed_attention`) are averaged over the window's queries and the query heads of each KV
    head's group, then smoothed by an average pool of width ``kernel`` along the keys. The window itself ranks
    first (SnapKV always keeps it), within the same budget.
    """

    name, level = "snapkv", "pair-uniform"

    def __init__(self, window: int = SNAPKV_WINDOW, kernel: int = SNAPKV_KERNEL) -> None:
        self.window, self.kernel = window, kernel

    def score_context(self, model, context: PrefilledContext) -> torch.Tensor:
        seq = context.input_ids.shape[1]
        window = min(self.window, seq - 1)
        pooled = [
            torch.nn.functional.avg_pool1d(votes, self.kernel, stride=1, padding=self.kernel // 2,
                                           count_include_pad=False)
            for votes in observed_attention(model, context, seq - window)
        ]
        return _finish(pooled, context, window)


class H2OScorer:
    """H2O-style heavy hitters: the attention each key accumulates over the whole prefill (every query, causal),
    summed over all queries and averaged over the query group; the last ``recent`` context tokens rank first (H2O
    keeps a recent window)."""

    name, level = "h2o", "pair-uniform"

    def __init__(self, recent: int = H2O_RECENT) -> None:
        self.recent = recent

    def score_context(self, model, context: PrefilledContext) -> torch.Tensor:
        return _finish(observed_attention(model, context, 0), context, self.recent)


@torch.no_grad()
def observed_attention(model, context: PrefilledContext, first_query: int, chunk: int = 512) -> list[torch.Tensor]:
    """Attention that the prefilled keys receive from the queries at positions ``>= first_query``.

    The prefilled ids run again through a separate `DynamicCache`: positions before ``first_query`` with the
    model's own attention (the kvzip attention also serves a plain DynamicCache), the rest ``chunk`` queries at a
    time with eager attention and ``output_attentions``, so at most ``[B, Hq, chunk, seq]`` probabilities per
    layer exist at once. Padding queries do not vote.

    Returns:
        one ``[B, H, seq]`` float32 tensor per layer: probabilities summed over the voting queries and averaged over
        the query heads of each KV head's group.
    """
    ids, mask = context.input_ids, context.attention_mask.long()
    batch, seq = ids.shape
    heads = context.local_kv_heads
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


def _finish(per_layer: list[torch.Tensor], context: PrefilledContext, always_kept: int) -> torch.Tensor:
    """Stack per-layer ``[B, H, seq]`` votes into ``[L, B, H, C]`` scores; the last ``always_kept`` positions rank
    first; NaN where not selectable."""
    seq = context.input_ids.shape[1]
    values = torch.stack([votes[..., context.offset :] for votes in per_layer]).cpu()
    if always_kept:
        values[..., values.shape[-1] - min(always_kept, seq - context.offset) :] = float("inf")
    finite = values[torch.isfinite(values)]
    values = values.masked_fill(torch.isinf(values), (float(finite.max()) if finite.numel() else 0.0) + 1.0)
    return values.masked_fill(~context.local_heads(context.selectable, dim=2).cpu(), float("nan"))

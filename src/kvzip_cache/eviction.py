"""When and how much to evict while the cache is being filled (never runs the model).

`PrefillEviction` is the step a `KVzipCache.prefill(..., predictor=p, ratio=r)` runs after every chunk: the score
predictor rates the chunk's context pairs from the keys and values the cache now holds, a top-k keeps ``r`` of them,
and the layers free the rest before the next chunk arrives.

Why the budget is spread per chunk: the predictor's log scores are comparable across layers and heads (one
regression target), so within a chunk one top-k over layers x heads x positions gives the same non-uniform budgets
as pair-level KVzip; across chunks, a global threshold would need the scores of chunks not seen yet, and could not
bound memory. A fixed share per chunk guarantees peak KV <= ratio x full + one chunk, at the cost of a selection
that cannot move budget between chunks (compress-after-prefill can).
"""

from __future__ import annotations

import torch

from .scorers.predictor import ScorePredictor
from .selection import select_pairs


class PrefillEviction:
    """Evicts each prefill chunk's context pairs by predicted score (see the module docstring).

    Attributes:
        scores: ``[L, B, H, S - min(context_start)]`` float32 predicted log scores of every context pair (NaN where
            not selectable), filled chunk by chunk: what ``cache.scores`` holds afterwards.
        keep_mask: the same shape, bool: the pairs kept.
    """

    def __init__(self, cache, model, predictor: ScorePredictor, ratio: float, level: str, mask: torch.Tensor,
                 starts: torch.Tensor) -> None:
        self.model, self.predictor, self.ratio, self.level = model, predictor, ratio, level
        self.mask, self.starts = mask, starts
        self.positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # the prefill's position ids
        self.base = int(starts.min())
        self.layers = cache.compressible_layers
        self.parallel = cache.tensor_parallel  # the layers hold this rank's heads; scores and selection are global
        batch, seq = mask.shape
        shape = (len(cache.layers), batch, cache.num_kv_heads, seq - self.base)
        self.scores = torch.full(shape, float("nan"), dtype=torch.float32, device=mask.device)
        self.keep_mask = torch.zeros(shape, dtype=torch.bool, device=mask.device)

    @torch.no_grad()
    def after_chunk(self, cache, lo: int, hi: int) -> None:
        """Score and evict the context pairs of positions ``[lo, hi)``, which the last forward pass appended."""
        columns = torch.arange(lo, hi, device=self.mask.device)
        real = self.mask[:, lo:hi]  # [B, t]
        in_context = columns[None, :] >= self.starts[:, None]
        chunk_kv = {}
        for idx in self.layers:
            layer = cache.layers[idx]
            if layer.is_compressed:  # later chunks arrive as the tail of the compressed layer
                chunk_kv[idx] = layer.tail_keys[:, :, : layer.tail_length], layer.tail_values[:, :, : layer.tail_length]
            else:  # the first chunk: the layer is still dense and holds exactly [0, hi)
                chunk_kv[idx] = layer.keys[:, :, lo:hi], layer.values[:, :, lo:hi]
        predicted = self.predictor.predict_layers(self.model, chunk_kv, self.positions[:, lo:hi], self.parallel)
        num_layers, batch, num_heads, _ = self.scores.shape
        chunk_scores = torch.full((num_layers, batch, num_heads, hi - lo), float("nan"), dtype=torch.float32,
                                  device=self.mask.device)
        for idx, values in predicted.items():
            chunk_scores[idx] = values.to(chunk_scores.device)
        chunk_scores.masked_fill_(~(real & in_context)[None, :, None, :], float("nan"))
        keep = select_pairs(chunk_scores, self.ratio, self.level)  # [L, B, H, t]
        prefix = (real & ~in_context)[:, None, :]  # protected prefix: always kept; padding: never
        for idx in self.layers:
            layer_keep = keep[idx] | prefix
            if self.parallel is not None:
                layer_keep = self.parallel.local(layer_keep, dim=1)
            layer = cache.layers[idx]
            if layer.is_compressed:
                layer.absorb_tail(layer_keep)
            else:
                layer.evict(layer_keep)  # the first chunk turns the layer ragged
        first = max(lo, self.base)
        if first < hi:
            self.scores[..., first - self.base : hi - self.base] = chunk_scores[..., first - lo :]
            self.keep_mask[..., first - self.base : hi - self.base] = keep[..., first - lo :]

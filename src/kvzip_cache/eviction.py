"""When and how much to evict while the cache is being filled (never runs the model).

`PrefillEviction` is the step a `KVzipCache.prefill(..., predictor=p, ratio=r)` runs after every chunk: the score
predictor rates the chunk's context pairs from the keys and values the cache now holds, a top-k keeps ``r`` of them,
and the layers free the rest before the next chunk arrives.

Why the budget is spread per chunk: the predictor's log scores are comparable across layers and heads (one
regression target), so within a chunk one top-k over layers x heads x positions gives the same non-uniform budgets
as pair-level KVzip; across chunks, a global threshold would need the scores of chunks not seen yet, and could not
bound memory. A fixed share per chunk guarantees peak KV <= ratio x full + one chunk, at the cost of a selection
that cannot move budget between chunks (compress-after-prefill can).

`DecodeEviction` does the same for the tokens appended after the context (question, answer, later turns): set by
`KVzipCache.evict_while_decoding`, it runs at the start of a forward pass, before any layer appends. Once the tail
holds ``2 * window`` tokens, its oldest ``window`` tokens (or a multiple of it, after a long question) are scored, the
top ``ratio`` of their pairs move into the ragged store and the rest are freed; the newest ``window`` tokens always
stay in the dense tail. Memory after ``n`` appended tokens is then about ``ratio * n + 2 * window`` tokens' worth
instead of ``n`` (KVzap's and Fast KVzip's decoding buffer).
"""

from __future__ import annotations

import torch

from dataclasses import dataclass

from .scorers.predictor import ScorePredictor
from .selection import select_pairs


def predict_and_select(model, predictor: ScorePredictor, parallel, layer_kv: dict[int, tuple[torch.Tensor, torch.Tensor]],
                       positions: torch.Tensor, selectable: torch.Tensor, shape: tuple[int, ...], ratio: float,
                       level: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted scores of ``t`` new pairs per (layer, row, head), and the ``ratio`` of them kept.

    Args:
        layer_kv: ``{full layer: (keys, values)}``, each ``[B, H_local, t, D]`` as cached (this rank's heads).
        positions: ``[B, t]`` int64 position ids of the pairs (the predictor undoes RoPE with them).
        selectable: ``[B, t]`` bool: the positions that compete for the budget (no padding, no protected prefix).
        shape: ``(L, B, H, ...)``: all layers and all KV heads (tensor parallel: the global heads).
        ratio: the fraction kept, as for `select_pairs`.
        level: ``"pair"`` or ``"pair-uniform"``, as for `select_pairs`.

    Returns:
        ``(scores, keep)``, ``[L, B, H, t]`` float32 (NaN where not selectable) and bool.
    """
    num_layers, batch, num_heads = shape[:3]
    predicted = predictor.predict_layers(model, layer_kv, positions, parallel)
    scores = torch.full((num_layers, batch, num_heads, positions.shape[1]), float("nan"), dtype=torch.float32,
                        device=selectable.device)
    for idx, values in predicted.items():
        scores[idx] = values.to(scores.device)
    scores.masked_fill_(~selectable[None, :, None, :], float("nan"))
    return scores, select_pairs(scores, ratio, level)


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
        chunk_scores, keep = predict_and_select(self.model, self.predictor, self.parallel, chunk_kv,
                                                self.positions[:, lo:hi], real & in_context, self.scores.shape,
                                                self.ratio, self.level)
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


@dataclass(frozen=True)
class DecodeEvictionStep:
    """One eviction of tail tokens: the ``count`` tokens at padded positions ``start .. start + count - 1``.

    ``keep`` is ``[L, B, H, count]`` bool over all layers and KV heads (False on sliding layers and padding): the pairs
    moved into the ragged store; every other pair of those tokens was freed.
    """

    start: int
    count: int
    keep: torch.Tensor


class DecodeEviction:
    """Evicts the oldest tail tokens by predicted score while decoding (see the module docstring).

    Attributes:
        window: the newest ``window`` tail tokens always stay; eviction runs when the tail reaches ``2 * window``.
        history: the `DecodeEvictionStep` of every eviction since the context was last returned to (`restart`).
    """

    def __init__(self, cache, model, predictor: ScorePredictor, ratio: float, window: int, level: str) -> None:
        self.model, self.predictor, self.ratio, self.window, self.level = model, predictor, ratio, window, level
        self.layers = cache.compressible_layers
        self.parallel = cache.tensor_parallel
        self.history: list[DecodeEvictionStep] = []
        self.restart(cache)

    def restart(self, cache) -> None:
        """Start from the cache as it is (no padding in its tail): after `KVzipCache.rollback`, its compressed
        context."""
        self.history.clear()
        # Real (non-padding) tokens before the tail, per row: the position id of the tail's first real token. Tokens
        # absorbed earlier (one row: no padding among them) count too.
        absorbed = cache.layers[self.layers[0]].context_length - cache.context_length
        self._real_before = cache.attention_mask.sum(-1) + absorbed
        # [B, n] bool: which of the tail's first n slots are real tokens (a left-padded question), None when all are.
        self._tail_real: torch.Tensor | None = None

    @torch.no_grad()
    def before_forward(self, cache, new_tokens: int, batch: int) -> None:
        """Called once per eager forward pass before any layer appends its ``new_tokens``; a refusal changes
        nothing."""
        layer = cache.layers[self.layers[0]]
        if layer.src_rows != tuple(range(layer.context.num_rows)) or batch != layer.context.num_rows:
            raise RuntimeError(
                "evict_while_decoding() moves each row's answer into that row's compressed context, so it needs one "
                "row per stored context: not with shared=True questions, beams or num_return_sequences. Call "
                "cache.evict_while_decoding(None) to turn it off for them"
            )
        tail = layer.tail_length
        self._note_padding(cache, tail, new_tokens, batch)
        if tail >= 2 * self.window:
            self._evict(cache, (tail - self.window) // self.window * self.window)

    def _note_padding(self, cache, tail: int, new_tokens: int, batch: int) -> None:
        """Record which of the ``new_tokens`` slots about to be appended are padding (never kept)."""
        if new_tokens == 1 or batch == 1:
            return  # one token per row (decoding) or one row: no padding inside the tail
        pending = cache.pending_query_mask
        if tail == 0 and pending is not None and pending.shape == (batch, new_tokens):
            self._tail_real = None if bool(pending.all()) else pending.clone()
            return
        raise ValueError(
            f"evict_while_decoding() needs to know which of these {new_tokens} tokens of a batch of {batch} are left "
            "padding: build the first forward after the context with cache.inputs_for(query_ids, query_mask) (a "
            "multi-token step later in a batched conversation cannot be told apart from padding)"
        )

    def _evict(self, cache, count: int) -> None:
        """Score the tail's oldest ``count`` tokens, move the kept pairs into the ragged store, free the rest."""
        first = cache.layers[self.layers[0]]
        device = first.tail_keys.device
        real = torch.ones(len(first.src_rows), count, dtype=torch.bool, device=device)
        if self._tail_real is not None:
            width = min(count, self._tail_real.shape[1])
            real[:, :width] = self._tail_real[:, :width].to(device)
            self._tail_real = self._tail_real[:, width:] if width < self._tail_real.shape[1] else None
        before = self._real_before.to(device)
        positions = before[:, None] + real.long().cumsum(-1) - 1
        layer_kv = {idx: (cache.layers[idx].tail_keys[:, :, :count], cache.layers[idx].tail_values[:, :, :count])
                    for idx in self.layers}
        shape = (len(cache.layers), len(first.src_rows), cache.num_kv_heads)
        _, keep = predict_and_select(self.model, self.predictor, self.parallel, layer_kv, positions, real, shape,
                                     self.ratio, self.level)
        start = first.context_length
        for idx in self.layers:
            layer_keep = keep[idx] if self.parallel is None else self.parallel.local(keep[idx], dim=1)
            cache.layers[idx].absorb_tail(layer_keep, count)
        self._real_before = before + real.sum(-1)
        self.history.append(DecodeEvictionStep(start, count, keep))

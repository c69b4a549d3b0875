"""When and how much to evict while the cache is being filled: eviction policies that never run the model.

Both policies rate pairs with any layer scorer (`kvzip_cache.scorers.base.LayerScorer`: the trained predictor, head
scores, KeyDiff, one of your own), select with `kvzip_cache.selection.select`, and hand the keep masks to the cache's
one eviction path (`KVzipCache.keep_pairs`).

`PrefillEviction` is the step a ``KVzipCache.prefill(..., scorer=s, ratio=r)`` runs after every chunk: the scorer
rates the chunk's context pairs from the keys and values the cache now holds, a top-k keeps ``r`` of them, and the
layers free the rest before the next chunk arrives.

Two budgets (``budget=``), both holding peak KV <= ratio x full + one chunk:

- ``"chunk"`` (default): each chunk keeps ``ratio`` of its own pairs. Within a chunk one top-k over layers x heads x
  positions gives the same non-uniform budgets as pair-level KVzip (the predictor's log scores are on one scale),
  but budget cannot move between chunks: a fact-dense chunk loses pairs that a sparse one wastes.
- ``"carry"``: after each chunk, one top-k re-selects ``ratio`` of every context pair seen so far among those still
  held (the earlier chunks' survivors and the new chunk), by the scores each got when its chunk was rated; pairs
  kept earlier can lose their place to better ones later. The kept set can only shrink toward the past, never grow
  back (an evicted pair is gone), so the result is not compress-after-prefill's selection, but budget flows from
  sparse chunks to dense ones that come later. Pair levels only.

A global threshold over the whole context would need the scores of chunks not seen yet and could not bound memory.
A layer that has dropped nothing yet (a head-level selection that keeps all its heads) stays dense, and so is
attended to densely, until it first drops a pair.

`DecodeEviction` does the same for the tokens appended after the context (question, answer, later turns): set by
`KVzipCache.evict_while_decoding`, it runs at the start of a forward pass, before any layer appends. Once the tail
holds ``2 * window`` tokens, its oldest ``window`` tokens (or a multiple of it, after a long question) are rated, the
top ``ratio`` of their pairs move into the ragged store and the rest are freed; the newest ``window`` tokens always
stay in the dense tail. Memory after ``n`` appended tokens is then about ``ratio * n + 2 * window`` tokens' worth
instead of ``n`` (KVzap's and Fast KVzip's decoding buffer).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria

from .parallel import TensorParallel
from .scorers.base import LayerScorer, rate_layers
from .selection import select, select_among

BUDGETS = ("chunk", "carry")


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` int64 position ids of a left-padded ``[B, S]`` padding mask: what ``generate`` derives, with ``-1``
    on padding (the layer scorers' convention)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(~mask.bool(), -1)


def rate_pairs(scorer: LayerScorer, layer_kv: dict[int, tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor,
               selectable: torch.Tensor, num_layers: int, parallel: TensorParallel | None) -> torch.Tensor:
    """``[L, B, H, t]`` float32 scores of ``t`` new pairs per (layer, row, KV head), over all KV heads.

    Args:
        layer_kv: ``{full layer: (keys, values)}``, each ``[B, H_local, t, D]`` as cached (this rank's heads).
        positions: ``[B, t]`` int64 position ids of the pairs, ``-1`` on padding.
        selectable: ``[B, t]`` bool: the positions that compete for the budget (no padding, no protected prefix);
            NaN elsewhere.
        parallel: tensor parallelism: each rank rates its own heads, and the scores of all ranks are gathered.
    """
    scores = rate_layers(scorer, layer_kv, positions, num_layers, selectable.device)
    if parallel is not None:
        scores = parallel.gather(scores, dim=2)
    return scores.masked_fill_(~selectable[None, :, None, :], float("nan"))


class PrefillEviction:
    """Evicts each prefill chunk's context pairs by their layer scores (see the module docstring).

    Args:
        scorer: a layer scorer.
        ratio: the fraction of each chunk's selectable pairs kept.
        level: ``"pair"``, ``"pair-uniform"`` or ``"head"`` (`kvzip_cache.selection.select`), within each chunk.
        mask: ``[B, S]`` bool padding mask of the prefill.
        starts: ``[B]`` first context position of each row.
        num_layers: the model's layers.
        num_kv_heads: its KV heads per layer (all ranks).
        full_layers: the layers that are scored and evicted.
        parallel: the cache's tensor-parallel layout, or None.
        budget: ``"chunk"`` or ``"carry"`` (see the module docstring; `KVzipCache.prefill` checks it).

    Attributes:
        scores: ``[L, B, H, S - min(context_start)]`` float32 scores of every context pair (NaN where not
            selectable), filled chunk by chunk: what ``cache.scores`` holds afterwards.
        keep_mask: the same shape, bool: the pairs kept.
    """

    def __init__(self, scorer: LayerScorer, ratio: float, level: str, mask: torch.Tensor, starts: torch.Tensor,
                 num_layers: int, num_kv_heads: int, full_layers: list[int], parallel: TensorParallel | None,
                 budget: str = "chunk") -> None:
        self.scorer, self.ratio, self.level, self.budget = scorer, ratio, level, budget
        self.mask, self.starts, self.layers, self.parallel = mask, starts, full_layers, parallel
        self.positions = position_ids(mask)
        self.base = int(starts.min())
        batch, seq = mask.shape
        shape = (num_layers, batch, num_kv_heads, seq - self.base)
        self.scores = torch.full(shape, float("nan"), dtype=torch.float32, device=mask.device)
        self.keep_mask = torch.zeros(shape, dtype=torch.bool, device=mask.device)
        self._dense = set(full_layers)  # layers that have dropped nothing yet

    @torch.no_grad()
    def after_chunk(self, cache, lo: int, hi: int) -> None:
        """Rate and evict the context pairs of positions ``[lo, hi)``, which the last forward pass appended."""
        columns = torch.arange(lo, hi, device=self.mask.device)
        real = self.mask[:, lo:hi]  # [B, t]
        in_context = columns[None, :] >= self.starts[:, None]
        scores = rate_pairs(self.scorer, cache.dense_pairs(lo, hi - lo), self.positions[:, lo:hi], real & in_context,
                            len(self.scores), self.parallel)
        prefix = (real & ~in_context)[:, None, :]  # protected prefix: always kept; padding: never
        first = max(lo, self.base)
        if first < hi:
            self.scores[..., first - self.base : hi - self.base] = scores[..., first - lo :]
        if self.budget == "carry":
            self._carry(cache, lo, hi)
            return
        keep = select(scores, self.ratio, self.level)
        chunk_keep = {idx: keep[idx] | prefix for idx in self.layers}
        if first < hi:
            self.keep_mask[..., first - self.base : hi - self.base] = keep[..., first - lo :]
        dropping = {idx for idx in self._dense if bool((~chunk_keep[idx] & real[:, None, :]).any())}
        self._dense -= dropping
        cache.keep_pairs({idx: chunk_keep[idx] for idx in self.layers if idx not in self._dense and idx not in dropping},
                         start=lo)
        if dropping:  # a dense layer drops its first pairs: it keeps every real pair before this chunk
            cache.keep_pairs({idx: torch.cat([self.kept_before(lo, keep.shape[2]), chunk_keep[idx]], dim=-1)
                              for idx in dropping}, start=0)

    def _carry(self, cache, lo: int, hi: int) -> None:
        """``budget="carry"``: re-select ``ratio`` of every context pair seen so far among those still held."""
        first = max(lo, self.base)
        held = self.keep_mask[..., : hi - self.base].clone()
        held[..., first - self.base :] = True  # the new chunk competes whole
        keep = select_among(self.scores[..., : hi - self.base], held, self.ratio, self.level)  # [L, B, H, hi - base]
        self.keep_mask[..., : hi - self.base] = keep
        columns = torch.arange(hi, device=keep.device)
        protected = self.kept_before(hi, keep.shape[2]) & (columns[None, :] < self.starts[:, None])[:, None, :]

        # [B, H, hi] per layer: the prefix and the kept context pairs, in the layers' padded positions
        whole = {idx: torch.cat([protected[..., : self.base], protected[..., self.base :] | keep[idx]], dim=-1)
                 for idx in self.layers}
        ragged = [idx for idx in self.layers if idx not in self._dense]
        if ragged:  # the chunk joins the ragged store (what survives of it)
            cache.keep_pairs({idx: whole[idx][..., lo:] for idx in ragged}, start=lo)
        cache.keep_pairs(whole, start=0)  # earlier pairs that lost their place: freed
        self._dense.clear()

    def finish(self, cache) -> None:
        """Make the layers that never dropped a pair ragged too (the cache is then compressed throughout)."""
        seq = self.mask.shape[1]
        if self._dense:
            cache.keep_pairs({idx: self.kept_before(seq, self.scores.shape[2]) for idx in sorted(self._dense)}, start=0)
            self._dense.clear()

    def kept_before(self, end: int, num_heads: int) -> torch.Tensor:
        """``[B, H, end]`` bool: what a layer that dropped nothing keeps of positions ``< end`` (every real token)."""
        return self.mask[:, None, :end].expand(-1, num_heads, -1)


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
    """Evicts the oldest tail tokens by their layer scores while decoding (see the module docstring).

    Args:
        scorer: a layer scorer.
        ratio: the fraction of the appended pairs kept.
        window: the newest ``window`` tail tokens always stay; eviction runs when the tail reaches ``2 * window``.
        level: the selection within each evicted span (`kvzip_cache.selection.select`).

    Attributes:
        history: the `DecodeEvictionStep` of every eviction since the context was last returned to (`restart`).
    """

    def __init__(self, cache, scorer: LayerScorer, ratio: float, window: int, level: str) -> None:
        self.scorer, self.ratio, self.window, self.level = scorer, ratio, window, level
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
        start, tail = layer.recent_tail()
        self._note_padding(cache, tail, new_tokens, batch)
        if tail >= 2 * self.window:
            self._evict(cache, start, (tail - self.window) // self.window * self.window)

    def _note_padding(self, cache, tail: int, new_tokens: int, batch: int) -> None:
        """Record which of the ``new_tokens`` slots about to be appended are padding (never kept)."""
        if new_tokens == 1:
            return  # one token per row (decoding): no padding inside the tail
        pending = cache.pending_query_mask
        if tail == 0 and pending is not None and pending.shape == (batch, new_tokens):
            self._tail_real = None if bool(pending.all()) else pending.clone()
            for layer in cache.layers:  # static layers mask their slots themselves (compact_tail, compact_window)
                if getattr(layer, "tail_valid", None) is not None:
                    layer.tail_valid[:, layer.packed_slots : layer.packed_slots + new_tokens] = pending.to(
                        layer.tail_valid.device)
                elif getattr(layer, "slot_valid", None) is not None:
                    end = int(layer.end)
                    layer.slot_valid[:, end : end + new_tokens] = pending.to(layer.slot_valid.device)
            return
        if batch == 1:
            return  # one row and no padding recorded for it: every slot is a real token
        raise ValueError(
            f"evict_while_decoding() needs to know which of these {new_tokens} tokens of a batch of {batch} are left "
            "padding: build the first forward after the context with cache.inputs_for(query_ids, query_mask) (a "
            "multi-token step later in a batched conversation cannot be told apart from padding)"
        )

    def after_crop(self, cache) -> None:
        """Forget the padding of tail slots a crop cut (`KVzipCache.crop` cannot cut into the absorbed pairs)."""
        tail = cache.layers[self.layers[0]].tail_length
        if self._tail_real is not None:
            kept = self._tail_real[:, :tail]
            self._tail_real = None if bool(kept.all()) else kept

    def _evict(self, cache, start: int, count: int) -> None:
        """Rate the ``count`` oldest unrated tail tokens (from position ``start``), keep the chosen pairs (in the
        ragged store, or packed in a static tail), free the rest."""
        first = cache.layers[self.layers[0]]
        device = first.tail_keys.device
        real = torch.ones(len(first.src_rows), count, dtype=torch.bool, device=device)
        if self._tail_real is not None:
            width = min(count, self._tail_real.shape[1])
            real[:, :width] = self._tail_real[:, :width].to(device)
            self._tail_real = self._tail_real[:, width:] if width < self._tail_real.shape[1] else None
        before = self._real_before.to(device)
        positions = (before[:, None] + real.long().cumsum(-1) - 1).masked_fill(~real, -1)
        scores = rate_pairs(self.scorer, cache.dense_pairs(start, count), positions, real, len(cache.layers),
                            self.parallel)
        keep = select(scores, self.ratio, self.level)
        cache.keep_pairs({idx: keep[idx] for idx in self.layers}, start=start, room=True)
        for layer in cache.layers:  # a static cache's sliding windows move to the front with it (O(window))
            if getattr(layer, "slot_valid", None) is not None:
                layer.compact_window()
        self._real_before = before + real.sum(-1)
        self.history.append(DecodeEvictionStep(start, count, keep))


class EvictBetweenSteps(StoppingCriteria):
    """`generate`'s hook between decode steps (`KVzipCache.eviction_criteria`): runs the cache's eviction while
    decoding when its tail is due, and never stops generation. A compiled decode step replays a CUDA graph, in which
    the cache's own per-forward hook cannot run; this one runs on the host after each step, before the next."""

    def __init__(self, cache) -> None:
        self.cache = cache

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        cache = self.cache
        cache.evict_between_steps(input_ids.shape[0], check_room=False)
        full = cache.static_room() == 0  # the last step may fill the room exactly: stop rather than raise
        if full:
            warnings.warn("generation stopped: the static cache's tail is full; call cache.make_static() with a "
                          "larger max_new_tokens for longer answers", stacklevel=2)
        return torch.full((input_ids.shape[0],), full, dtype=torch.bool, device=input_ids.device)


def static_tail_room(tokens: int, ratio: float, window: int) -> int:
    """The most tail slots a static cache that evicts while decoding needs for ``tokens`` tokens after the context
    (question plus answer; at most ``tokens``): the packed pairs of every evicted span (``round(ratio x span)``
    each: at most ``ratio x tokens`` plus one per span), plus the ``2 x window`` newest tokens a step may hold.

    A question longer than that room is refused at its forward (`KVzipCache.make_static` with more tokens)."""
    spans = -(-tokens // window)
    return min(tokens, int(ratio * tokens) + spans + 2 * window)

"""The scorer protocol: how a way of rating context KV pairs meets the cache, without ever importing it.

A scorer rates pairs (higher = keep); the cache turns the ratings into keep masks (`kvzip_cache.selection`) and
evicts for real. Two kinds, both plain classes with one method:

- a **layer scorer** rates what one cache layer holds, and nothing else::

      class KeepFarKeys:
          def score_layer(self, layer_idx, keys, values, positions):   # [B, H, t, D], [B, H, t, D], [B, t]
              return (keys - keys.mean(dim=2, keepdim=True)).norm(dim=-1)   # [B, H, t], higher = keep

  Because it needs only keys, values and positions, the same object serves every place pairs are evicted:
  ``cache.compress(model, ratio, scorer=s)`` (the whole prefilled context), ``cache.prefill(..., scorer=s,
  ratio=r)`` (each chunk as it arrives) and ``cache.evict_while_decoding(model, s, ratio)`` (each window of the
  answer). The trained predictor (`PredictorScorer`), head scores (`HeadScorer`), KeyDiff and the simple baselines
  are layer scorers.
- a **context scorer** needs the model and the whole prefilled context: ``score_context(model, context)`` with a
  `PrefilledContext`, returning ``[L, B, H, C]``. Reconstruction (KVzip, KVzip+) and the attention-based baselines
  (SnapKV, H2O) are context scorers. They serve `compress` only.

A layer scorer may also rate several layers in one call, ``score_layers(layer_indices, keys, values, positions)``
with ``[n, B, H, t, D]`` keys and values, returning ``[n, B, H, t]``: the cache uses it for short spans (eviction
while decoding rates every layer's window between two decode steps, where issuing a dozen small operations per layer
costs more than computing them). The trained predictor has it.

Three optional attributes are read when present: ``name`` (recorded as ``cache.score_source``; default: the class
name), ``level`` (the selection the scores are meant for when ``compress`` gets no ``level=``: ``"pair"``,
``"pair-uniform"`` or ``"head"``; default ``"pair"``) and ``scores_kept_pairs`` (a context scorer that can rate
the pairs a compressed cache still keeps, reading ``context.kept``: the reconstruction scorers; default False).

Under tensor parallelism the cache hands each rank its own KV heads (``H`` is then the rank's share) and gathers
the scores of all ranks before it selects, so a scorer never needs to know.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..config import FULL
from ..parallel import TensorParallel
from ..selection import LEVELS
from ..views import ScoringPass


@runtime_checkable
class LayerScorer(Protocol):
    """Rates the pairs a cache layer holds. The one method a user implements."""

    def score_layer(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor,
                    positions: torch.Tensor) -> torch.Tensor:
        """Scores of one full-attention layer's pairs.

        Args:
            layer_idx: the layer (a full-attention layer; sliding-window layers are never scored).
            keys: ``[B, H, t, D]`` as cached: after RoPE.
            values: ``[B, H, t, D]``.
            positions: ``[B, t]`` int64 position ids of the pairs; ``-1`` marks left padding (never kept, whatever
                its score).

        Returns:
            ``[B, H, t]`` float, higher = keep. Only the order matters for ``"pair-uniform"``; ``"pair"`` compares
            scores across layers and heads, so they should be on one scale there.
        """
        ...


@runtime_checkable
class ContextScorer(Protocol):
    """Rates every pair of a prefilled context, with the model at hand."""

    def score_context(self, model, context: PrefilledContext) -> torch.Tensor:
        """``[L, B, H, C]`` float scores of the context's pairs (``C = S - context.offset``; NaN: not scored).

        Layers, rows and positions outside ``context.selectable`` are ignored; ``H`` is the rank's KV heads.
        """
        ...


class ScoringTarget(Protocol):
    """The cache as a reconstruction pass drives it (`KVzipCache` implements this).

    Handed to the model as its cache inside `scoring_pass`, it stores nothing: each full layer answers with the row
    plus the pass's tokens and writes scores where the `ScoringPass` says.
    """

    def reserve_scoring_room(self, tokens: int) -> None:
        """Make room after each dense layer's pairs for ``tokens`` pass tokens (so no pass copies the cache)."""

    def release_scoring_room(self) -> None:
        """Give that room back (after an interrupted pass: memory as before)."""

    def scoring_pass(self, record: ScoringPass) -> AbstractContextManager[None]:
        """Within this block, forward passes with this cache store nothing and write ``record``'s scores."""

    def dense_pairs(self, start: int, count: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{full layer: (keys, values)}`` ``[B, H, count, D]`` of positions ``start .. start + count - 1``
        (views of what the cache holds now, not copies)."""


@dataclass(frozen=True)
class PrefilledContext:
    """What a scorer may read of a prefilled cache (compressed or not).

    Attributes:
        input_ids: ``[B, S]`` the prefilled ids (left-padded).
        attention_mask: ``[B, S]`` bool, False on padding.
        context_start: ``[B]`` int64, the first context position of each row (earlier: the protected prefix).
        offset: ``min(context_start)``: position of column 0 of the ``[L, B, H, C]`` scores.
        positions: ``[B, S]`` int64 position ids, ``-1`` on padding.
        layer_types: per layer, ``"full_attention"`` or ``"sliding_attention"``.
        num_kv_heads: the model's KV heads per layer (all ranks).
        selectable: ``[L, B, H, C]`` bool: the pairs that compete for the budget (full layers, real tokens after
            the protected prefix), over all KV heads.
        tensor_parallel: the cache's layout under tensor parallelism, else None.
        target: the cache itself, for scorers that run the model over it or read its pairs (`ScoringTarget`).
        kept: None while the context is dense; on a compressed cache, ``[L, B, H, C]`` bool, the pairs it still
            keeps (only they can be scored; `dense_pairs` is then unavailable, and a reconstruction pass reads the
            kept pairs, `kvzip_cache.views.CompressedScoringKV`).

    The record holds no reference to the cached keys and values: `dense_pairs` reads them when asked. (Holding them
    kept every layer's pre-pass buffers alive while the reconstruction passes reallocated them with room for their
    tokens: one more copy of the whole KV at the compress peak, 21.0 against 18.9 GB on an H100 at 16K tokens.)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    context_start: torch.Tensor
    offset: int
    positions: torch.Tensor
    layer_types: tuple[str, ...]
    num_kv_heads: int
    selectable: torch.Tensor
    tensor_parallel: TensorParallel | None
    target: ScoringTarget
    kept: torch.Tensor | None = None

    def dense_pairs(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{full layer: (keys, values)}``, each ``[B, H, S - offset, D]`` (this rank's heads): the context's cached
        pairs from ``offset`` on, as cached (post-RoPE), read from the cache now (views, not copies)."""
        if self.kept is not None:
            raise ValueError("this cache is compressed: its context is no longer held densely, so a layer scorer "
                             "cannot rate it (only scorers with scores_kept_pairs, e.g. 'kvzip', score its kept pairs)")
        return self.target.dense_pairs(self.offset, self.input_ids.shape[1] - self.offset)

    @property
    def full_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind == FULL]

    @property
    def local_kv_heads(self) -> int:
        """KV heads per layer held by this process."""
        return self.num_kv_heads if self.tensor_parallel is None else self.tensor_parallel.local_kv_heads

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(L, B, H_local, C)``: the shape of the scores a context scorer returns."""
        batch, seq = self.input_ids.shape
        return len(self.layer_types), batch, self.local_kv_heads, seq - self.offset

    def local_heads(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's KV heads of a tensor over all heads (the tensor itself without tensor parallelism)."""
        return tensor if self.tensor_parallel is None else self.tensor_parallel.local(tensor, dim)


def scorer_name(scorer) -> str:
    """What the cache records as ``score_source`` for a scorer object."""
    return str(getattr(scorer, "name", None) or type(scorer).__name__)


def scorer_level(scorer, default: str = "pair") -> str:
    """The selection a scorer's scores are meant for (its ``level`` attribute, else ``default``)."""
    level = getattr(scorer, "level", None) or default
    if level not in LEVELS:
        raise ValueError(f"{scorer_name(scorer)}.level is {level!r}; a scorer's level is one of {LEVELS}")
    return level


STACKED_PAIRS = 2048
"""The most pairs per (layer, KV head), over all rows, that `rate_layers` stacks for a scorer's ``score_layers``:
stacking copies them, which costs nothing for a decoding window (256 MB at most for an 8B model's 32 layers in bf16)
and would double a long context's memory."""


def rate_layers(scorer: LayerScorer, layer_kv: dict[int, tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor,
                num_layers: int, device: torch.device) -> torch.Tensor:
    """``[L, B, H, t]`` float32 scores on ``device`` of the pairs in ``layer_kv`` (``{full layer: (keys, values)}``,
    each ``[B, H, t, D]`` as cached) at ``positions`` (``[B, t]``); NaN on the layers not given (sliding layers).

    ``positions`` is the same tensor object for every layer, so a scorer may cache what it derives from it (the
    predictor's RoPE tables). Spans of at most `STACKED_PAIRS` pairs per (layer, head) go to the scorer's
    ``score_layers`` in one call when it has one.
    """
    keys = next(iter(layer_kv.values()))[0]
    shape = (keys.shape[0], keys.shape[1], positions.shape[1])
    scores = torch.full((num_layers, *shape), float("nan"), dtype=torch.float32, device=device)
    if hasattr(scorer, "score_layers") and len(layer_kv) > 1 and positions.numel() <= STACKED_PAIRS:
        indices = list(layer_kv)
        rated = scorer.score_layers(indices, torch.stack([k for k, _ in layer_kv.values()]),
                                    torch.stack([v for _, v in layer_kv.values()]), positions)
        scores[indices] = check_layer_scores(scorer, rated, (len(indices), *shape), "score_layers").to(device)
        return scores
    for idx, (layer_keys, layer_values) in layer_kv.items():
        rated = scorer.score_layer(idx, layer_keys, layer_values, positions)
        scores[idx] = check_layer_scores(scorer, rated, shape).to(device)
    return scores


def score_context_by_layers(scorer: LayerScorer, context: PrefilledContext) -> torch.Tensor:
    """``[L, B, H, C]`` scores of a whole prefilled context from a layer scorer (NaN on sliding layers): every full
    layer's pairs from ``context.offset`` on, rated in one call (`rate_layers`)."""
    return rate_layers(scorer, context.dense_pairs(), context.positions[:, context.offset :],
                       len(context.layer_types), context.selectable.device)


def check_layer_scores(scorer, scores, shape: tuple[int, ...], method: str = "score_layer") -> torch.Tensor:
    """``scores`` as float32 if it is a tensor of ``shape``, else a refusal naming the scorer and the contract."""
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != tuple(shape):
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        dims = "[layers, batch, kv_heads, tokens]" if method == "score_layers" else "[batch, kv_heads, tokens]"
        raise ValueError(
            f"{scorer_name(scorer)}.{method} returned {got}; a layer scorer returns one score per pair it was "
            f"given, a float tensor {dims} = {list(shape)}"
        )
    return scores.float()


class GivenScores:
    """A context scorer that returns scores computed elsewhere (an earlier run, another tool, a test).

    Args:
        scores: ``[L, B, H, C]`` in the layout of ``cache.scores`` (all KV heads).
        name: recorded as ``cache.score_source``.
        level: the selection the scores are meant for.
    """

    def __init__(self, scores: torch.Tensor, name: str = "given", level: str = "pair") -> None:
        self.scores, self.name, self.level = scores, name, level

    def score_context(self, model, context: PrefilledContext) -> torch.Tensor:
        if tuple(self.scores.shape) != tuple(context.selectable.shape):
            raise ValueError(f"the given scores have shape {list(self.scores.shape)}; this context's are "
                             f"{list(context.selectable.shape)} ([layers, batch, kv_heads, context])")
        return context.local_heads(self.scores.to(context.selectable.device), dim=2)

"""What a cache layer hands to the attention backend.

`KVzipLayer.update()` returns plain tensors while the layer is dense (prefill, or a cache that was never
compressed). Once the layer is compressed, or while it is being scored, `update()` returns one of the small
objects below instead, and the "kvzip" attention function dispatches on its type. Data flows one way: the cache
builds these views; the backends read them (the scoring view also carries the buffer the backend writes scores
into). `ScoringPass` is the record of one reconstruction pass that the cache hands its layers while the pass runs.

Shapes use: B = batch, H = KV heads, D = head_dim, S = segments (= B0 * H for the B0 rows that were compressed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .storage import CompressedContext


class _KVzipView:
    """Base of the views a cache layer hands to the attention: other attention functions get a message that says
    what to do instead of an AttributeError deep inside the model."""

    def __getattr__(self, name: str):
        if name.startswith("__"):  # copy, pickle and friends probe for dunders: a plain AttributeError
            raise AttributeError(name)
        raise AttributeError(
            f"the attention function read {type(self).__name__}.{name}: a compressed KVzipCache hands its layers' "
            "keys to the 'kvzip' attention only. Load the model with attn_implementation='kvzip' (after `import "
            "kvzip_cache`) or call model.set_attn_implementation('kvzip') before generating from this cache."
        )


@dataclass(frozen=True)
class RaggedKV(_KVzipView):
    """Keys/values of a compressed layer as seen by one forward step.

    Row ``b`` of the batch attends to the compressed segments of row ``src_rows[b]`` (beams and repeated rows share
    one compressed context without copying it), then to its own dense tail.

    Attributes:
        context: the compressed context.
        src_rows: host tuple of length B: which compressed row each batch row reads.
        src_index: the same as an int32 ``[B]`` tensor on the device (for kernels; no host-device copy per step).
        tail_keys: ``[B, H, t, D]``, tokens appended after compression, including the ones of this step (last).
        tail_values: ``[B, H, t, D]``.
        length: the width of the padding mask: the logical sequence length (context + tail), or, for a static
            layer, the context length rounded up to its bucket plus the tail's capacity (a fixed width, so that
            documents of similar length share one compiled graph).
        tail_end: None, or (static layer, see `KVzipLayer.make_static`) a 0-dim int64 device tensor: only the first
            ``tail_end`` of the ``t`` tail slots are written, and this step's tokens are the last of them. Kept on the
            device so that a compiled decode step never reads it on the host.
        context_end: None, or (static layer) the context's logical length as a 0-dim int64 device tensor: the
            first tail slot's position, kept on the device for the same reason.
        share: ``R > 1`` when rows ``c * R .. c * R + R - 1`` all read one compressed row (`shared_run_length` of
            ``src_rows``): backends may then read that context once for the R rows.
        owner: None, or ``id()`` of the attention module of the model that filled this layer (recorded at
            `KVzipCache.prefill`, `KVzipCache.compress` and `KVzipCache.load`): the attention refuses a view met by
            another model's module.
        tail_valid: None, or (a static layer that evicts while decoding, see `KVzipLayer.compact_tail`) ``[B, t]``
            bool, which tail slots hold real tokens. Eviction packs the kept pairs into the tail's first slots, so
            the padding mask's columns no longer line up with the slots; this mask replaces them.
    """

    context: CompressedContext
    src_rows: tuple[int, ...]
    src_index: torch.Tensor
    tail_keys: torch.Tensor
    tail_values: torch.Tensor
    length: int
    tail_end: torch.Tensor | None = None
    context_end: torch.Tensor | None = None
    share: int = 1
    owner: int | None = None
    tail_valid: torch.Tensor | None = None

    def tail_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The ``[B, t]`` columns of a ``[B, length]`` padding mask that cover the tail (None without a mask).

        Dynamic view: the last ``t`` columns. Static view: the mask is padded to a bucketed width (see
        `KVzipLayer.make_static`), and the tail starts at the context length, which is read on the device. A static
        view that evicts while decoding carries its own slot mask (``tail_valid``), returned as it is.
        """
        if self.tail_valid is not None:
            return self.tail_valid
        if attention_mask is None:
            return None
        tail_len = self.tail_keys.shape[-2]
        if self.context_end is None:
            return attention_mask[:, -tail_len:]
        columns = self.context_end + torch.arange(tail_len, device=attention_mask.device)
        return attention_mask.gather(1, columns.expand(attention_mask.shape[0], -1))

    def written(self, tail_valid: torch.Tensor | None = None) -> tuple[RaggedKV, torch.Tensor | None]:
        """This view, and its ``[B, t]`` tail padding mask, cut to the written tail slots (a static layer's view
        becomes an ordinary one). Reads ``tail_end`` on the host: for eager code paths only."""
        if self.tail_end is None:
            return self, tail_valid
        end = int(self.tail_end)
        width = self.length - self.tail_keys.shape[-2] if self.context_end is None else int(self.context_end)
        view = RaggedKV(self.context, self.src_rows, self.src_index, self.tail_keys[:, :, :end],
                        self.tail_values[:, :, :end], width + end, share=self.share, owner=self.owner)
        return view, None if tail_valid is None else tail_valid[:, :end]


def shared_run_length(src_rows: tuple[int, ...]) -> int:
    """``R > 1`` when the batch rows come in runs of ``R`` consecutive rows that read the same compressed row, else 1.

    Rows ``c * R .. c * R + R - 1`` reading one compressed row is the layout of `KVzipCache.inputs_for` with
    ``shared=True`` (and of `batch_repeat_interleave`): the backends then read that row's context once for all ``R``
    rows (a shared-prefix, or cascade, attention) instead of once per row.
    """
    batch = len(src_rows)
    run = 1
    while run < batch and src_rows[run] == src_rows[0]:
        run += 1
    if run == 1 or batch % run:
        return 1
    for start in range(0, batch, run):
        if any(row != src_rows[start] for row in src_rows[start : start + run]):
            return 1
    return run


@dataclass(frozen=True)
class WindowKV(_KVzipView):
    """A static sliding-window layer's fixed buffers (see `KVzipSlidingLayer.make_static`): the window the prefill
    left, then the tokens appended since, written up to a device-side ``end``.

    Attributes:
        keys: ``[B, H, w + capacity, D]``: ``w`` window slots, then the tail's room.
        values: ``[B, H, w + capacity, D]``.
        start: 0-dim int64 device tensor, the sequence position of slot 0 (so slot ``j`` holds position
            ``start + j``).
        end: 0-dim int64 device tensor: slots written; this step's tokens are the last of them.
        valid: None, or (eviction while decoding) ``[B, w + capacity]`` bool, which slots hold real tokens.
    """

    keys: torch.Tensor
    values: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    valid: torch.Tensor | None = None

    def slot_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The ``[B, w + capacity]`` columns of a position-indexed padding mask that cover the buffers' slots; or,
        with eviction while decoding (the window moves to the front at each eviction, see
        `KVzipSlidingLayer.compact_window`), the layer's own slot mask ``valid``."""
        if self.valid is not None:
            return self.valid
        if attention_mask is None:
            return None
        columns = self.start + torch.arange(self.keys.shape[-2], device=attention_mask.device)
        return attention_mask.gather(1, columns.expand(attention_mask.shape[0], -1))


@dataclass(frozen=True)
class ScoringKV(_KVzipView):
    """Keys/values of a full layer during one reconstruction pass (nothing is kept in the cache).

    The queries of the pass attend to ``[cached row | new tokens]`` as usual; in addition the backend writes, for
    every cached key of the scored chunk, the maximum over query positions and over the KV head's query group of
    the softmax probability restricted to ``[protected prefix | chunk | new tokens (causal)]``.

    KVzip+ (KVzap, arXiv 2601.07891) passes set ``query_norms``: the backend then weights each probability
    ``p[j, t, i]`` by ``||W_O^(j) v_i|| / ||h_t||`` before the same max (``W_O^(j)``: query head ``j``'s slice of the
    module's ``o_proj``, which the attention function hands the backend; ``h_t``: the hidden state entering the
    attention module at query ``t``).

    Attributes:
        keys: ``[1, H, T + n, D]``: the scored row's ``T`` cached keys followed by the ``n`` keys of the
            reconstruction input. The layer writes the new keys into spare room after its cached ones, so this is a
            view and no pass copies the cache (see `KVzipLayer.reserve`).
        values: ``[1, H, T + n, D]``, the same for values.
        cached_length: ``T``.
        prefix_positions: ``[P]`` int64, the non-padding protected-prefix positions of the row.
        chunk: ``(start, end)`` positions of the scored chunk inside the cached row.
        scores_out: ``[H, end - start]`` float32 buffer the backend fills, or None: a pass that only needs the
            attention output (KVzip+'s hidden-state pass), so no score is computed.
        query_norms: None for KVzip scores; for KVzip+ scores, ``[n]`` float32 ``||h_t||``, the norm of the hidden
            state entering this layer's attention module (the output of its ``input_layernorm``) at each new token.
    """

    keys: torch.Tensor
    values: torch.Tensor
    cached_length: int
    prefix_positions: torch.Tensor
    chunk: tuple[int, int]
    scores_out: torch.Tensor | None
    query_norms: torch.Tensor | None = None

    @property
    def new_keys(self) -> torch.Tensor:
        """``[1, H, n, D]`` keys of the reconstruction input."""
        return self.keys[:, :, self.cached_length :]

    @property
    def is_plus(self) -> bool:
        """Whether this pass scores KVzip+ (the probabilities weighted by output and hidden-state norms)."""
        return self.query_norms is not None

    @property
    def width(self) -> int:
        """Columns of the pass's padding mask: the cached row plus the new tokens."""
        return self.keys.shape[-2]

    def score_inputs(self) -> ScoreInputs:
        """What the chunk's scores are computed from (see `ScoreInputs`)."""
        start, end = self.chunk
        cached = self.keys[0]
        return ScoreInputs(prefix_keys=cached.index_select(1, self.prefix_positions.to(cached.device)),
                           chunk_keys=cached[:, start:end], chunk_values=self.values[0, :, start:end],
                           new_keys=self.new_keys[0], chunk_kept=None)


@dataclass(frozen=True)
class CompressedScoringKV(_KVzipView):
    """A reconstruction pass over a compressed layer: the kept pairs are scored again (``compress`` with a
    reconstruction scorer on a cache compressed by another, e.g. a prefill that evicted with a predictor).

    The pass's queries attend to what the row keeps, then to the pass's own tokens (causal): ``context`` is an
    ordinary `RaggedKV` of the row with those tokens as its tail. The scores are those of `ScoringKV` with the
    evicted pairs absent: the softmax runs over ``[protected prefix | the chunk's kept pairs | new tokens
    (causal)]``, so they are KVzip's scores of the context the model now sees.

    Attributes:
        context: the row's compressed context (``src_rows = (row,)``) with the ``n`` new tokens as the tail.
        prefix_keys: ``[H, P, D]``, the protected prefix (always kept).
        chunk_keys: ``[H, C, D]``, the chunk's positions laid out densely, zero where evicted; ``chunk_values`` the
            same for values.
        chunk_kept: ``[H, C]`` bool, which of the chunk's pairs the layer keeps (only they get a score).
        scores_out, query_norms: as in `ScoringKV`.
    """

    context: RaggedKV
    prefix_keys: torch.Tensor
    chunk_keys: torch.Tensor
    chunk_values: torch.Tensor
    chunk_kept: torch.Tensor
    scores_out: torch.Tensor | None
    query_norms: torch.Tensor | None = None

    @property
    def is_plus(self) -> bool:
        return self.query_norms is not None

    @property
    def width(self) -> int:
        return self.context.length

    def score_inputs(self) -> ScoreInputs:
        return ScoreInputs(prefix_keys=self.prefix_keys, chunk_keys=self.chunk_keys, chunk_values=self.chunk_values,
                           new_keys=self.context.tail_keys[0], chunk_kept=self.chunk_kept)


@dataclass(frozen=True)
class ScoreInputs:
    """The keys one reconstruction pass scores a chunk with (one row; shapes ``[H, ., D]``).

    Attributes:
        prefix_keys: ``[H, P, D]`` protected prefix; chunk_keys / chunk_values: ``[H, C, D]``; new_keys: ``[H, n, D]``
            the pass's own tokens.
        chunk_kept: None (every chunk pair is there) or ``[H, C]`` bool: the pairs a compressed layer still keeps;
            the others are left out of the softmax and get no score.
    """

    prefix_keys: torch.Tensor
    chunk_keys: torch.Tensor
    chunk_values: torch.Tensor
    new_keys: torch.Tensor
    chunk_kept: torch.Tensor | None


@dataclass(frozen=True)
class ScoringPass:
    """One reconstruction pass over one cached row: what the cache's full layers need to answer it (`ScoringKV`).

    Attributes:
        row: the scored row of the batch.
        chunk: ``(start, end)`` positions of the scored chunk inside the row (padded coordinates).
        prefix_positions: ``[P]`` int64, the row's non-padding protected-prefix positions.
        scores_out: ``{full layer: [H, end - start] float32}`` buffers the backends write the scores into; a layer
            missing from it computes none (KVzip+'s hidden-state pass has none at all).
        query_norms: ``{full layer: [n] float32}`` ``||h_t||`` of the pass's tokens for KVzip+ scores; empty for KVzip.
    """

    row: int
    chunk: tuple[int, int]
    prefix_positions: torch.Tensor
    scores_out: dict[int, torch.Tensor] = field(default_factory=dict)
    query_norms: dict[int, torch.Tensor] = field(default_factory=dict)

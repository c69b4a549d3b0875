"""Cache layers of a `KVzipCache`.

`KVzipLayer` (full attention) has three modes:

1. **dense** - exactly transformers' `DynamicLayer`: used for the prefill and for a cache never compressed.
2. **scoring** - `peek()` returns a `ScoringKV` view of one cached row plus the new tokens; nothing is kept.
   `reserve()` first gives the dense keys spare room after the cached positions, where each pass writes its
   tokens, so no pass copies the cache.
3. **compressed** - after `evict()`: an immutable `CompressedContext` (ragged per KV head) plus a dense tail that
   grows in place (amortised doubling, so appending costs O(new tokens)). `update()` returns a `RaggedKV`.
   `make_static()` then preallocates the tail and keeps its length on the device, so that a decode step has fixed
   shapes and never reads a length on the host: it can be compiled and captured in a CUDA graph.

`KVzipSlidingLayer` is transformers' `DynamicSlidingWindowLayer` (never scored, never evicted) with a side-effect
free `peek()` for the scoring passes, a snapshot so `rollback()` can restore its window, and a window counted in
real tokens: it keeps the slots of recent multi-token steps (questions, which may be left-padded) on top of its
``sliding_window - 1``, so that padding between a context and its question never displaces a real token.

Every layer tracks ``cumulative_length``: the LOGICAL number of tokens seen, which `generate` uses for positions,
not the number of pairs kept.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .checks import check_batch
from .storage import CompressedContext
from .views import CompressedScoringKV, RaggedKV, ScoringKV, WindowKV, shared_run_length

# Smallest tail allocation: a question plus a short answer fits without regrowing.
_MIN_TAIL_CAPACITY = 64


def length_bucket(length: int) -> int:
    """The static bound a length is rounded up to (the next power of two, at least 64).

    A static layer sizes what a compiled decode step sees by its context's bucket (the bound on a segment's length,
    the padding mask's context part), so that every document whose lengths fall in the same buckets reuses one compiled graph.
    """
    return max(64, 1 << (max(length, 1) - 1).bit_length())


class KVzipLayer(DynamicLayer):
    """A full-attention layer that can be compressed into a ragged per-head layout."""

    is_compileable = False
    is_sliding = False

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.cumulative_length = 0
        self.context: CompressedContext | None = None
        self.context_length = 0  # logical length covered by `context`
        self.src_rows: tuple[int, ...] = ()
        self.src_index: torch.Tensor | None = None  # src_rows on the device
        self.tail_keys: torch.Tensor | None = None  # [B, H, capacity, D]
        self.tail_values: torch.Tensor | None = None
        self.tail_length = 0
        self._spare_keys: torch.Tensor | None = None  # [B, H, cached + spare, D] backing self.keys, see reserve()
        self._spare_values: torch.Tensor | None = None
        self.tail_end: torch.Tensor | None = None  # static mode: 0-dim int64 device tensor, written tail slots
        # Static mode with eviction while decoding (see compact_tail): which tail slots are real tokens ([B, capacity]
        # bool on the device), the tail tokens dropped so far (0-dim int64 on the device, logical minus physical
        # length) and, on the host, the slots at the tail's front that hold the kept pairs of evicted tokens.
        self.tail_valid: torch.Tensor | None = None
        self.tail_dropped: torch.Tensor | None = None
        self.packed_slots = 0
        self.dropped = 0
        self.context_end: torch.Tensor | None = None  # static mode: context_length on the device
        # Static mode: the padding mask's width, the context's length bucket plus the tail's capacity (the same for
        # every document in the bucket; `RaggedKV.tail_mask` finds the tail's columns on the device).
        self.static_mask_width = 0
        self.share = 1  # shared_run_length(src_rows)
        self._static_rows: tuple[int, ...] = ()  # static mode: the rows rollback() returns to
        self.is_compileable = False  # per instance: True once static
        self.owner: int | None = None  # id() of the attention module that filled this layer (see RaggedKV.owner)

    @property
    def is_static(self) -> bool:
        return self.tail_end is not None

    @property
    def is_compressed(self) -> bool:
        return self.context is not None

    # ----------------------------------------------------------------------------------------------- transformers API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, H, q, D]`` states; return dense keys/values, or a `RaggedKV` view once compressed."""
        if not self.is_compressed:
            keys, values = super().update(key_states, value_states)
            self.cumulative_length = keys.shape[-2]
            if self._spare_keys is not None and not self._has_room(0):
                self._spare_keys = self._spare_values = None  # the concatenation above left the reserved room
            return keys, values
        check_batch(key_states.shape[0], len(self.src_rows))
        if self.is_static:
            return self._update_static(key_states, value_states)
        self._append_tail(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        view = RaggedKV(
            context=self.context,
            src_rows=self.src_rows,
            src_index=self.src_index,
            tail_keys=self.tail_keys[:, :, : self.tail_length],
            tail_values=self.tail_values[:, :, : self.tail_length],
            length=self.cumulative_length,
            share=self.share,
            owner=self.owner,
        )
        return view, view

    def get_seq_length(self) -> int | torch.Tensor:
        """Tokens seen (logical length). A static layer returns a 0-dim device tensor, as transformers'
        `StaticLayer` does, so that compiled code never reads it on the host."""
        if self.is_static:
            length = self.tail_end + self.context_end
            return length if self.tail_dropped is None else length + self.tail_dropped
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.is_static:
            return self.static_mask_width, 0  # fixed: the context's bucket and the tail's capacity
        return self.cumulative_length + query_length, 0



    def get_max_length(self) -> int:
        return self.context_length + self.tail_keys.shape[2] if self.is_static else -1

    def reset(self) -> None:
        """Free everything: the next `update` starts an empty layer (transformers' reset only zeroes the tensors,
        which a later concatenation would keep in front of the new tokens)."""
        _release(self)
        self._spare_keys = self._spare_values = None
        self.cumulative_length = 0
        self.context, self.context_length, self.src_rows, self.src_index = None, 0, (), None
        self.tail_keys = self.tail_values = None
        self.tail_length = 0
        self.tail_end, self.context_end, self.is_compileable = None, None, False
        self.tail_valid = self.tail_dropped = None
        self.packed_slots = self.dropped = 0
        self.share, self._static_rows, self.static_mask_width = 1, (), 0
        self.owner = None

    def crop(self, tokens_to_remove: int) -> None:
        """Drop tokens from the end: ``-n`` removes n tokens; a positive n is the length to keep (legacy)."""
        if self.is_static:
            self._sync_static_length()
        self.check_crop(tokens_to_remove)
        keep = self.cumulative_length + tokens_to_remove if tokens_to_remove <= 0 else tokens_to_remove
        if keep >= self.cumulative_length:
            return
        if not self.is_compressed:
            super().crop(keep - self.cumulative_length)
            self.cumulative_length = keep
            return
        self.tail_length = keep - self.context_length - self.dropped
        self.cumulative_length = keep
        if self.is_static:
            self.tail_end.fill_(self.tail_length)

    def check_crop(self, tokens_to_remove: int, prefilled: int | None = None) -> None:
        """Raise unless `crop(tokens_to_remove)` can succeed (changes nothing). ``prefilled``: the cache's context
        length, short of this layer's when eviction while decoding moved answer tokens into the ragged store."""
        length = int(self.get_seq_length())
        keep = length + tokens_to_remove if tokens_to_remove <= 0 else tokens_to_remove
        if self.is_compressed and prefilled is not None and prefilled <= keep < self.context_length:
            raise ValueError(
                f"cannot crop to {keep} tokens: evict_while_decoding() moved tokens {prefilled}..."
                f"{self.context_length - 1} (after the context) into the compressed store, where they can no longer "
                f"be cut. Crop to {self.context_length} tokens or more, or call cache.rollback() to return to the "
                "context"
            )
        if self.is_compressed and keep < self.context_length:
            raise ValueError(
                f"cannot crop to {keep} tokens: the first {self.context_length} are the compressed context, which "
                "can only be dropped as a whole (cache.reset())"
            )
        packed = self.context_length + self.dropped + self.packed_slots  # a static tail's packed answer pairs
        if self.packed_slots and keep < packed:
            raise ValueError(
                f"cannot crop to {keep} tokens: evict_while_decoding() packed the kept pairs of tokens up to position "
                f"{packed - 1} into the static tail, where they can no longer be cut. Crop to {packed} tokens or "
                "more, or call cache.rollback() to return to the context"
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_compressed:
            return super().reorder_cache(beam_idx)
        order = beam_idx.tolist()
        self._set_src_rows(tuple(self.src_rows[i] for i in order))
        if self.tail_keys is not None:
            index = beam_idx.to(self.tail_keys.device)
            keys, values = self.tail_keys.index_select(0, index), self.tail_values.index_select(0, index)
            if self.is_static:  # in place: the buffers' addresses are part of a captured graph
                self.tail_keys.copy_(keys)
                self.tail_values.copy_(values)
            else:
                self.tail_keys, self.tail_values = keys, values

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.is_compressed:
            return super().batch_repeat_interleave(repeats)
        _refuse_batch_change(self, repeats)
        self._set_src_rows(tuple(row for row in self.src_rows for _ in range(repeats)))
        if self.tail_keys is not None:
            self.tail_keys = self.tail_keys.repeat_interleave(repeats, dim=0)
            self.tail_values = self.tail_values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_compressed:
            return super().batch_select_indices(indices)
        self.reorder_cache(torch.as_tensor(indices).flatten())

    def offload(self) -> None:
        self._move("cpu")

    def prefetch(self) -> None:
        if self.is_initialized:
            self._move(self.device)

    # ------------------------------------------------------------------------------------------------- kvzip API
    def reserve(self, spare: int) -> None:
        """Reallocate the dense keys/values with room for ``spare`` positions after the cached ones.

        The scoring passes write their tokens there (`peek`) instead of concatenating them to the whole cached row
        in every layer of every pass. The copy happens once, one layer at a time, so peak memory grows by one layer.
        A no-op when the room exists already or the layer is not dense.
        """
        if self.is_compressed or not self.is_initialized or self._has_room(spare):
            return
        batch, num_heads, length, head_dim = self.keys.shape
        grown_k = self.keys.new_empty((batch, num_heads, length + spare, head_dim))
        grown_v = self.values.new_empty((batch, num_heads, length + spare, head_dim))
        grown_k[:, :, :length] = self.keys
        grown_v[:, :, :length] = self.values
        self._spare_keys, self._spare_values = grown_k, grown_v
        self.keys, self.values = grown_k[:, :, :length], grown_v[:, :, :length]

    def peek(self, key_states: torch.Tensor, value_states: torch.Tensor, row: int, chunk: tuple[int, int],
             prefix_positions: torch.Tensor, scores_out: torch.Tensor | None,
             query_norms: torch.Tensor | None = None) -> tuple[ScoringKV, ScoringKV]:
        """Scoring-pass view of cached row ``row`` plus ``[1, H, n, D]`` new states; keeps nothing.

        The new states go into the room made by `reserve` (a view, no copy of the row), else they are concatenated.
        ``scores_out`` and ``query_norms``: see `ScoringKV` (``query_norms`` given: a KVzip+ pass). A compressed
        layer answers with a `CompressedScoringKV` instead: its kept pairs are scored again.
        """
        if self.is_compressed:
            return self._peek_compressed(key_states, value_states, row, chunk, prefix_positions, scores_out,
                                         query_norms)
        length, new = self.keys.shape[-2], key_states.shape[-2]
        if self._has_room(new):
            keys = self._spare_keys[row : row + 1, :, : length + new]
            values = self._spare_values[row : row + 1, :, : length + new]
            keys[:, :, length:] = key_states
            values[:, :, length:] = value_states
        else:
            keys = torch.cat([self.keys[row : row + 1], key_states], dim=-2)
            values = torch.cat([self.values[row : row + 1], value_states], dim=-2)
        view = ScoringKV(
            keys=keys,
            values=values,
            cached_length=length,
            prefix_positions=prefix_positions.to(keys.device),  # a sharded model: this layer's GPU
            chunk=chunk,
            scores_out=scores_out,
            query_norms=None if query_norms is None else query_norms.to(keys.device),
        )
        return view, view

    def _peek_compressed(self, key_states, value_states, row, chunk, prefix_positions, scores_out, query_norms,
                         ) -> tuple[CompressedScoringKV, CompressedScoringKV]:
        """`peek` of a compressed layer: row ``row``'s kept pairs, then the new states as a tail (nothing kept)."""
        if self.tail_length or self.src_rows != tuple(range(self.context.num_rows)):
            raise RuntimeError("a compressed layer is scored again from its context alone: rollback() first")
        self.context = ctx = self.context.compact()  # (once, not at every chunk's dense_span)
        dtype = key_states.dtype
        chunk_keys, chunk_values, chunk_kept = ctx.dense_span(row, *chunk, dtype)
        prefix_positions = prefix_positions.to(ctx.keys.device)
        prefix_end = int(prefix_positions.max()) + 1 if prefix_positions.numel() else 0
        prefix_keys, _, prefix_kept = ctx.dense_span(row, 0, prefix_end, dtype)
        if not bool(prefix_kept[:, prefix_positions].all()):
            raise RuntimeError("this layer evicted pairs of the protected prefix, which every eviction keeps")
        context = RaggedKV(
            context=ctx, src_rows=(row,), src_index=torch.tensor([row], dtype=torch.int32, device=ctx.keys.device),
            tail_keys=key_states, tail_values=value_states, length=self.context_length + key_states.shape[-2],
            owner=self.owner,
        )
        view = CompressedScoringKV(
            context=context,
            prefix_keys=prefix_keys.index_select(1, prefix_positions),
            chunk_keys=chunk_keys,
            chunk_values=chunk_values,
            chunk_kept=chunk_kept,
            scores_out=scores_out,
            query_norms=None if query_norms is None else query_norms.to(ctx.keys.device),
        )
        return view, view

    def release_room(self) -> None:
        """Give back the room `reserve` made (a copy of this layer's pairs): a dense layer is as before ``reserve``."""
        if not self.is_compressed and self._spare_keys is not None:
            self.keys, self.values = self.keys.clone(), self.values.clone()
            self._spare_keys = self._spare_values = None

    def _has_room(self, new: int) -> bool:
        """Whether ``self.keys`` is the start of the spare-room buffer with at least ``new`` free positions."""
        spare = self._spare_keys
        return (
            spare is not None
            and self.keys is not None
            and self.keys.data_ptr() == spare.data_ptr()
            and self.values.data_ptr() == self._spare_values.data_ptr()
            and self.keys.shape[0] == spare.shape[0]
            and self.keys.shape[-2] + new <= spare.shape[-2]
        )

    def evict(self, keep: torch.Tensor, fp8: bool = False) -> None:
        """Keep exactly the pairs where ``keep`` ([B, H, context_length] bool, padded coordinates) is True.

        A dense layer becomes compressed; a compressed layer keeps the subset of its pairs selected by ``keep``
        (which must not re-admit evicted pairs). The tail, if any, is untouched. ``fp8``: store the kept pairs as
        float8 with per-pair scales (`CompressedContext.to_fp8`); a store that is fp8 already stays fp8 either way.
        """
        if self.is_static:
            raise RuntimeError("a static cache cannot be re-compressed; compress before cache.make_static()")
        if not self.is_compressed:
            batch, num_heads, length, _ = self.keys.shape
            if keep.shape != (batch, num_heads, length):
                raise ValueError(f"keep mask of shape {tuple(keep.shape)} for a layer of {(batch, num_heads, length)}")
            self.context = CompressedContext.from_dense(self.keys, self.values, keep)
            self.src_rows = tuple(range(batch))
            self.context_length = self.cumulative_length
            self.keys = self.values = None  # the dense copy is freed here
            self._spare_keys = self._spare_values = None
        else:
            ctx = self.context
            if ctx.num_rows != len(self.src_rows) or self.src_rows != tuple(range(ctx.num_rows)):
                raise RuntimeError("re-compressing after batch_repeat_interleave/reorder is not supported; rollback() first")
            self.context = ctx.keep(keep)
        if fp8:
            self.context = self.context.to_fp8()
        self._set_src_rows(self.src_rows)

    def absorb_tail(self, keep: torch.Tensor, count: int | None = None, room: bool = False) -> None:
        """Move the tail's first ``count`` tokens (default: all) into the compressed context, keeping the pairs
        where ``keep`` (``[B, H, count]``) is True; the rest of them is freed.

        Used by a prefill that evicts chunk by chunk (each chunk arrives as the tail, attends to the kept context
        like a question would, then joins the context; the tail's buffer is freed) and by eviction while decoding
        (the oldest tokens join the context; the newer ones move to the front of the tail's buffer, which is kept).
        Positions continue the context's. ``room``: append into the store's reserved room (`CompressedContext.append`,
        O(pairs kept) instead of O(context): eviction while decoding, which appends every window).
        """
        ctx = self.context
        if self.src_rows != tuple(range(ctx.num_rows)):
            raise RuntimeError("absorb_tail() after batch_repeat_interleave/reorder is not supported")
        length = self.tail_length if count is None else count
        if not 0 < length <= self.tail_length:
            raise ValueError(f"cannot absorb {length} of the tail's {self.tail_length} tokens")
        self.context = ctx.append(self.tail_keys[:, :, :length], self.tail_values[:, :, :length], keep,
                                  self.context_length, room=room)
        self.context_length += length
        remaining = self.tail_length - length
        if remaining == 0:
            self.tail_keys = self.tail_values = None  # freed: the next chunk allocates its own
        else:  # clone: source and destination overlap
            self.tail_keys[:, :, :remaining] = self.tail_keys[:, :, length : self.tail_length].clone()
            self.tail_values[:, :, :remaining] = self.tail_values[:, :, length : self.tail_length].clone()
        self.tail_length = remaining

    def dense_pairs(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, count, D]`` of positions ``start .. start + count - 1``, which this layer must
        hold densely (a dense layer's pairs, or a compressed layer's tail): views, not copies."""
        if self.is_compressed and self.is_static:
            self._sync_static_length()
        return self.held_pairs(start, count)

    def held_pairs(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`dense_pairs` by the host-side lengths as they are: a static layer's must have just been read
        (`sync_static_lengths`)."""
        if self.is_compressed:
            first, held = start - self.context_length - self.dropped, self.tail_length
            keys, values = self.tail_keys, self.tail_values
        else:
            first, held = start, 0 if self.keys is None else self.keys.shape[-2]
            keys, values = self.keys, self.values
        if first < 0 or first + count > held:
            raise ValueError(f"positions {start}..{start + count - 1} are not held densely by this layer")
        return keys[:, :, first : first + count], values[:, :, first : first + count]

    def drop_context_after(self, length: int) -> None:
        """Forget the context pairs at positions ``>= length`` (the ones `absorb_tail` added while decoding)."""
        if not self.is_compressed or self.context_length <= length:
            return
        self.context = self.context.drop_after(length)
        self.context_length = length

    def make_static(self, capacity: int, evicting: bool = False) -> None:
        """Preallocate the tail for ``capacity`` tokens and keep its length on the device (compile-friendly).

        From then on `update` writes new tokens in place at the device-side ``tail_end``, returns views of fixed
        shape, and `get_seq_length` returns a device tensor; nothing in a decode step reads a length on the host, so
        it can be compiled and captured in a CUDA graph. Tokens already in the tail are kept. ``evicting``: eviction
        while decoding will pack the tail (`compact_tail`): the layer keeps its own slot mask and dropped count.
        """
        self.check_static(capacity)
        if self.is_static:
            return
        # What a compiled step sees must not depend on the document beyond its length bucket: the bound on a
        # segment's length (which sizes the kernels' grids) is the context's bucket, the number of kept pairs is a
        # dynamic dimension, and the context length lives on the device. A second document in the same bucket then
        # reuses the first one's graph.
        bucket = length_bucket(self.context_length)
        self.context = ctx = dataclasses.replace(self.context.compact(), max_seqlen=bucket)
        shape = (len(self.src_rows), ctx.num_heads, capacity, ctx.keys.shape[-1])
        tail_keys = torch.zeros(shape, dtype=ctx.dtype, device=ctx.keys.device)  # the model's dtype, even for fp8 pairs
        tail_values = torch.zeros(shape, dtype=ctx.dtype, device=ctx.keys.device)
        if self.tail_length:
            tail_keys[:, :, : self.tail_length] = self.tail_keys[:, :, : self.tail_length]
            tail_values[:, :, : self.tail_length] = self.tail_values[:, :, : self.tail_length]
        self.tail_keys, self.tail_values = tail_keys, tail_values
        self.tail_end = torch.tensor(self.tail_length, dtype=torch.long, device=ctx.keys.device)
        self.context_end = torch.tensor(self.context_length, dtype=torch.long, device=ctx.keys.device)
        packing = ()
        if evicting:
            self.tail_valid = torch.ones(shape[0], capacity, dtype=torch.bool, device=ctx.keys.device)
            self.tail_dropped = torch.zeros((), dtype=torch.long, device=ctx.keys.device)
            self.packed_slots = self.dropped = 0
            packing = (self.tail_valid, self.tail_dropped)
        self.static_mask_width = bucket + capacity
        self._static_rows = self.src_rows
        self.is_compileable = True
        # Fixed addresses: CUDA graphs read these tensors in place instead of copying them in at every replay.
        scales = (ctx.key_scales, ctx.value_scales) if ctx.is_fp8 else ()
        for tensor in (ctx.keys, ctx.values, *scales, ctx.cu_seqlens, self.src_index, tail_keys, tail_values,
                       self.tail_end, self.context_end, *packing):
            torch._dynamo.mark_static_address(tensor)
        if ctx.keys.shape[0] > 1:  # (dynamo specialises sizes 0 and 1 anyway)
            for tensor in (ctx.keys, ctx.values, *scales):
                torch._dynamo.mark_dynamic(tensor, 0)

    def check_static(self, capacity: int) -> None:
        """Raise unless `make_static(capacity)` can succeed (changes nothing)."""
        if not self.is_compressed:
            raise RuntimeError("make_static() needs a compressed layer")
        if self.is_static and self.tail_keys.shape[2] != capacity:
            raise ValueError(f"this layer is already static with room for {self.tail_keys.shape[2]} tokens")
        if not self.is_static and self.tail_length > capacity:
            raise ValueError(f"{self.tail_length} tokens are already in the tail, more than the capacity {capacity}")

    def _update_static(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[RaggedKV, RaggedKV]:
        """Write ``[B, H, q, D]`` states at the device-side tail end; return the fixed-shape view (no host sync).

        Writing past the capacity is not checked here (that would read the length on the host); `KVzipCache`
        checks it on eager paths, and `generate` is bounded by ``max_new_tokens``.
        """
        _write_at_end(self.tail_keys, self.tail_values, self.tail_end, key_states, value_states)
        view = RaggedKV(
            context=self.context,
            src_rows=self.src_rows,
            src_index=self.src_index,
            tail_keys=self.tail_keys,
            tail_values=self.tail_values,
            length=self.static_mask_width,
            tail_end=self.tail_end,
            context_end=self.context_end,
            share=self.share,
            owner=self.owner,
            tail_valid=self.tail_valid,
        )
        return view, view

    def _sync_static_length(self, tail_length: int | None = None) -> None:
        """Set the host-side counters from the device-side tail length: read on the host (eager code paths only),
        or ``tail_length`` when the caller read it (`sync_static_lengths`: one read for many layers)."""
        self.tail_length = int(self.tail_end) if tail_length is None else tail_length
        self.cumulative_length = self.context_length + self.dropped + self.tail_length

    def recent_tail(self) -> tuple[int, int]:
        """``(position, count)``: the tail tokens that eviction while decoding has not rated yet, from the oldest
        one's position (eager code: a static layer's length is read on the host)."""
        if self.is_static:
            self._sync_static_length()
        return self._unrated_tail()

    def _unrated_tail(self) -> tuple[int, int]:
        """`recent_tail` by the host-side lengths as they are."""
        if self.is_static:
            return self.context_length + self.packed_slots + self.dropped, self.tail_length - self.packed_slots
        return self.context_length, self.tail_length

    def compact_tail(self, keep: torch.Tensor, start: int) -> None:
        """Static layer, eviction while decoding: of the ``n`` oldest unrated tail tokens (from position ``start``),
        keep the pairs where ``keep`` (``[B, H, n]`` bool) is True and free the others, inside the fixed tail.

        The kept pairs of every evicted span are packed, in position order, into the slots after those of earlier
        spans; the newer tokens move up behind them, and ``tail_end`` drops by what was freed. Every (row, head) of a
        row must keep the same number of pairs (the ``"pair-uniform"`` level): the slots are shared by the row's
        heads, and a row that kept fewer than another has its extra slots masked (``tail_valid``). Work and memory
        traffic are O(tail), never O(context): the ragged store is not touched. Eager code, between compiled steps;
        `compact_tails` does it for many layers at once.
        """
        compact_tails([self], keep[None], start)

    def _pack_tail(self, source: torch.Tensor, packed_valid: torch.Tensor, count: int) -> None:
        """`compact_tails`' moves in this layer, by the plan of `_packing_plan`: ``source`` ``[B, H, m]`` the offsets
        (from the first unpacked slot) of what the rebuilt region holds; ``packed_valid`` ``[B, slots]``."""
        first, end, slots = self.packed_slots, self.tail_length, packed_valid.shape[-1]
        length = source.shape[-1]
        index = source[..., None].expand(-1, -1, -1, self.tail_keys.shape[-1])
        for buffer in (self.tail_keys, self.tail_values):  # (gather first: the regions overlap)
            buffer[:, :, first : first + length] = buffer[:, :, first:end].gather(2, index)
        self.tail_valid[:, first : first + length] = torch.cat([packed_valid, self.tail_valid[:, first + count : end]],
                                                               dim=1)
        self.tail_valid[:, first + length :] = True  # slots not written yet: the next tokens are real
        freed = count - slots
        self.tail_end.sub_(freed)
        self.tail_dropped.add_(freed)
        self.packed_slots += slots
        self.dropped += freed
        self.tail_length -= freed  # (the logical length, context + dropped + tail, does not change)

    def rollback(self, length: int, batch_size: int) -> None:
        """Forget everything appended after the first ``length`` tokens (the context) and restore its batch rows."""
        if self.is_static:
            self.tail_end.zero_()  # the buffers stay where they are: a captured graph keeps reading them
            if self.tail_valid is not None:
                self.tail_valid.fill_(True)
                self.tail_dropped.zero_()
                self.packed_slots = self.dropped = 0
            self.tail_length, self.cumulative_length = 0, length
            self._set_src_rows(self._static_rows)  # the fixed batch keeps the rows it was made static with
            return
        if self.is_compressed:
            # Free the tail rather than keep its capacity: the cache is back to exactly what compress() left.
            self.drop_context_after(length)
            self.tail_keys = self.tail_values = None
            self.tail_length = 0
            self._set_src_rows(tuple(range(self.context.num_rows)))
        elif self.is_initialized and self.keys.shape[0] != batch_size:
            raise RuntimeError("rollback() after changing the batch size needs a compressed cache; call compress() first")
        elif self.is_initialized:
            self.keys, self.values = self.keys[..., :length, :], self.values[..., :length, :]
        self.cumulative_length = length

    # ------------------------------------------------------------------------------------------ save / load
    def export_state(self) -> dict[str, torch.Tensor]:
        """The compressed context as plain tensors (`kvzip_cache.persistence` writes them): ``keys`` and ``values``
        ``[N, D]``, ``cu_seqlens`` ``[S + 1]``, ``positions`` ``[N]``, and for an fp8 store ``key_scales`` and
        ``value_scales`` ``[N]``. Needs a compressed layer with an empty tail."""
        ctx = self.context.compact()
        state = {"keys": ctx.keys, "values": ctx.values, "cu_seqlens": ctx.cu_seqlens, "positions": ctx.positions}
        if ctx.is_fp8:
            state.update(key_scales=ctx.key_scales, value_scales=ctx.value_scales)
        return state

    def import_state(self, state: dict[str, torch.Tensor], num_heads: int, context_length: int,
                     dtype: torch.dtype | None = None) -> None:
        """Become the compressed layer `export_state` described (rows ``0..B-1``, empty tail). ``dtype``: the
        dtype the pairs are read in, for an fp8 state (the model's; default: the keys' own dtype)."""
        self.reset()
        keys, cu = state["keys"], state["cu_seqlens"].long()
        dtype = dtype or keys.dtype
        empty = torch.empty(1, 1, 0, keys.shape[-1], dtype=dtype, device=keys.device)
        self.lazy_initialization(empty, empty)  # dtype, device, is_initialized
        self.keys = self.values = None  # as after evict(): the context lives in the ragged store
        self.context = CompressedContext.from_counts(keys, state["values"], state["positions"], cu[1:] - cu[:-1],
                                                     num_heads, state.get("key_scales"), state.get("value_scales"),
                                                     dtype)
        self.context_length = self.cumulative_length = context_length
        self._set_src_rows(tuple(range(self.context.num_rows)))

    def kv_bytes(self) -> int:
        """Bytes allocated for keys and values (spare tail capacity counts)."""
        total = 0
        dense = (self._spare_keys, self._spare_values) if self._has_room(0) else (self.keys, self.values)
        for tensor in (*dense, self.tail_keys, self.tail_values):
            if tensor is not None:
                total += tensor.nbytes
        if self.context is not None:
            total += self.context.kv_bytes()
        return total

    def metadata_bytes(self) -> int:
        return self.context.metadata_bytes() if self.context is not None else 0

    # ------------------------------------------------------------------------------------------------- internals
    def _set_src_rows(self, rows: tuple[int, ...]) -> None:
        self.src_rows = rows
        self.share = shared_run_length(rows)
        index = torch.tensor(rows, dtype=torch.int32)
        if self.is_static:  # same batch size; the tensor keeps its address (a captured graph reads it)
            self.src_index.copy_(index)
        else:
            self.src_index = index.to(self.context.keys.device, non_blocking=True)

    def _append_tail(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write new states after the tail, growing its buffer geometrically (never copying the context)."""
        batch, num_heads, new, head_dim = key_states.shape
        needed = self.tail_length + new
        capacity = 0 if self.tail_keys is None else self.tail_keys.shape[2]
        if needed > capacity:
            capacity = max(needed, 2 * capacity, _MIN_TAIL_CAPACITY)
            shape = (batch, num_heads, capacity, head_dim)
            grown_k = key_states.new_empty(shape)
            grown_v = value_states.new_empty(shape)
            if self.tail_length:
                grown_k[:, :, : self.tail_length] = self.tail_keys[:, :, : self.tail_length]
                grown_v[:, :, : self.tail_length] = self.tail_values[:, :, : self.tail_length]
            self.tail_keys, self.tail_values = grown_k, grown_v
        self.tail_keys[:, :, self.tail_length : needed] = key_states
        self.tail_values[:, :, self.tail_length : needed] = value_states
        self.tail_length = needed

    def _move(self, device) -> None:
        if self.keys is not None and self.keys.numel():
            self.keys = self.keys.to(device, non_blocking=True)
            self.values = self.values.to(device, non_blocking=True)
        if self.context is not None:
            self.context = self.context.to(device, non_blocking=True)
            self.src_index = self.src_index.to(device, non_blocking=True)
        if self.tail_keys is not None:
            self.tail_keys = self.tail_keys.to(device, non_blocking=True)
            self.tail_values = self.tail_values.to(device, non_blocking=True)


def sync_static_lengths(layers: list[KVzipLayer]) -> None:
    """Read static layers' device-side tail lengths into their host-side counters: one host read for all of them
    (per device) instead of one synchronisation per layer."""
    by_device: dict[torch.device, list[KVzipLayer]] = {}
    for layer in layers:
        by_device.setdefault(layer.tail_end.device, []).append(layer)
    for group in by_device.values():
        for layer, length in zip(group, torch.stack([layer.tail_end for layer in group]).tolist()):
            layer._sync_static_length(length)


def compact_tails(layers: list[KVzipLayer], keep: torch.Tensor, start: int) -> None:
    """`KVzipLayer.compact_tail` for several static layers at once: ``keep`` ``[n, B, H, c]`` bool, ``keep[i]`` for
    ``layers[i]``, over the same ``c`` oldest unrated tail tokens from position ``start``.

    Eviction while decoding runs this between two decode steps, where issuing operations on the host is what costs:
    one host read of every layer's length, one sort of all the masks and one host read of what they keep serve all
    layers; each layer then moves its own slots (two gathers and a few copies). Every layer is checked before any
    changes.
    """
    sync_static_lengths(layers)
    count = keep.shape[-1]
    for layer in layers:
        recent_start, recent = layer._unrated_tail()
        if start != recent_start or not 0 < count <= recent:
            raise ValueError(f"the tail's unrated tokens start at position {recent_start} ({recent} of them); "
                             f"got {count} from position {start}")
    device = layers[0].tail_keys.device
    if any(layer.tail_keys.device != device for layer in layers):  # (layers spread over devices: one at a time)
        for layer, layer_keep in zip(layers, keep):
            compact_tails([layer], layer_keep[None], start)
        return
    keep = keep.to(device)
    kept = keep.sum(dim=-1)  # [n, B, H]
    most = kept.amax(dim=2)  # [n, B]
    uneven, *slots = torch.cat([(kept.amin(dim=2) != most).any()[None], most.amax(dim=1)]).tolist()  # one host read
    if uneven:
        raise ValueError("a static tail packs each row's kept pairs into slots its heads share: every head of a "
                         "row must keep as many pairs (level='pair-uniform')")
    order = torch.sort(keep.to(torch.uint8), dim=-1, descending=True, stable=True).indices  # kept offsets first
    unpacked = [layer.tail_length - layer.packed_slots for layer in layers]
    if len(set(slots)) == 1 and len(set(unpacked)) == 1:  # (always, under "pair-uniform"): one plan for all layers
        plans = zip(*_packing_plan(order, kept, count, slots[0], unpacked[0]))
    else:
        plans = [_packing_plan(layer_order, layer_kept, count, layer_slots, layer_unpacked)
                 for layer_order, layer_kept, layer_slots, layer_unpacked in zip(order, kept, slots, unpacked)]
    for layer, (source, packed_valid) in zip(layers, plans):
        layer._pack_tail(source, packed_valid, count)


def _packing_plan(order: torch.Tensor, kept: torch.Tensor, count: int, slots: int,
                  unpacked: int) -> tuple[torch.Tensor, torch.Tensor]:
    """How `KVzipLayer._pack_tail` rebuilds a tail's unpacked region (its ``unpacked`` slots from the first one not
    packed yet) after rating its oldest ``count``: the kept pairs of that span first, then the newer tokens.

    Args:
        order: ``[..., B, H, count]`` the span's offsets, kept ones first (in position order).
        kept: ``[..., B, H]`` pairs kept per head; ``slots`` the most any head kept.

    Returns:
        ``source`` ``[..., B, H, unpacked - count + slots]`` (offsets into the region: one gather rebuilds it) and
        ``packed_valid`` ``[..., B, slots]`` (a row that kept fewer pairs than ``slots`` masks the rest).
    """
    newer = torch.arange(count, unpacked, device=order.device).expand(*order.shape[:-1], -1)
    source = torch.cat([order[..., :slots], newer], dim=-1)
    return source, torch.arange(slots, device=kept.device) < kept[..., :1]


class KVzipSlidingLayer(DynamicSlidingWindowLayer):
    """transformers' sliding-window layer, plus a side-effect-free `peek` and a snapshot for `rollback`.

    `make_static` fixes its window buffers and keeps its length on the device, as `KVzipLayer.make_static` does.
    """

    def __init__(self, sliding_window: int, **kwargs) -> None:
        super().__init__(sliding_window=sliding_window)
        self._snapshot: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self.length: torch.Tensor | None = None  # static mode: tokens seen, 0-dim int64 on the device
        self.end: torch.Tensor | None = None  # static mode: slots written in the fixed buffers
        self.start: torch.Tensor | None = None  # static mode: the position of the buffers' first slot
        self.static_mask_width = 0
        self.is_compileable = False
        # Static mode with eviction while decoding (see compact_window): which slots are real tokens ([B, slots] bool
        # on the device; it replaces the padding mask's columns, which no longer line up once slots move), and its
        # value at make_static, for rollback.
        self.slot_valid: torch.Tensor | None = None
        self._initial_valid: torch.Tensor | None = None
        # (end, tokens) of each multi-token step after the prefill that is still within reach of the window: its
        # slots may be padding (a left-padded question), so they do not count against the window.
        self._padded_steps: list[tuple[int, int]] = []
        # Which snapshot row each row of the batch came from (None: the snapshot's rows, in order), followed through
        # beams, batch_repeat_interleave and batch_select_indices, so that make_static takes each row's own window.
        self._rows: torch.Tensor | None = None

    @property
    def is_static(self) -> bool:
        return self.length is not None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.record_past:  # transformers' assisted decoding: its own bookkeeping
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_static:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            new = key_states.shape[-2]
            self.cumulative_length += new
            if self._snapshot is not None and new > 1:
                self._padded_steps.append((self.cumulative_length, new))
            keys = torch.cat([self.keys, key_states], dim=-2)
            values = torch.cat([self.values, value_states], dim=-2)
            keep = self._slots_to_keep()
            self.keys, self.values = keys[:, :, -keep:], values[:, :, -keep:]
            return keys, values
        # Static: write at the device-side end of [the prefill's window | tail room] (fixed addresses and shapes for
        # CUDA graphs); the attention masks the window by real tokens and the slots not written yet.
        _write_at_end(self.keys, self.values, self.end, key_states, value_states)
        self.length.add_(key_states.shape[-2])
        view = WindowKV(self.keys, self.values, self.start, self.end, valid=self.slot_valid)
        return view, view

    def _slots_to_keep(self) -> int:
        """How many of the newest slots the next step may need: ``sliding_window - 1`` real tokens, plus every slot of
        a multi-token step among them (padding is not counted in the window, so a padded question must not push a
        real token out). Steps that fell out of reach are forgotten."""
        keep = self.sliding_window - 1
        reachable = []
        for end, tokens in reversed(self._padded_steps):  # newest first: each one kept reaches further back
            if end > self.cumulative_length - keep:
                keep += tokens
                reachable.append((end, tokens))
        self._padded_steps = reachable[::-1]
        return keep

    def get_seq_length(self) -> int | torch.Tensor:
        return self.length if self.is_static else super().get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.is_static:  # fixed, as for the full layers: the context's bucket and the tail's room
            return self.static_mask_width, 0
        if self.record_past or not self.is_initialized:
            return super().get_mask_sizes(query_length)
        stored = self.keys.shape[-2]  # the window, plus the slots of padded steps still in reach
        return stored + query_length, self.cumulative_length - stored

    def make_static(self, capacity: int, evicting: bool = False, context_mask: torch.Tensor | None = None) -> None:
        """Fixed buffers ``[B, H, w + capacity, D]``: the window the prefill left (``w`` slots), then room for
        ``capacity`` tokens written in place at a device-side end; lengths stay on the device (see
        `KVzipLayer.make_static`). The window then slides by masking, not by moving slots, so a padded question
        displaces no real token; tokens already after the context are kept.

        ``evicting``: eviction while decoding runs on the full layers, so the answer may outgrow ``capacity``; the
        window is then moved to the buffers' front at each eviction (`compact_window`), and the layer keeps its own
        slot mask, starting from ``context_mask`` (``[B, context]``, the prefill's padding mask)."""
        self.check_static(capacity)
        if self.is_static:
            return
        window_keys, window_values, context_length = self._snapshot
        if self._rows is not None:  # rows repeated (shared questions), reordered or selected: each row's own window
            rows = self._rows.to(window_keys.device)
            window_keys, window_values = window_keys.index_select(0, rows), window_values.index_select(0, rows)
        width, tail = window_keys.shape[2], self.cumulative_length - context_length
        batch, heads, _, head_dim = self.keys.shape
        keys = self.keys.new_zeros((batch, heads, width + capacity, head_dim))
        values = self.values.new_zeros((batch, heads, width + capacity, head_dim))
        keys[:, :, :width], values[:, :, :width] = window_keys, window_values
        if tail:
            keys[:, :, width : width + tail] = self.keys[:, :, -tail:]
            values[:, :, width : width + tail] = self.values[:, :, -tail:]
        self.keys, self.values = keys, values
        self._snapshot = (window_keys, window_values, context_length)
        device = keys.device
        self.length = torch.tensor(self.cumulative_length, dtype=torch.long, device=device)
        self.end = torch.tensor(width + tail, dtype=torch.long, device=device)
        self.start = torch.tensor(context_length - width, dtype=torch.long, device=device)  # slot 0's position
        self.static_mask_width = length_bucket(context_length) + capacity
        self.is_compileable = True
        packing = ()
        if evicting:
            self.slot_valid = torch.ones(batch, width + capacity, dtype=torch.bool, device=device)
            self.slot_valid[:, :width] = context_mask[:, context_length - width : context_length].to(device).bool()
            self._initial_valid = self.slot_valid.clone()
            packing = (self.slot_valid,)
        for tensor in (self.keys, self.values, self.length, self.end, self.start, *packing):
            torch._dynamo.mark_static_address(tensor)

    def compact_window(self) -> None:
        """Static layer, eviction while decoding: move the slots the next steps can still reach (the last
        ``sliding_window - 1`` real tokens of every row, with any padding among them) to the buffers' front and free
        the rest, so that the buffers never fill however long the answer. O(window); eager code, between steps."""
        end = int(self.end)
        valid = self.slot_valid[:, :end]
        reach = self.sliding_window - 1
        from_end = valid.flip(-1).long().cumsum(-1)  # [B, end]: real slots from the last one back to each slot
        needed = (from_end >= reach).long().argmax(-1)  # per row: how far back the reach goes (from the end)
        first = end - 1 - int(needed.max()) if bool((from_end[:, -1] >= reach).all()) else 0
        if first <= 0:
            return
        kept = slice(first, end)
        self.keys[:, :, : end - first] = self.keys[:, :, kept].clone()
        self.values[:, :, : end - first] = self.values[:, :, kept].clone()
        self.slot_valid[:, : end - first] = self.slot_valid[:, kept].clone()
        self.slot_valid[:, end - first :] = True
        self.end.sub_(first)
        self.start.add_(first)

    def slot_room(self) -> int:
        """Slots still free in a static layer's buffers (eager code: reads the device)."""
        return self.keys.shape[2] - int(self.end)

    def check_static(self, capacity: int) -> None:
        """Raise unless `make_static` can succeed (changes nothing)."""
        if self.is_static:
            if self.keys.shape[2] - self._snapshot[0].shape[2] != capacity:
                raise ValueError(f"this layer is already static with room for "
                                 f"{self.keys.shape[2] - self._snapshot[0].shape[2]} tokens")
            return
        if not self.is_initialized or self.cumulative_length < self.sliding_window:
            raise ValueError(
                f"make_static() needs contexts of at least the sliding window ({self.sliding_window} tokens), so "
                "that every sliding layer's window is full; decode this one with the dynamic cache"
            )
        tail = self.cumulative_length - self._snapshot[2]
        if tail > capacity:
            raise ValueError(f"{tail} tokens are already in the tail, more than the capacity {capacity}")
        if tail > self.keys.shape[2]:
            raise ValueError(
                f"the sliding-window layers no longer hold the {tail} tokens after the context: call cache.rollback() "
                "before make_static()"
            )

    def peek(self, key_states: torch.Tensor, value_states: torch.Tensor, row: int, *args,
             **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """What `update` would return for row ``row`` (cached window + new states), without storing anything."""
        return (
            torch.cat([self.keys[row : row + 1], key_states], dim=-2),
            torch.cat([self.values[row : row + 1], value_states], dim=-2),
        )

    def take_snapshot(self) -> None:
        """Remember the window (a small copy) so that `rollback` can come back to it."""
        if self.is_initialized:
            self._snapshot = (self.keys.clone(), self.values.clone(), self.cumulative_length)

    def rollback(self, length: int, batch_size: int) -> None:
        if self._snapshot is None:
            raise RuntimeError("rollback() needs a prefilled cache")
        keys, values, cumulative = self._snapshot
        if self.is_static:  # in place (a captured graph reads these buffers); beams may have reordered the windows
            self.keys[:, :, : keys.shape[2]].copy_(keys)
            self.values[:, :, : keys.shape[2]].copy_(values)
            self.end.fill_(keys.shape[2])
            self.length.fill_(cumulative)
            self.start.fill_(cumulative - keys.shape[2])
            if self.slot_valid is not None:
                self.slot_valid.copy_(self._initial_valid)
        else:
            self.keys, self.values = keys.clone(), values.clone()
            self._rows = None
        self.cumulative_length = cumulative
        self._padded_steps = []

    def crop(self, tokens_to_remove: int) -> None:
        self.check_crop(tokens_to_remove)
        super().crop(tokens_to_remove)

    def check_crop(self, tokens_to_remove: int, prefilled: int | None = None) -> None:
        """Raise unless `crop(tokens_to_remove)` can succeed (changes nothing)."""
        if self.is_static:
            raise RuntimeError("a static cache's sliding layers cannot be cropped; use cache.rollback()")
        removes = tokens_to_remove < 0 or 0 < tokens_to_remove < self.get_seq_length()
        if removes and self.get_seq_length() >= self.sliding_window and not getattr(self, "record_past", False):
            raise ValueError(
                f"cannot crop: this model's sliding-window layers keep only their last {self.sliding_window} tokens, "
                "and the window has filled, so the tokens before it are gone. Use cache.rollback() to return to the "
                "context"
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_static:
            self._follow_rows(lambda rows: rows.index_select(0, beam_idx.to(rows.device)))
            return super().reorder_cache(beam_idx)
        index = beam_idx.to(self.keys.device)
        self.keys.copy_(self.keys.index_select(0, index))
        self.values.copy_(self.values.index_select(0, index))

    def batch_repeat_interleave(self, repeats: int) -> None:
        _refuse_batch_change(self, repeats)
        self._follow_rows(lambda rows: rows.repeat_interleave(repeats, 0))
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._follow_rows(lambda rows: rows[torch.as_tensor(indices, device=rows.device).flatten()])
        super().batch_select_indices(indices)

    def _follow_rows(self, change) -> None:
        """Apply a batch change to the record of which snapshot row each row came from."""
        if self._snapshot is not None and self.is_initialized:
            rows = self._rows if self._rows is not None else torch.arange(self.keys.shape[0])
            self._rows = change(rows)

    def reset(self) -> None:
        _release(self)
        self.cumulative_length = 0
        self._snapshot = None
        self._padded_steps = []
        self._rows = None
        self.length = self.end = self.start = None
        self.slot_valid = self._initial_valid = None
        self.is_compileable = False

    def kv_bytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def metadata_bytes(self) -> int:
        return 0

    def export_state(self) -> dict[str, torch.Tensor]:
        """The window the prefill left (what `rollback` returns to): ``keys``, ``values`` ``[B, H, w, D]``."""
        keys, values, _ = self._snapshot
        return {"keys": keys, "values": values}

    def import_state(self, state: dict[str, torch.Tensor], cumulative_length: int) -> None:
        """Become the layer `export_state` described, right after its prefill."""
        self.reset()
        self.lazy_initialization(state["keys"], state["values"])
        self.keys, self.values = state["keys"].clone(), state["values"].clone()
        self.cumulative_length = cumulative_length
        self.take_snapshot()


def _write_at_end(keys: torch.Tensor, values: torch.Tensor, end: torch.Tensor, key_states: torch.Tensor,
                  value_states: torch.Tensor) -> None:
    """Write ``[B, H, q, D]`` states into fixed ``[B, H, capacity, D]`` buffers at the 0-dim device-side ``end`` and
    advance it (static layers: no host sync, fixed addresses for CUDA graphs)."""
    slots = end + torch.arange(key_states.shape[-2], device=end.device)
    keys.index_copy_(2, slots, key_states)
    values.index_copy_(2, slots, value_states)
    end.add_(key_states.shape[-2])


def _refuse_batch_change(layer, repeats: int) -> None:
    if layer.is_static and repeats != 1:
        raise RuntimeError(
            "a static cache has a fixed batch: call cache.batch_repeat_interleave(n) before cache.make_static()"
        )


def _release(layer) -> None:
    """Return a dynamic layer to its never-initialised state (keys allocated again on the next update)."""
    layer.keys = layer.values = None
    layer.is_initialized = False

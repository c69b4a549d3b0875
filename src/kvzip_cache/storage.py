"""The ragged store: the kept context pairs of one full-attention layer.

After compression every (row, KV head) keeps its own number of pairs. `CompressedContext` holds them flat, segment
after segment (segment ``s = b * num_heads + h``, the layout flash-attn's varlen kernels use, one "sequence" per KV
head), with per-segment offsets and each pair's position. Every change of what a layer keeps goes through the four
operations here (`from_dense`, `keep`, `append`, `drop_after`), each returning a new store: this is the one place a
storage format (a smaller dtype for the kept pairs, per-block scales) plugs in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CompressedContext:
    """The kept context of one layer: every (sequence, KV head) keeps its own number of pairs.

    Within a segment the pairs stay in position order; the keys are post-RoPE, so their positions are only kept as
    metadata (for re-selection and inspection).

    Attributes:
        keys: ``[total_kept, D]``.
        values: ``[total_kept, D]``.
        cu_seqlens: ``[S + 1]`` int32 on the keys' device: segment ``s`` is rows ``cu_seqlens[s]:cu_seqlens[s+1]``.
        offsets: the same offsets as a tuple of host ints (the CPU backend loops over segments without syncing).
        positions: ``[total_kept]`` int32, the position of each kept pair in padded coordinates.
        num_heads: H, KV heads per row.
        max_seqlen: the longest segment (sizes kernel grids without a device sync).
    """

    keys: torch.Tensor
    values: torch.Tensor
    cu_seqlens: torch.Tensor
    offsets: tuple[int, ...]
    positions: torch.Tensor
    num_heads: int
    max_seqlen: int

    @classmethod
    def from_counts(cls, keys, values, positions, counts: torch.Tensor, num_heads: int) -> CompressedContext:
        """Build from flat kept pairs and the ``[S]`` number of pairs of each segment."""
        cu_seqlens = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=keys.device)
        cu_seqlens[1:] = counts.cumsum(0)
        offsets = tuple(cu_seqlens.tolist())
        max_seqlen = max((b - a for a, b in zip(offsets[:-1], offsets[1:])), default=0)
        return cls(keys.contiguous(), values.contiguous(), cu_seqlens, offsets, positions.contiguous(), num_heads,
                   max_seqlen)

    @classmethod
    def from_dense(cls, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> CompressedContext:
        """The pairs of dense ``[B, H, T, D]`` keys/values where ``keep`` (``[B, H, T]`` bool) is True."""
        batch, num_heads, length, head_dim = keys.shape
        flat_keep = keep.to(keys.device).reshape(batch * num_heads, length)
        positions = torch.arange(length, device=keys.device, dtype=torch.int32).expand(batch * num_heads, -1)
        kept_keys = keys.reshape(batch * num_heads, length, head_dim)[flat_keep]
        kept_values = values.reshape(batch * num_heads, length, head_dim)[flat_keep]
        return cls.from_counts(kept_keys, kept_values, positions[flat_keep], flat_keep.sum(dim=1), num_heads)

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def num_rows(self) -> int:
        """How many batch rows were compressed (B0)."""
        return (len(self.offsets) - 1) // self.num_heads

    @property
    def num_segments(self) -> int:
        return len(self.offsets) - 1

    def seqlens(self) -> torch.Tensor:
        """``[B0, H]`` int64 number of kept pairs per (row, KV head)."""
        lengths = torch.tensor(self.offsets, dtype=torch.long)
        return (lengths[1:] - lengths[:-1]).view(self.num_rows, self.num_heads)

    def segment_ids(self) -> torch.Tensor:
        """``[total_kept]`` int64 on the keys' device: the segment (``b * num_heads + h``) of every kept pair."""
        segments = torch.arange(self.num_segments, device=self.keys.device)
        return torch.repeat_interleave(segments, self.seqlens().flatten().to(self.keys.device))

    def kv_bytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def metadata_bytes(self) -> int:
        return self.cu_seqlens.nbytes + self.positions.nbytes

    # ------------------------------------------------------------------------------------------------ operations
    def select(self, pairs: torch.Tensor) -> CompressedContext:
        """The context of the kept pairs where ``pairs`` (``[total_kept]`` bool) is True, in the same order."""
        counts = torch.bincount(self.segment_ids()[pairs], minlength=self.num_segments)
        return CompressedContext.from_counts(self.keys[pairs], self.values[pairs], self.positions[pairs], counts,
                                             self.num_heads)

    def keep(self, keep: torch.Tensor) -> CompressedContext:
        """The kept pairs whose position ``keep`` (``[B0, H, T]`` bool over padded positions) marks True."""
        selected = keep.to(self.keys.device).reshape(self.num_segments, -1)[self.segment_ids(), self.positions.long()]
        return self.select(selected)

    def append(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, first_position: int,
               ) -> CompressedContext:
        """This context plus the pairs of ``[B0, H, n, D]`` keys/values (positions ``first_position ..
        first_position + n - 1``) where ``keep`` (``[B0, H, n]`` bool) is True: each segment gets its old pairs,
        then its new ones, in position order."""
        segments, length, head_dim = self.num_segments, keys.shape[2], self.keys.shape[-1]
        keep = keep.to(self.keys.device).reshape(segments, length)
        new_keys = keys.reshape(segments, length, head_dim)[keep]
        new_values = values.reshape(segments, length, head_dim)[keep]
        new_positions = torch.arange(first_position, first_position + length, dtype=torch.int32,
                                     device=keep.device).expand(segments, -1)[keep]
        old_counts, new_counts = self.seqlens().flatten().to(keep.device), keep.sum(dim=1)
        segment_of = torch.cat([self.segment_ids().to(keep.device),
                                torch.arange(segments, device=keep.device).repeat_interleave(new_counts)])
        order = torch.argsort(segment_of, stable=True)  # each segment: its old pairs, then its new ones
        return CompressedContext.from_counts(
            torch.cat([self.keys, new_keys])[order], torch.cat([self.values, new_values])[order],
            torch.cat([self.positions, new_positions])[order], old_counts + new_counts, self.num_heads,
        )

    def drop_after(self, length: int) -> CompressedContext:
        """The pairs at positions ``< length`` (forgets what `append` added after them)."""
        return self.select(self.positions < length)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CompressedContext:
        return CompressedContext(
            keys=self.keys.to(device, non_blocking=non_blocking),
            values=self.values.to(device, non_blocking=non_blocking),
            cu_seqlens=self.cu_seqlens.to(device, non_blocking=non_blocking),
            offsets=self.offsets,
            positions=self.positions.to(device, non_blocking=non_blocking),
            num_heads=self.num_heads,
            max_seqlen=self.max_seqlen,
        )

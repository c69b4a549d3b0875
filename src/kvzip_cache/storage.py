"""The ragged store: the kept context pairs of one full-attention layer.

After compression every (row, KV head) keeps its own number of pairs. `CompressedContext` holds them flat, segment
after segment (segment ``s = b * num_heads + h``, the layout flash-attn's varlen kernels use, one "sequence" per KV
head), with per-segment offsets and each pair's position. Every change of what a layer keeps goes through the four
operations here (`from_dense`, `keep`, `append`, `drop_after`), each returning a new store: this is the one place a
storage format plugs in.

**Reserved room** (`append` with ``room=True``, what eviction while decoding uses): appending to a packed store
moves every pair (each segment's new pairs go after its old ones), O(context) per eviction. With room, each
segment is followed by free slots, ``ends[s]`` marks where its pairs stop, and an append writes the new pairs into
the room in place, O(new pairs); only when a segment's room runs out is the store rebuilt (O(context)), with room
for four more appends like the one that overflowed or a quarter again of what the segment has been appended so far,
whichever is more: a rebuild every 4 evictions at first, then every ~k/4 after the k-th (a logarithmic number in
all), and the room never holds more than four appends' or a quarter of the appended pairs' bytes. Attention reads
``offsets[s] .. ends[s]``; every other operation first returns to a packed store (`compact`).

**fp8 kept pairs** (`CompressedContext.to_fp8`): keys and values stored as float8 e4m3 (half of bf16's bytes), each
pair's key and value with its own float32 scale (``amax / 448`` over the head dim). A scale per pair rather than per
block of pairs because the store is reshuffled by every operation (a re-selection drops pairs from the middle of a
segment, an append adds them at a segment's end): a pair carries its scale wherever it goes, so no operation ever
re-quantizes, and an fp8 store that keeps a subset is bit-identical to quantizing that subset. The scales cost
8 bytes per pair (keys + values), 3% of the pair's 256 fp8 bytes at head_dim 128. The kernels fold the scales into
the logits (key scale) and the probabilities (value scale), so no dequantized tile is ever written out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

FP8 = getattr(torch, "float8_e4m3fn", None)  # None on a torch without float8 types
FP8_MAX = 448.0  # largest finite float8 e4m3fn
_INV_FP8_MAX = float(torch.tensor(1 / FP8_MAX, dtype=torch.float32))  # the float32 the kernels multiply by


def quantize_fp8(pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, D]`` keys or values -> (``[N, D]`` float8 e4m3fn, ``[N]`` float32 scales): row ``i`` is stored as
    ``pairs[i] / scale[i]`` with ``scale[i] = max|pairs[i]| x (1 / 448)`` (an all-zero row gets the smallest normal
    scale), every step correctly rounded in float32, so that the CPU and CUDA store the same bytes.

    (CUDA divides by a scalar as a multiplication by its reciprocal, which is not correctly rounded: ``x / 448``
    there gave other scales than the CPU, and quotients of bf16 pairs that fall exactly between two fp8 values then
    rounded the wrong way, 0.04% of the codes on an H100; ``scripts/fp8_rounding_check.py`` shows it. A product is
    correctly rounded on both, and so is the division of two tensors.)"""
    wide = pairs.float()
    scales = (wide.abs().amax(dim=-1) * _INV_FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (wide / scales[:, None]).to(FP8), scales


def dequantize_fp8(pairs: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[..., D]`` float8 rows and their ``[...]`` float32 scales -> ``[..., D]`` in ``dtype``."""
    return (pairs.float() * scales[..., None]).to(dtype)


class _RoomLease:
    """Which store may write into a buffer's reserved room: the one holding the current version. Stores are
    immutable, and two may share buffers (a layer's previous store, or a cache's copy taken by reference); each
    in-place append bumps the version, so an older or sibling store appends by rebuilding instead of writing over
    pairs the other reads."""

    def __init__(self) -> None:
        self.version = 0


def _scatter_index(counts: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """Where pairs laid out segment after segment (``counts[s]`` of segment ``s``, ``[S]`` int64) go when segment
    ``s``'s pairs are to start at ``bases[s]``: ``[sum(counts)]`` int64, on the counts' device."""
    segment = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    first = counts.cumsum(0) - counts
    return bases[segment] + torch.arange(segment.numel(), device=counts.device) - first[segment]


_MIN_ROOM = 16  # free slots a segment gets at least when a store makes room
_ROOM_APPENDS = 4  # a rebuild makes room for at least this many more appends like the one that caused it


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
        key_scales: None, or (an fp8 store, see `to_fp8`) ``[total_kept]`` float32, each key's scale.
        value_scales: None, or ``[total_kept]`` float32, each value's scale.
        dtype: the dtype the pairs are read in (the model's): the keys' own dtype, or the one they were quantized
            from.
        ends: None (packed: segment ``s`` ends where ``s + 1`` starts), or, with reserved room (see `append`), the
            host ints where each segment's pairs end; the slots up to the next segment's start are free.
        segment_ends: None, or the same ends as ``[S]`` int32 on the keys' device.
        appended: with room, the pairs each segment got from `append` since the room was made (sizes the next room).
        lease: with room, (the buffers' lease, the version this store holds): only the newest store built on the
            buffers writes into their room.
    """

    keys: torch.Tensor
    values: torch.Tensor
    cu_seqlens: torch.Tensor
    offsets: tuple[int, ...]
    positions: torch.Tensor
    num_heads: int
    max_seqlen: int
    key_scales: torch.Tensor | None = None
    value_scales: torch.Tensor | None = None
    dtype: torch.dtype | None = None
    ends: tuple[int, ...] | None = None
    segment_ends: torch.Tensor | None = None
    appended: tuple[int, ...] | None = None
    lease: tuple[_RoomLease, int] | None = None

    def __post_init__(self) -> None:
        if self.dtype is None:
            object.__setattr__(self, "dtype", self.keys.dtype)

    @classmethod
    def from_counts(cls, keys, values, positions, counts: torch.Tensor, num_heads: int,
                    key_scales: torch.Tensor | None = None, value_scales: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None) -> CompressedContext:
        """Build from flat kept pairs and the ``[S]`` number of pairs of each segment (and, for an fp8 store, their
        scales and the dtype they read in)."""
        cu_seqlens = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=keys.device)
        cu_seqlens[1:] = counts.cumsum(0)
        offsets = tuple(cu_seqlens.tolist())
        max_seqlen = max((b - a for a, b in zip(offsets[:-1], offsets[1:])), default=0)
        if key_scales is not None:
            key_scales, value_scales = key_scales.contiguous(), value_scales.contiguous()
        return cls(keys.contiguous(), values.contiguous(), cu_seqlens, offsets, positions.contiguous(), num_heads,
                   max_seqlen, key_scales, value_scales, dtype)

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

    @property
    def host_ends(self) -> tuple[int, ...]:
        """Where each segment's pairs end (host ints): ``offsets[1:]`` for a packed store."""
        return self.offsets[1:] if self.ends is None else self.ends

    @property
    def end_offsets(self) -> torch.Tensor:
        """``[S]`` int32 on the keys' device, where each segment's pairs end (a view of ``cu_seqlens`` if packed)."""
        return self.cu_seqlens[1:] if self.segment_ends is None else self.segment_ends

    def seqlens(self) -> torch.Tensor:
        """``[B0, H]`` int64 number of kept pairs per (row, KV head)."""
        starts = torch.tensor(self.offsets[:-1], dtype=torch.long)
        return (torch.tensor(self.host_ends, dtype=torch.long) - starts).view(self.num_rows, self.num_heads)

    def segment_ids(self) -> torch.Tensor:
        """``[total_kept]`` int64 on the keys' device: the segment (``b * num_heads + h``) of every kept pair (of a
        packed store: `compact` one with room first)."""
        if self.ends is not None:
            raise RuntimeError("segment_ids() of a store with reserved room: compact() it first")
        segments = torch.arange(self.num_segments, device=self.keys.device)
        return torch.repeat_interleave(segments, self.seqlens().flatten().to(self.keys.device))

    @property
    def is_fp8(self) -> bool:
        """Whether the pairs are stored as float8 with per-pair scales (`to_fp8`)."""
        return self.key_scales is not None

    def kv_bytes(self) -> int:
        """Bytes of the kept keys and values (with their scales, for an fp8 store)."""
        scales = self.key_scales.nbytes + self.value_scales.nbytes if self.is_fp8 else 0
        return self.keys.nbytes + self.values.nbytes + scales

    def read(self, index: slice | torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the pairs at ``index`` (a slice of rows, or an index tensor of any shape ``[...]``),
        ``[..., D]`` in ``dtype`` (default: `dtype`): dequantized for an fp8 store, the stored tensors otherwise."""
        keys, values = self.keys[index], self.values[index]
        if self.is_fp8:
            dtype = dtype or self.dtype
            return (dequantize_fp8(keys, self.key_scales[index], dtype),
                    dequantize_fp8(values, self.value_scales[index], dtype))
        return (keys, values) if dtype is None else (keys.to(dtype), values.to(dtype))

    def dense_span(self, row: int, start: int, end: int, dtype: torch.dtype | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pairs row ``row`` keeps at positions ``start .. end - 1``, laid out densely (a scoring pass over a
        compressed layer reads one chunk so).

        Returns:
            keys ``[H, end - start, D]`` and values in ``dtype`` (default: `dtype`), zero where a pair was evicted,
            and ``kept`` ``[H, end - start]`` bool.
        """
        if self.ends is not None:
            return self.compact().dense_span(row, start, end, dtype)
        heads = self.num_heads
        first, last = self.offsets[row * heads], self.offsets[(row + 1) * heads]
        counts = self.seqlens()[row].to(self.keys.device)
        head = torch.repeat_interleave(torch.arange(heads, device=self.keys.device), counts)  # [row's pairs]
        position = self.positions[first:last].long()
        inside = torch.nonzero((position >= start) & (position < end)).flatten()
        keys, values = self.read(inside + first, dtype or self.dtype)
        width, head_dim = end - start, self.keys.shape[-1]
        slot = (head[inside], position[inside] - start)
        dense_keys = keys.new_zeros(heads, width, head_dim)
        dense_values = values.new_zeros(heads, width, head_dim)
        kept = torch.zeros(heads, width, dtype=torch.bool, device=self.keys.device)
        dense_keys[slot], dense_values[slot], kept[slot] = keys, values, True
        return dense_keys, dense_values, kept

    def to_fp8(self) -> CompressedContext:
        """The same pairs stored as float8 e4m3 with a float32 scale per key and per value (itself, if already)."""
        if self.is_fp8:
            return self
        if self.ends is not None:
            return self.compact().to_fp8()
        keys, key_scales = quantize_fp8(self.keys)
        values, value_scales = quantize_fp8(self.values)
        return replace(self, keys=keys, values=values, key_scales=key_scales, value_scales=value_scales,
                       dtype=self.keys.dtype)

    def metadata_bytes(self) -> int:
        return self.cu_seqlens.nbytes + self.positions.nbytes

    # ------------------------------------------------------------------------------------------------ operations
    def select(self, pairs: torch.Tensor) -> CompressedContext:
        """The context of the kept pairs where ``pairs`` (``[total_kept]`` bool) is True, in the same order (of a
        packed store)."""
        counts = torch.bincount(self.segment_ids()[pairs], minlength=self.num_segments)
        scales = (self.key_scales[pairs], self.value_scales[pairs]) if self.is_fp8 else (None, None)
        return CompressedContext.from_counts(self.keys[pairs], self.values[pairs], self.positions[pairs], counts,
                                             self.num_heads, *scales, self.dtype)

    def keep(self, keep: torch.Tensor) -> CompressedContext:
        """The kept pairs whose position ``keep`` (``[B0, H, T]`` bool over padded positions) marks True."""
        if self.ends is not None:
            return self.compact().keep(keep)
        selected = keep.to(self.keys.device).reshape(self.num_segments, -1)[self.segment_ids(), self.positions.long()]
        return self.select(selected)

    def compact(self) -> CompressedContext:
        """The same pairs in a packed store (itself, if packed): no reserved room."""
        if self.ends is None:
            return self
        device = self.keys.device
        capacities = torch.tensor(self.offsets, dtype=torch.long).diff().to(device)
        segment = torch.repeat_interleave(torch.arange(self.num_segments, device=device), capacities)
        used = torch.arange(self.keys.shape[0], device=device) < self.segment_ends.long()[segment]
        scales = (self.key_scales[used], self.value_scales[used]) if self.is_fp8 else (None, None)
        return CompressedContext.from_counts(self.keys[used], self.values[used], self.positions[used],
                                             self.seqlens().flatten().to(device), self.num_heads, *scales, self.dtype)

    def _with_room(self, room: torch.Tensor, appended: torch.Tensor) -> CompressedContext:
        """These pairs in a new store whose segment ``s`` is followed by ``room[s]`` free slots (``[S]`` host int64
        tensors; ``appended``: what the new store's `appended` starts from). Free slots hold zeros and position -1."""
        packed = self.compact()
        device, lengths = packed.keys.device, packed.seqlens().flatten()
        capacity_offsets = torch.zeros(self.num_segments + 1, dtype=torch.long)
        capacity_offsets[1:] = (lengths + room).cumsum(0)
        destination = _scatter_index(lengths.to(device), capacity_offsets[:-1].to(device))

        def spread(tensor: torch.Tensor, fill: float) -> torch.Tensor:
            out = tensor.new_full((int(capacity_offsets[-1]), *tensor.shape[1:]), fill)
            out[destination] = tensor
            return out

        ends = capacity_offsets[:-1] + lengths
        scales = (spread(packed.key_scales, 1.0), spread(packed.value_scales, 1.0)) if packed.is_fp8 else (None, None)
        return replace(packed, keys=spread(packed.keys, 0), values=spread(packed.values, 0),
                       cu_seqlens=capacity_offsets.to(device=device, dtype=torch.int32),
                       offsets=tuple(capacity_offsets.tolist()), positions=spread(packed.positions, -1),
                       key_scales=scales[0], value_scales=scales[1], ends=tuple(ends.tolist()),
                       segment_ends=ends.to(device=device, dtype=torch.int32), appended=tuple(appended.tolist()),
                       lease=(_RoomLease(), 0))

    def _room_fits(self, counts: tuple[int, ...]) -> bool:
        """Whether `append` may write ``counts`` new pairs per segment into this store's room, in place."""
        if self.ends is None or self.lease[0].version != self.lease[1]:
            return False
        return all(end + count <= next_start for end, count, next_start in zip(self.ends, counts, self.offsets[1:]))

    def append(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, first_position: int,
               room: bool = False) -> CompressedContext:
        """This context plus the pairs of ``[B0, H, n, D]`` keys/values (positions ``first_position ..
        first_position + n - 1``) where ``keep`` (``[B0, H, n]`` bool) is True: each segment gets its old pairs,
        then its new ones, in position order. An fp8 store quantizes the new pairs (the old ones are not touched).

        ``room``: write the new pairs into the segments' reserved room, in place (O(new pairs)); a store without
        room enough is first rebuilt with room for them and for more (see the module docstring). Without ``room``
        the result is packed (every pair moves: O(context))."""
        segments, length, head_dim = self.num_segments, keys.shape[2], self.keys.shape[-1]
        keep = keep.to(self.keys.device).reshape(segments, length)
        new_keys = keys.reshape(segments, length, head_dim)[keep]
        new_values = values.reshape(segments, length, head_dim)[keep]
        new_positions = torch.arange(first_position, first_position + length, dtype=torch.int32,
                                     device=keep.device).expand(segments, -1)[keep]
        if room:
            return self._append_in_room(new_keys, new_values, new_positions, keep.sum(dim=1))
        if self.ends is not None:
            return self.compact().append(keys, values, keep.view(keys.shape[:3]), first_position)
        old_counts, new_counts = self.seqlens().flatten().to(keep.device), keep.sum(dim=1)
        segment_of = torch.cat([self.segment_ids().to(keep.device),
                                torch.arange(segments, device=keep.device).repeat_interleave(new_counts)])
        order = torch.argsort(segment_of, stable=True)  # each segment: its old pairs, then its new ones
        scales = (None, None)
        if self.is_fp8:
            (new_keys, new_key_scales), (new_values, new_value_scales) = quantize_fp8(new_keys), quantize_fp8(new_values)
            scales = (torch.cat([self.key_scales, new_key_scales])[order],
                      torch.cat([self.value_scales, new_value_scales])[order])
        return CompressedContext.from_counts(
            torch.cat([self.keys, new_keys])[order], torch.cat([self.values, new_values])[order],
            torch.cat([self.positions, new_positions])[order], old_counts + new_counts, self.num_heads,
            *scales, self.dtype,
        )

    def _append_in_room(self, new_keys: torch.Tensor, new_values: torch.Tensor, new_positions: torch.Tensor,
                        new_counts: torch.Tensor) -> CompressedContext:
        """`append` into reserved room: ``new_*`` are the new pairs segment after segment (``[n, D]``, ``[n]``),
        ``new_counts`` ``[S]`` how many each segment gets."""
        counts = tuple(new_counts.tolist())
        store = self
        if not store._room_fits(counts):  # room for these pairs, then for 4 more such appends or a quarter of what
            # the segment will hold, whichever is more: a rebuild every few appends first, then ever rarer
            appended = torch.tensor(self.appended or (0,) * self.num_segments, dtype=torch.long)
            new = torch.tensor(counts, dtype=torch.long)
            room = new + torch.maximum(_ROOM_APPENDS * new, (appended + new) // 4)
            store = self._with_room(room.clamp(min=_MIN_ROOM), appended)
        device = store.keys.device
        destination = _scatter_index(new_counts.to(device), store.segment_ends.long())
        if store.is_fp8:
            (new_keys, key_scales), (new_values, value_scales) = quantize_fp8(new_keys), quantize_fp8(new_values)
            store.key_scales[destination], store.value_scales[destination] = key_scales, value_scales
        store.keys[destination], store.values[destination] = new_keys, new_values
        store.positions[destination] = new_positions
        lease, _ = store.lease
        lease.version += 1
        ends = tuple(end + count for end, count in zip(store.ends, counts))
        segment_ends = store.segment_ends + new_counts.to(device=device, dtype=torch.int32)
        return replace(store, ends=ends, segment_ends=segment_ends,
                       appended=tuple(a + c for a, c in zip(store.appended, counts)), lease=(lease, lease.version),
                       max_seqlen=max((e - s for s, e in zip(store.offsets[:-1], ends)), default=0))

    def drop_after(self, length: int) -> CompressedContext:
        """The pairs at positions ``< length`` (forgets what `append` added after them), packed."""
        if self.ends is not None:
            return self.compact().drop_after(length)
        return self.select(self.positions < length)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CompressedContext:
        if self.ends is not None:  # (the same device returns the same buffers: never two leases on one room)
            return self.compact().to(device, non_blocking)

        def move(tensor):
            return None if tensor is None else tensor.to(device, non_blocking=non_blocking)

        return replace(self, keys=move(self.keys), values=move(self.values), cu_seqlens=move(self.cu_seqlens),
                       positions=move(self.positions), key_scales=move(self.key_scales),
                       value_scales=move(self.value_scales))

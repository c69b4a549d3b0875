"""CUDA backend: Triton kernels for the compressed context and for scoring; SDPA for dense attention.

- ragged: split-K over each (row, KV head)'s kept pairs (GQA group folded into the query rows; rows sharing one
  compressed context stacked too, so it is read once; fp8 pairs dequantized in registers), then one of two ways to
  add the dense tail (`decode_kernel` picks, from an H100 sweep): the tail cut into splits too and one parallel merge
  (`ragged_attention_split_tail`, three launches), or one kernel that walks the tail and merges (two launches:
  `ragged_attention_with_tail`, faster for many rows sharing a context with short tails).
- scoring: the output through SDPA; the scores through `restricted_max_scores_triton` (two tiled passes, no
  ``[q, keys]`` matrix in memory). KVzip+ scores use the reference's PyTorch function (no kernel).
- dense: the reference's (SDPA, with a lower-right causal bias instead of a materialised mask when unpadded).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from kvzip_cache.kernels import ragged_attention_split_tail, ragged_attention_with_tail, restricted_max_scores_triton

from ..views import CompressedScoringKV, RaggedKV, ScoringKV
from . import reference


def _on(device: torch.device):
    """Launch on the tensors' GPU: Triton launches on the current device, and a model sharded over GPUs
    (``device_map="auto"``) runs layers on others. Compiled graphs get inductor's own device guards."""
    if torch.compiler.is_compiling() or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


# Rows sharing a context with tails up to this many slots take the two-launch path (see `decode_kernel`).
SHARED_SHORT_TAIL = 256


def decode_kernel(share: int, tail_slots: int) -> Callable[..., torch.Tensor]:
    """The kernels' entry point for a step: the split tail unless rows share a context and their tails are short.

    Measured on an H100 (one layer of the 8B shape, CUDA graphs; docs/results/h100-depth-2/splits.md): for one row
    the split tail takes 25.4 against 32.8 us a layer at 32K, 84.9 against 98.4 at 128K, and 45.9 against 228.8 with
    an 8K-token tail (the two-launch kernel walks a row's tail in one program per KV head); for 64 rows sharing a 32K
    context with 80-slot tails it takes 95.0 against 85.9 (its merge has a program per query row and one more launch).
    The boundary at ``SHARED_SHORT_TAIL`` slots for shared rows is a choice between those measured points.
    """
    if share > 1 and tail_slots <= SHARED_SHORT_TAIL:
        return ragged_attention_with_tail
    return ragged_attention_split_tail


def ragged_attention(
    query: torch.Tensor, kv: RaggedKV, scaling: float, tail_valid: torch.Tensor | None = None, shared: bool = True,
    kernel: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Same contract as `reference.ragged_attention`: the context's splits, then the tail and the merge.

    Rows that share a compressed row (``kv.share > 1``: `KVzipCache.inputs_for(..., shared=True)`, beams, repeated
    rows) read its context once per step for all of them; ``shared=False`` reads it once per row (the
    "triton-per-row" backend, kept as the baseline the benchmark compares with). ``kernel``: the kernels' entry point
    (the "triton-split-tail" and "triton-two-launch" backends name one); default `decode_kernel`'s choice.

    The kernels serve decode steps and questions; more than `reference.LARGE_QUERY` queries (a head-dropping
    prefill's chunks) go to `reference.segment_attention` (the tail kernel has no causal block skipping, and it
    failed with an illegal memory access at 16K queries x GQA group 4 on the H200).
    """
    batch, num_q_heads, q_len, head_dim = query.shape
    if q_len > reference.LARGE_QUERY:
        kv, tail_valid = kv.written(tail_valid)
        return reference.segment_attention(query, kv, scaling, tail_valid)
    ctx = kv.context
    grouped = query.reshape(batch, ctx.num_heads, (num_q_heads // ctx.num_heads) * q_len, head_dim)
    share = kv.share if shared else 1
    # chosen from the batch's layout, so that "triton-per-row" differs from "triton" only in how the context is read
    kernel = kernel or decode_kernel(kv.share, kv.tail_keys.shape[2])
    with _on(query.device):
        return kernel(
            grouped, ctx.keys, ctx.values, ctx.cu_seqlens, kv.src_index, ctx.max_seqlen,
            kv.tail_keys, kv.tail_values, tail_valid, scaling, q_len, tail_end=kv.tail_end,
            share=share, key_scales=ctx.key_scales, value_scales=ctx.value_scales,
            seg_ends=ctx.end_offsets,
        )


def scoring_attention(
    query: torch.Tensor, kv: ScoringKV | CompressedScoringKV, scaling: float, key_valid: torch.Tensor | None,
    out_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `reference.scoring_attention`, with the Triton scores for KVzip passes over dense layers.

    KVzip+ passes (``kv.query_norms`` set) and passes over compressed layers (whose evicted chunk pairs the kernel
    cannot mask) run the PyTorch reference scores (blocked over queries), on the GPU as well; a compressed layer's
    output goes through this backend's ragged attention.
    """
    with _on(query.device):
        if kv.is_plus:
            return reference.scoring_attention(query, kv, scaling, key_valid, out_weight=out_weight,
                                               ragged=ragged_attention)
        return reference.scoring_attention(query, kv, scaling, key_valid, scores=restricted_max_scores_triton,
                                           ragged=ragged_attention)

"""CUDA backend: Triton kernels for the compressed context and for scoring; SDPA for dense attention.

- ragged: `ragged_attention_with_tail`: split-K over each (row, KV head)'s kept pairs (GQA group folded into the
  query rows; rows sharing one compressed context stacked too, so it is read once; fp8 pairs dequantized in
  registers), then one kernel for the dense tail and the log-sum-exp merge (two launches per layer).
- scoring: the output through SDPA; the scores through `restricted_max_scores_triton` (two tiled passes, no
  ``[q, keys]`` matrix in memory). KVzip+ scores use the reference's PyTorch function (no kernel).
- dense: the reference's (SDPA, with a lower-right causal bias instead of a materialised mask when unpadded).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from kvzip_cache.kernels import ragged_attention_with_tail, restricted_max_scores_triton

from ..views import CompressedScoringKV, RaggedKV, ScoringKV
from . import reference


def _on(device: torch.device):
    """Launch on the tensors' GPU: Triton launches on the current device, and a model sharded over GPUs
    (``device_map="auto"``) runs layers on others. Compiled graphs get inductor's own device guards."""
    if torch.compiler.is_compiling() or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def ragged_attention(
    query: torch.Tensor, kv: RaggedKV, scaling: float, tail_valid: torch.Tensor | None = None, shared: bool = True,
    kernel: Callable[..., torch.Tensor] = ragged_attention_with_tail,
) -> torch.Tensor:
    """Same contract as `reference.ragged_attention`: two kernel launches (context splits, then tail + merge).

    Rows that share a compressed row (``kv.share > 1``: `KVzipCache.inputs_for(..., shared=True)`, beams, repeated
    rows) read its context once per step for all of them; ``shared=False`` reads it once per row (the
    "triton-per-row" backend, kept as the baseline the benchmark compares with). ``kernel``: the kernels' entry point
    (`ragged_attention_split_tail` for the "triton-split-tail" backend: the tail cut into splits, three launches).

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
    with _on(query.device):
        return kernel(
            grouped, ctx.keys, ctx.values, ctx.cu_seqlens, kv.src_index, ctx.max_seqlen,
            kv.tail_keys, kv.tail_values, tail_valid, scaling, q_len, tail_end=kv.tail_end,
            share=kv.share if shared else 1, key_scales=ctx.key_scales, value_scales=ctx.value_scales,
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

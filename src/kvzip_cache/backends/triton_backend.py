"""CUDA backend: Triton kernels for the compressed context and for scoring; SDPA for dense attention.

- ragged: `ragged_context_attention` (split-K over each (row, KV head)'s kept pairs, GQA group folded into the
  query rows) merged by log-sum-exp with the dense tail (small; plain PyTorch).
- scoring: the output through SDPA; the scores through `restricted_max_scores_triton` (two tiled passes, no
  ``[q, keys]`` matrix in memory).
- dense: SDPA, with a lower-right causal bias instead of a materialised mask when there is no padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kvzip_cache.kernels import ragged_attention_with_tail, restricted_max_scores_triton

from ..states import RaggedKV, ScoringKV
from . import reference


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor | None = None,
    sliding_window: int | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """`reference.dense_attention`, without a ``[q, k]`` mask for the common unpadded causal chunk."""
    q_len, k_len = query.shape[-2], key.shape[-2]
    padded = key_valid is not None and not bool(key_valid.all())
    windowed = sliding_window is not None and k_len > sliding_window
    if causal and not padded and not windowed and 1 < q_len < k_len:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=causal_lower_right(q_len, k_len), scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )
        return out.transpose(1, 2)
    return reference.dense_attention(query, key, value, scaling, key_valid, sliding_window, causal)


def ragged_attention(
    query: torch.Tensor, kv: RaggedKV, scaling: float, tail_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Same contract as `reference.ragged_attention`: two kernel launches (context splits, then tail + merge)."""
    batch, num_q_heads, q_len, head_dim = query.shape
    ctx = kv.context
    grouped = query.reshape(batch, ctx.num_heads, (num_q_heads // ctx.num_heads) * q_len, head_dim)
    return ragged_attention_with_tail(
        grouped, ctx.keys, ctx.values, ctx.cu_seqlens, kv.src_index, ctx.max_seqlen,
        kv.tail_keys, kv.tail_values, tail_valid, scaling, q_len,
    )


def scoring_attention(query: torch.Tensor, kv: ScoringKV, scaling: float, key_valid: torch.Tensor | None) -> torch.Tensor:
    """Same contract as `reference.scoring_attention`, with this module's dense attention and the Triton scores."""
    return reference.scoring_attention(query, kv, scaling, key_valid, dense=dense_attention,
                                       scores=restricted_max_scores_triton)

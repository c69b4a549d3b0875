"""Split-K attention of new queries over a ragged, per-(row, KV head) compressed context (flash-decoding style).

The compressed context of a layer is flat: segment ``s = row * H + h`` holds its kept keys in rows
``cu_seqlens[s]:cu_seqlens[s+1]`` of ``keys [N, D]``. Batch row ``b`` reads the segments of compressed row
``src_rows[b]`` (beams share one context). Each program takes one (batch row, KV head), one slice of its segment
(``split``) and one block of query rows, and loads each key block ONCE for the whole GQA group: the group's query
heads and query positions are the rows of one matrix, ``M = g * q`` rows per KV head. The partial results of the
splits are merged by log-sum-exp (with the dense tail, by the caller).

Reference: `ragged_context_attention_reference` (plain PyTorch); tests compare the two on awkward shapes.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install has no Triton; the reference backend is used instead
    triton = None


def ragged_context_attention_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: tuple[int, ...],
    src_rows: tuple[int, ...],
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch reference.

    Args:
        query: ``[B, H, M, D]`` (M = GQA group x query positions).
        keys, values: ``[N, D]`` flat compressed context.
        offsets: ``S + 1`` host ints, segment ``s`` is ``keys[offsets[s]:offsets[s+1]]``.
        src_rows: B host ints.
        scaling: softmax scale.

    Returns:
        ``(out [B, H, M, D] float32, lse [B, H, M] float32)``; empty segments give out 0 and lse -inf.
    """
    batch, num_heads, rows, head_dim = query.shape
    out = torch.zeros(batch, num_heads, rows, head_dim, dtype=torch.float32, device=query.device)
    lse = torch.full((batch, num_heads, rows), float("-inf"), dtype=torch.float32, device=query.device)
    for b, src in enumerate(src_rows):
        for h in range(num_heads):
            lo, hi = offsets[src * num_heads + h], offsets[src * num_heads + h + 1]
            if hi > lo:
                logits = query[b, h].float() @ keys[lo:hi].float().T * scaling
                lse[b, h] = torch.logsumexp(logits, dim=-1)
                out[b, h] = torch.softmax(logits, dim=-1) @ values[lo:hi].float()
    return out, lse


if triton is not None:

    @triton.jit
    def _ragged_split_kernel(
        Q, K, V, CU, SRC, O, LSE,
        scaling,
        stride_qb, stride_qh, stride_qm,
        stride_ob, stride_oh, stride_os, stride_om,
        stride_lb, stride_lh, stride_ls,
        num_heads, rows, split_len,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        m_block = tl.program_id(2)
        b = bh // num_heads
        h = bh % num_heads
        seg = tl.load(SRC + b) * num_heads + h
        seg_start = tl.load(CU + seg)
        seg_end = tl.load(CU + seg + 1)
        lo = seg_start + split * split_len
        hi = tl.minimum(seg_end, lo + split_len)

        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=offs_m[:, None] < rows, other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start in tl.range(lo, hi, BLOCK_N):
            n_idx = start + offs_n
            valid = n_idx < hi
            k = tl.load(K + n_idx[:, None] * HEAD_DIM + offs_d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(V + n_idx[:, None] * HEAD_DIM + offs_d[None, :], mask=valid[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(valid[None, :], s * scaling, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        has_keys = l_i > 0
        out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        row_mask = offs_m < rows
        o_ptr = O + b * stride_ob + h * stride_oh + split * stride_os
        tl.store(o_ptr + offs_m[:, None] * stride_om + offs_d[None, :], out, mask=row_mask[:, None])
        tl.store(LSE + b * stride_lb + h * stride_lh + split * stride_ls + offs_m, lse, mask=row_mask)


def choose_splits(batch_heads: int, max_seqlen: int, num_sms: int, block_n: int) -> int:
    """Enough splits that (rows x heads x splits) fills the GPU about twice, none shorter than one key block."""
    wanted = max(1, (2 * num_sms + batch_heads - 1) // batch_heads)
    return max(1, min(wanted, (max_seqlen + block_n - 1) // block_n))


def ragged_context_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    src_rows: torch.Tensor,
    max_seqlen: int,
    scaling: float,
    num_splits: int | None = None,
    block_m: int = 16,
    block_n: int = 64,
    poison: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton split-K attention over the compressed context, merged over splits.

    Args:
        query: ``[B, H, M, D]`` contiguous in the last dim (M = GQA group x query positions).
        keys, values: ``[N, D]`` contiguous, bf16/fp16/fp32.
        cu_seqlens: ``[S + 1]`` int32 on the device.
        src_rows: ``[B]`` int32 on the device.
        max_seqlen: the longest segment (host int; sizes the grid without a device sync).
        poison: fill the split buffers with NaN first (tests: every element must be written).

    Returns:
        ``(out [B, H, M, D] float32, lse [B, H, M] float32)``, as `ragged_context_attention_reference`.
    """
    batch, num_heads, rows, head_dim = query.shape
    if triton is None:
        raise RuntimeError("Triton is not installed: pip install triton (or use the reference backend)")
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim {head_dim} is not supported by the Triton kernel (16/32/64/128/256)")
    if num_splits is None:
        sms = torch.cuda.get_device_properties(query.device).multi_processor_count if query.is_cuda else 4
        num_splits = choose_splits(batch * num_heads, max_seqlen, sms, block_n)
    split_len = max(block_n, -(-max(max_seqlen, 1) // num_splits))
    split_len = -(-split_len // block_n) * block_n
    num_splits = max(1, -(-max(max_seqlen, 1) // split_len))
    query = query.contiguous()
    alloc = (lambda *shape: torch.full(shape, float("nan"), device=query.device)) if poison else (
        lambda *shape: torch.empty(shape, dtype=torch.float32, device=query.device))
    out = alloc(batch, num_heads, num_splits, rows, head_dim)
    lse = alloc(batch, num_heads, num_splits, rows)
    if head_dim >= 256:
        block_n = min(block_n, 32)
    grid = (batch * num_heads, num_splits, triton.cdiv(rows, block_m))
    _ragged_split_kernel[grid](
        query, keys, values, cu_seqlens, src_rows, out, lse,
        scaling,
        query.stride(0), query.stride(1), query.stride(2),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        num_heads, rows, split_len,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=keys.dtype == torch.float32,
        num_warps=4 if head_dim <= 128 else 8, num_stages=3,
    )
    return merge_splits(out, lse)


def merge_splits(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp merge over dim 2: ``out [B, H, S, M, D]``, ``lse [B, H, S, M]`` -> ``[B, H, M, D]``, ``[B, H, M]``."""
    total = torch.logsumexp(lse, dim=2)
    weights = torch.exp(lse - total.unsqueeze(2)).nan_to_num_(0.0)  # all -inf (empty segment): weight 0
    return (out * weights.unsqueeze(-1)).sum(dim=2), total

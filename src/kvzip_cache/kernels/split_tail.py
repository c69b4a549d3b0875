"""Decode attention in three launches: the context's splits, the tail's splits, then one merge.

`ragged_attention_with_tail` merges the context's split results inside its tail kernel: one program per (row, KV
head) walks the whole dense tail, then adds up the splits' partial results one after another. On an H100 that kernel
takes about 23 us a layer at batch 1 whatever the context (8 programs, each a chain of dependent reads, one per
split), and an 8K-token answer's tail is walked by one program per (row, head).

Here the tail is cut into splits like the context (`_tail_split_kernel`: causal, with padding or a static tail's
device-side end, writing partial results in the context splits' format), and `_merge_kernel` merges both sets with
one program per (row, KV head, query row), reading ``BLOCK_S`` splits' partial results per load. The Triton backend
takes this path unless rows share a context and their tails are short (`triton_backend.decode_kernel`, from the H100
sweep of ``python scripts/kernel_sweep.py --splits``: 25.4 against 32.8 us a layer for one row at 32K, 45.9 against
228.8 with an 8K-token tail); the backend ``"triton-split-tail"`` forces it.

References: `tail_split_partials_reference` for the tail kernel, `merge_splits` over both sets for the merge.
"""

from __future__ import annotations

import torch

from .ragged_attention import context_partials, head_dim_block, triton


def tail_splits_for(capacity: int, keys_per_split: int = 256, max_splits: int = 16) -> int:
    """Splits of a tail with room for ``capacity`` tokens: one per ``keys_per_split`` (a host-side bound: a static
    tail's length is on the device, and the kernel cuts its splits from that length), at most ``max_splits``."""
    return max(1, min(max_splits, -(-capacity // keys_per_split)))


def tail_split_partials_reference(
    query: torch.Tensor,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    tail_valid: torch.Tensor | None,
    scaling: float,
    q_len: int,
    num_splits: int,
    tail_len: int | None = None,
    block_n: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch twin of `_tail_split_kernel`.

    Args:
        query: ``[B, H, M, D]``, row ``j * q_len + i`` = GQA head ``j`` at position ``i`` (the last ``q_len`` tail
            slots hold the queries' own tokens).
        tail_keys: ``[B, H, t, D]``; tail_values likewise.
        tail_valid: ``[B, t]`` bool padding mask or None.
        tail_len: the written tail slots (a static tail's end); None: all ``t``.

    Returns:
        ``(out [B, H, splits, M, D] float32, lse [B, H, splits, M] float32)``; a split with no key a row may see has
        out 0 and lse -inf. Splits are ``ceil(ceil(tail_len / splits) / block_n) * block_n`` slots each, as the kernel
        cuts them.
    """
    batch, num_heads, rows, head_dim = query.shape
    tail_len = tail_keys.shape[2] if tail_len is None else tail_len
    per_split = -(-tail_len // num_splits)  # ceil, then up to whole key blocks, as the kernel cuts them
    split_len = -(-per_split // block_n) * block_n
    positions = tail_len - q_len + torch.arange(rows, device=query.device) % q_len  # [M]
    slots = torch.arange(tail_len, device=query.device)
    allowed = slots[None, :] <= positions[:, None]  # [M, t]
    if tail_valid is not None:
        allowed = (allowed[None] & tail_valid[:, None, :tail_len]) | (slots[None, None, :] == positions[None, :, None])
    else:
        allowed = allowed[None].expand(batch, -1, -1)
    logits = query.float() @ tail_keys[:, :, :tail_len].float().transpose(-1, -2) * scaling  # [B, H, M, t]
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.zeros(batch, num_heads, num_splits, rows, head_dim, dtype=torch.float32, device=query.device)
    lse = torch.full((batch, num_heads, num_splits, rows), float("-inf"), dtype=torch.float32, device=query.device)
    for split in range(num_splits):
        lo, hi = split * split_len, min(tail_len, (split + 1) * split_len)
        if hi <= lo:
            continue
        part = logits[..., lo:hi]
        total = torch.logsumexp(part, dim=-1)  # -inf where a row sees none of them
        weights = torch.exp(part - total.nan_to_num(neginf=0.0)[..., None]).nan_to_num(0.0)
        lse[:, :, split] = total
        out[:, :, split] = weights @ tail_values[:, :, lo:hi].float()
    return out, lse


if triton is not None:  # the CPU-only install has no Triton: the reference backend runs, and nothing here is called
    import triton.language as tl

    from .ragged_attention import _dim_mask, _online_softmax_block

    @triton.jit
    def _tail_split_kernel(
        Q, TK, TV, VALID, END, O, LSE,
        scaling,
        stride_qb, stride_qh, stride_qm,
        stride_tb, stride_th, stride_tn,
        stride_vb,
        stride_ob, stride_oh, stride_os, stride_om,
        stride_lb, stride_lh, stride_ls,
        num_heads, rows, q_len, tail_len, num_splits,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_VALID: tl.constexpr, HAS_END: tl.constexpr, IEEE: tl.constexpr,
    ):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        m_block = tl.program_id(2)
        if HAS_END:  # a static tail: only the first END slots are written (read on the device, never on the host)
            tail_len = tl.load(END).to(tl.int32)
        b = bh // num_heads
        h = bh % num_heads
        split_len = tl.cdiv(tl.cdiv(tail_len, num_splits), BLOCK_N) * BLOCK_N
        lo = split * split_len
        hi = tl.minimum(tail_len, lo + split_len)
        PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        row_ok = offs_m < rows
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=_dim_mask(row_ok[:, None], offs_d, HEAD_DIM, PAD_D), other=0.0)
        pos = tail_len - q_len + offs_m % q_len  # each row's own position in the tail
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in tl.range(lo, hi, BLOCK_N):
            n_idx = start + offs_n
            in_split = n_idx < hi
            kv_mask = _dim_mask(in_split[:, None], offs_d, HEAD_DIM, PAD_D)
            k = tl.load(TK + b * stride_tb + h * stride_th + n_idx[:, None] * stride_tn + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            v = tl.load(TV + b * stride_tb + h * stride_th + n_idx[:, None] * stride_tn + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            allowed = (n_idx[None, :] <= pos[:, None]) & in_split[None, :]
            if HAS_VALID:  # padding is never seen, but a query always sees itself
                valid = tl.load(VALID + b * stride_vb + n_idx, mask=in_split, other=0) != 0
                allowed = (allowed & valid[None, :]) | ((n_idx[None, :] == pos[:, None]) & in_split[None, :])
            m_i, l_i, acc = _online_softmax_block(q, k, v, allowed, scaling, m_i, l_i, acc, IEEE)
        has_keys = l_i > 0
        out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        o_ptr = O + b * stride_ob + h * stride_oh + split * stride_os
        tl.store(o_ptr + offs_m[:, None] * stride_om + offs_d[None, :], out,
                 mask=_dim_mask(row_ok[:, None], offs_d, HEAD_DIM, PAD_D))
        tl.store(LSE + b * stride_lb + h * stride_lh + split * stride_ls + offs_m, lse, mask=row_ok)

    @triton.jit
    def _max_lse(lse_ptr, stride_s, count, BLOCK_S: tl.constexpr):
        """The largest of ``count`` splits' log-sum-exps (``-inf`` when none)."""
        offs_s = tl.arange(0, BLOCK_S)
        largest = tl.full([], float("-inf"), tl.float32)
        for first in range(0, count, BLOCK_S):
            split = first + offs_s
            largest = tl.maximum(largest, tl.max(tl.load(lse_ptr + split * stride_s, mask=split < count,
                                                         other=float("-inf")), axis=0))
        return largest

    @triton.jit
    def _add_weighted(lse_ptr, out_ptr, stride_ls, stride_os, count, m_all, acc, total,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        """``acc + sum_s exp(lse_s - m_all) * out_s`` and ``total + sum_s exp(lse_s - m_all)`` over ``count``
        splits, ``BLOCK_S`` of them per load."""
        PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        for first in range(0, count, BLOCK_S):
            split = first + offs_s
            in_range = split < count
            weight = tl.exp(tl.load(lse_ptr + split * stride_ls, mask=in_range, other=float("-inf")) - m_all)
            part = tl.load(out_ptr + split[:, None] * stride_os + offs_d[None, :],
                           mask=_dim_mask(in_range[:, None], offs_d, HEAD_DIM, PAD_D), other=0.0)
            acc += tl.sum(part * weight[:, None], axis=0)
            total += tl.sum(weight, axis=0)
        return acc, total

    @triton.jit
    def _merge_kernel(
        CO, CL, TO, TL, OUT,
        stride_cb, stride_ch, stride_cs, stride_cm,
        stride_clb, stride_clh, stride_cls,
        stride_tb, stride_th, stride_ts, stride_tm,
        stride_tlb, stride_tlh, stride_tls,
        stride_ob, stride_oq, stride_oh,
        num_heads, rows, q_len, group, context_splits, tail_splits, share,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        bh = tl.program_id(0)
        m = tl.program_id(1)
        b = bh // num_heads
        h = bh % num_heads
        offs_d = tl.arange(0, BLOCK_D)
        # context partials: batch row b's query row m is row (b % share) * rows + m of context row b // share
        c_lse = CL + (b // share) * stride_clb + h * stride_clh + ((b % share) * rows + m)
        c_out = CO + (b // share) * stride_cb + h * stride_ch + ((b % share) * rows + m) * stride_cm
        t_lse = TL + b * stride_tlb + h * stride_tlh + m
        t_out = TO + b * stride_tb + h * stride_th + m * stride_tm
        # 1. the largest log-sum-exp of both sets (the tail split holding the query's own token is finite)
        m_all = tl.maximum(_max_lse(c_lse, stride_cls, context_splits, BLOCK_S),
                           _max_lse(t_lse, stride_tls, tail_splits, BLOCK_S))
        # 2. the weighted sum, BLOCK_S splits' partial outputs ([BLOCK_S, BLOCK_D]) per load
        acc, total = _add_weighted(c_lse, c_out, stride_cls, stride_cs, context_splits, m_all,
                                   tl.zeros([BLOCK_D], tl.float32), tl.full([], 0.0, tl.float32), HEAD_DIM, BLOCK_D,
                                   BLOCK_S)
        acc, total = _add_weighted(t_lse, t_out, stride_tls, stride_ts, tail_splits, m_all, acc, total,
                                   HEAD_DIM, BLOCK_D, BLOCK_S)
        out = acc / total
        # row m = j * q_len + i is query head h * group + j at position i: write [B, q, Hq, D] directly
        head = h * group + m // q_len
        dim_ok = offs_d < HEAD_DIM
        tl.store(OUT + b * stride_ob + (m % q_len) * stride_oq + head * stride_oh + offs_d,
                 out.to(OUT.dtype.element_ty), mask=dim_ok)


def tail_split_partials(
    query: torch.Tensor,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    tail_valid: torch.Tensor | None,
    scaling: float,
    q_len: int,
    num_splits: int,
    tail_end: torch.Tensor | None = None,
    block_m: int = 16,
    block_n: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K attention of the queries over their dense tail (causal, padding masked): the tail's partial results.

    Args as `tail_split_partials_reference`, with ``tail_end`` a 0-dim integer device tensor (a static tail's end,
    read by the kernel) instead of a host ``tail_len``.

    Returns:
        ``(out [B, H, splits, M, D] float32, lse [B, H, splits, M] float32)``.
    """
    batch, num_heads, rows, head_dim = query.shape
    out = torch.empty(batch, num_heads, num_splits, rows, head_dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(batch, num_heads, num_splits, rows, dtype=torch.float32, device=query.device)
    valid = tail_valid.to(torch.int8).contiguous() if tail_valid is not None else out  # dummy when absent
    end = tail_end if tail_end is not None else out  # dummy when absent
    grid = (batch * num_heads, num_splits, triton.cdiv(rows, block_m))
    _tail_split_kernel[grid](
        query, tail_keys, tail_values, valid, end, out, lse,
        scaling,
        query.stride(0), query.stride(1), query.stride(2),
        tail_keys.stride(0), tail_keys.stride(1), tail_keys.stride(2),
        valid.stride(0) if tail_valid is not None else 0,
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        num_heads, rows, q_len, tail_keys.shape[2], num_splits,
        HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_VALID=tail_valid is not None, HAS_END=tail_end is not None, IEEE=query.dtype == torch.float32,
        num_warps=4,
    )
    return out, lse


def merge_partials(
    context_out: torch.Tensor,
    context_lse: torch.Tensor,
    tail_out: torch.Tensor,
    tail_lse: torch.Tensor,
    q_len: int,
    share: int,
    dtype: torch.dtype,
    block_s: int = 32,
) -> torch.Tensor:
    """Merge the context's and the tail's partial results by log-sum-exp into transformers' layout.

    Args:
        context_out: ``[B / share, H, S, share * M, D]`` and context_lse ``[B / share, H, S, share * M]``
            (`context_partials`).
        tail_out: ``[B, H, T, M, D]`` and tail_lse ``[B, H, T, M]`` (`tail_split_partials`).

    Returns:
        ``[B, q_len, H * g, D]`` in ``dtype`` (``M = g * q_len``).
    """
    batch, num_heads, tail_splits, rows, head_dim = tail_out.shape
    group = rows // q_len
    out = torch.empty(batch, q_len, num_heads * group, head_dim, dtype=dtype, device=tail_out.device)
    _merge_kernel[(batch * num_heads, rows)](
        context_out, context_lse, tail_out, tail_lse, out,
        context_out.stride(0), context_out.stride(1), context_out.stride(2), context_out.stride(3),
        context_lse.stride(0), context_lse.stride(1), context_lse.stride(2),
        tail_out.stride(0), tail_out.stride(1), tail_out.stride(2), tail_out.stride(3),
        tail_lse.stride(0), tail_lse.stride(1), tail_lse.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        num_heads, rows, q_len, group, context_out.shape[2], tail_splits, share,
        HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim), BLOCK_S=block_s, num_warps=4,
    )
    return out


def ragged_attention_split_tail(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    src_rows: torch.Tensor,
    max_seqlen: int,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    tail_valid: torch.Tensor | None,
    scaling: float,
    q_len: int,
    block_m: int = 16,
    tail_end: torch.Tensor | None = None,
    share: int = 1,
    context_block_m: int | None = None,
    tail_splits: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """`ragged_attention_with_tail`'s contract (same arguments and result) in three launches: the context's splits,
    the tail's splits (``tail_splits``; default `tail_splits_for` the tail's capacity), one merge."""
    context_out, context_lse = context_partials(
        query, keys, values, cu_seqlens, src_rows, max_seqlen, scaling, share,
        block_m, context_block_m, **kwargs)
    splits = tail_splits or tail_splits_for(tail_keys.shape[2])
    tail_out, tail_lse = tail_split_partials(query, tail_keys, tail_values, tail_valid, scaling, q_len, splits,
                                             tail_end=tail_end, block_m=block_m)
    return merge_partials(context_out, context_lse, tail_out, tail_lse, q_len, share, query.dtype)

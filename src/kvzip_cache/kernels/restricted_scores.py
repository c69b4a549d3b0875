"""KVzip scores without an attention matrix in memory.

For one layer and one reconstruction pass: queries ``[Hq, n, D]`` (query head ``h * g + j`` reads KV head ``h``) and
the restricted keys ``[H, R, D]`` = ``[prefix (P) | chunk (C) | the pass's own keys (n, causal)]``. The score of chunk
key ``c`` of KV head ``h`` is ``max over j, i of softmax_R(q[h*g+j, i] . k / sqrt)[P + c]``.

Two passes, each a plain tiled loop (nothing of size ``n x R`` is ever stored):
1. `_lse_kernel`: the log-sum-exp of every query row over its restricted keys (online softmax).
2. `_max_prob_kernel`: for a block of chunk keys, ``exp(s - lse)`` over all query rows of the group, max-reduced.
Chunk keys are visible to every query of the pass, so pass 2 needs no causal mask.

Any head_dim from 16 to 256: tiles are ``BLOCK_D = next_power_of_2(head_dim)`` wide, loads masked to the real
``HEAD_DIM`` with 0 when that pads (as in `ragged_attention`); a power-of-two head_dim compiles without the mask.

Reference: `restricted_max_scores` in `kvzip_cache.backends.reference`.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from .ragged_attention import head_dim_block

if triton is not None:
    from .ragged_attention import _dim_mask

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _lse_kernel(
        Q, K, LSE, scaling,
        stride_qh, stride_qn, stride_kh, stride_kr,
        n_new, n_fixed, group,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        qh = tl.program_id(0)
        m_block = tl.program_id(1)
        h = qh // group
        PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        q = tl.load(Q + qh * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                    mask=_dim_mask(offs_m[:, None] < n_new, offs_d, HEAD_DIM, PAD_D), other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        # Keys visible to this block: all fixed keys, and new keys up to its last query (causal).
        last = n_fixed + tl.minimum(m_block * BLOCK_M + BLOCK_M, n_new)
        for start in tl.range(0, last, BLOCK_N):
            r = start + offs_n
            k = tl.load(K + h * stride_kh + r[:, None] * stride_kr + offs_d[None, :],
                        mask=_dim_mask(r[:, None] < last, offs_d, HEAD_DIM, PAD_D), other=0.0)
            s = (_dot(q, tl.trans(k), IEEE) * scaling).to(tl.float32)
            visible = (r[None, :] < n_fixed) | ((r[None, :] - n_fixed) <= offs_m[:, None])
            s = tl.where(visible & (r[None, :] < last), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m_i = m_new
        tl.store(LSE + qh * n_new + offs_m, m_i + tl.log(l_i), mask=offs_m < n_new)

    @triton.jit
    def _max_prob_kernel(
        Q, K, LSE, OUT, scaling,
        stride_qh, stride_qn, stride_kh, stride_kr,
        n_new, chunk_lo, chunk_len, group,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        h = tl.program_id(0)
        n_block = tl.program_id(1)
        PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
        offs_c = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_m = tl.arange(0, BLOCK_M)
        k = tl.load(K + h * stride_kh + (chunk_lo + offs_c)[:, None] * stride_kr + offs_d[None, :],
                    mask=_dim_mask(offs_c[:, None] < chunk_len, offs_d, HEAD_DIM, PAD_D), other=0.0)
        best = tl.zeros([BLOCK_N], tl.float32)
        for j in range(0, group):
            qh = h * group + j
            for start in range(0, n_new, BLOCK_M):
                rows = start + offs_m
                q = tl.load(Q + qh * stride_qh + rows[:, None] * stride_qn + offs_d[None, :],
                            mask=_dim_mask(rows[:, None] < n_new, offs_d, HEAD_DIM, PAD_D), other=0.0)
                lse = tl.load(LSE + qh * n_new + rows, mask=rows < n_new, other=float("inf"))
                s = (_dot(q, tl.trans(k), IEEE) * scaling).to(tl.float32)
                p = tl.exp(s - lse[:, None])  # rows past n_new have lse = +inf: p = 0
                best = tl.maximum(best, tl.max(p, axis=0))
        tl.store(OUT + h * chunk_len + offs_c, best, mask=offs_c < chunk_len)


def restricted_max_scores_triton(
    query: torch.Tensor,
    prefix_keys: torch.Tensor,
    chunk_keys: torch.Tensor,
    new_keys: torch.Tensor,
    scaling: float,
    block_m: int = 64,
    block_n: int = 64,
    poison: bool = False,
) -> torch.Tensor:
    """Same contract as `kvzip_cache.backends.reference.restricted_max_scores`.

    Args:
        query: ``[H * g, n, D]``; prefix_keys ``[H, P, D]``; chunk_keys ``[H, C, D]``; new_keys ``[H, n, D]``.
        poison: fill the buffers with NaN first (tests: every element must be written).

    Returns:
        ``[H, C]`` float32.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed: pip install triton (or use the reference backend)")
    num_q_heads, n_new, head_dim = query.shape
    num_heads, chunk_len, _ = chunk_keys.shape
    block_d = head_dim_block(head_dim)
    group = num_q_heads // num_heads
    keys = torch.cat([prefix_keys, chunk_keys, new_keys], dim=1).to(query.dtype).contiguous()  # [H, R, D]
    query = query.contiguous()
    n_fixed = prefix_keys.shape[1] + chunk_len
    ieee = query.dtype == torch.float32
    if block_d >= 256:  # the padded width sets the tile sizes (registers, shared memory)
        block_m = block_n = 32
    alloc = torch.full if poison else (lambda shape, _, **kw: torch.empty(shape, **kw))
    lse = alloc((num_q_heads, n_new), float("nan"), dtype=torch.float32, device=query.device)
    _lse_kernel[(num_q_heads, triton.cdiv(n_new, block_m))](
        query, keys, lse, scaling,
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1),
        n_new, n_fixed, group,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=ieee, num_warps=4,
    )
    out = alloc((num_heads, chunk_len), float("nan"), dtype=torch.float32, device=query.device)
    if chunk_len:
        _max_prob_kernel[(num_heads, triton.cdiv(chunk_len, block_n))](
            query, keys, lse, out, scaling,
            query.stride(0), query.stride(1), keys.stride(0), keys.stride(1),
            n_new, prefix_keys.shape[1], chunk_len, group,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=ieee, num_warps=4,
        )
    return out

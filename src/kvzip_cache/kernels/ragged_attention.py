"""Split-K attention of new queries over a ragged, per-(row, KV head) compressed context (flash-decoding style).

The compressed context of a layer is flat: segment ``s = row * H + h`` holds its kept keys in rows
``cu_seqlens[s]:cu_seqlens[s+1]`` of ``keys [N, D]``. Batch row ``b`` reads the segments of compressed row
``src_rows[b]`` (beams share one context). Each program takes one (batch row, KV head), one slice of its segment
(``split``) and one block of query rows, and loads each key block ONCE for the whole GQA group: the group's query
heads and query positions are the rows of one matrix, ``M = g * q`` rows per KV head. The partial results of the
splits are merged by log-sum-exp (with the dense tail, by the caller).

Any head_dim from 16 to 256: tiles are ``BLOCK_D = next_power_of_2(head_dim)`` wide (``tl.arange`` needs a power of
two); when that pads (96 -> 128, 80 -> 128, 192 -> 256), loads are masked to the real ``HEAD_DIM`` with 0 (padded
lanes add nothing to the dot products) and so are stores. A power-of-two head_dim compiles exactly as without padding.

fp8 stores (`CompressedContext.to_fp8`): keys and values are float8 e4m3 with one float32 scale per pair. The split
kernel converts each fp8 tile in registers and folds the scales in where they cost least: the key scale multiplies
the ``[M, BLOCK_N]`` logits, the value scale the probabilities before the ``P @ V`` product
(``sum_n p_n * (s_n * v_n) = sum_n (p_n * s_n) * v_n``), so no dequantized ``[BLOCK_N, D]`` tile is ever scaled or
written. The products run in float16 (``fp8_dots``) whatever the query's 16-bit type: every e4m3 value is a float16
exactly, and the GPU converts e4m3 to float16 two at a time in one instruction, where bfloat16 takes a second,
scalar conversion per element (256 a thread per key block of 128, the largest share of the loop's instructions:
`scripts/kernel_resources.py`). A bf16 query is rounded to float16 once per program (clamped to float16's range;
float16 has three more mantissa bits), and the probabilities enter ``P @ V`` as float16 scaled by each value's scale
over the block's largest (so that tiny scales do not fall into float16's subnormals); the block's product is then
multiplied by that largest scale in float32. The dense tail is never fp8, so the tail-merge kernel is unchanged.

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
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
    ends: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch reference.

    Args:
        query: ``[B, H, M, D]`` (M = GQA group x query positions).
        keys: ``[N, D]`` flat compressed context.
        values: ``[N, D]``, like ``keys``.
        offsets: ``S + 1`` host ints, segment ``s`` is ``keys[offsets[s]:offsets[s+1]]``.
        src_rows: B host ints.
        scaling: softmax scale.
        key_scales: None, or ``[N]`` float32 (fp8 keys): key ``n`` is ``keys[n] * key_scales[n]``.
        value_scales: None, or ``[N]`` float32, the same for values.
        ends: None (segment ``s`` ends at ``offsets[s + 1]``), or ``S`` host ints: where each segment's pairs end.

    Returns:
        ``(out [B, H, M, D] float32, lse [B, H, M] float32)``; empty segments give out 0 and lse -inf.
    """
    batch, num_heads, rows, head_dim = query.shape
    keys = keys.float() if key_scales is None else keys.float() * key_scales[:, None]
    values = values.float() if value_scales is None else values.float() * value_scales[:, None]
    out = torch.zeros(batch, num_heads, rows, head_dim, dtype=torch.float32, device=query.device)
    lse = torch.full((batch, num_heads, rows), float("-inf"), dtype=torch.float32, device=query.device)
    for b, src in enumerate(src_rows):
        for h in range(num_heads):
            lo = offsets[src * num_heads + h]
            hi = offsets[src * num_heads + h + 1] if ends is None else ends[src * num_heads + h]
            if hi > lo:
                logits = query[b, h].float() @ keys[lo:hi].T * scaling
                lse[b, h] = torch.logsumexp(logits, dim=-1)
                out[b, h] = torch.softmax(logits, dim=-1) @ values[lo:hi]
    return out, lse


MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def head_dim_block(head_dim: int) -> int:
    """The padded tile width ``BLOCK_D`` (next power of two) of a supported head_dim; ValueError for the others."""
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"head_dim {head_dim} is not supported by the Triton kernels (any head_dim from {MIN_HEAD_DIM} to "
            f"{MAX_HEAD_DIM} is); run this model with the reference backend instead: "
            f'`with kvzip_cache.backends.use_backend("reference"): ...`'
        )
    return 1 << (head_dim - 1).bit_length()


if triton is not None:

    @triton.jit
    def _dim_mask(mask, offs_d, HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr):
        """A ``[rows, 1]`` load/store mask, narrowed to the real head dims when the tile is padded (BLOCK_D > HEAD_DIM).

        Unpadded (a power-of-two head_dim) it is returned as it is, so that code path is unchanged. (One return:
        Triton's compiler rejects returns of different shapes even in branches a constexpr rules out.)
        """
        if PAD_D:
            mask = mask & (offs_d[None, :] < HEAD_DIM)
        return mask

    @triton.jit
    def _online_softmax_block(q, k, v, allowed, scaling, m_i, l_i, acc, IEEE: tl.constexpr,
                              k_scale=None, v_scale=None, SCALED: tl.constexpr = False):
        """One key block of an online softmax: returns the updated (running max, running sum, accumulator).

        ``SCALED``: ``k`` and ``v`` are the raw rows of an fp8 store (already converted to ``q``'s 16-bit type, or to
        float32 with ``IEEE``) and ``k_scale`` / ``v_scale`` (``[BLOCK_N]`` float32) their per-pair scales, applied
        to the logits and to the probabilities. A row whose keys are all masked so far keeps max -inf, sum 0 and
        accumulator 0 (no NaN).
        """
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if SCALED:
            s = s * k_scale[None, :]
        # float32 whatever type the scale arrives as (torch.compile passes Python floats to user kernels as fp64)
        s = tl.where(allowed, (s * scaling).to(tl.float32), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            if SCALED:
                p = p * v_scale[None, :]  # the running sum above took the unscaled probabilities
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        elif SCALED:  # 16-bit products: each value's scale relative to the block's largest, which scales the sum
            top = tl.maximum(tl.max(v_scale, axis=0), 1e-30)  # (masked keys load scale 0; kept ones are >= tiny)
            p = p * (v_scale / top)[None, :]
            acc = acc * alpha[:, None] + top * tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _ragged_split_kernel(
        Q, K, V, KS, VS, CU, END, SRC, O, LSE,
        scaling,
        stride_qb, stride_qh, stride_qm,
        stride_ob, stride_oh, stride_os, stride_om,
        stride_lb, stride_lh, stride_ls,
        num_heads, rows, num_splits,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr, SCALED: tl.constexpr, F16_DOTS: tl.constexpr,
    ):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        m_block = tl.program_id(2)
        b = bh // num_heads
        h = bh % num_heads
        seg = tl.load(SRC + b) * num_heads + h
        seg_start = tl.load(CU + seg)
        seg_end = tl.load(END + seg)  # CU + 1 for a packed store; before the segment's reserved room otherwise
        # Each segment is cut into num_splits equal slices (whole key blocks) from its own length, read on the
        # device: the grid depends on no segment length, so one compiled graph serves every document.
        split_len = tl.cdiv(tl.cdiv(seg_end - seg_start, num_splits), BLOCK_N) * BLOCK_N
        lo = seg_start + split * split_len
        hi = tl.minimum(seg_end, lo + split_len)

        PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=_dim_mask(offs_m[:, None] < rows, offs_d, HEAD_DIM, PAD_D), other=0.0)

        if SCALED and F16_DOTS:  # fp8 pairs, 16-bit queries: the products in float16 (see the module docstring)
            q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in tl.range(lo, hi, BLOCK_N):
            n_idx = start + offs_n
            valid = n_idx < hi
            kv_mask = _dim_mask(valid[:, None], offs_d, HEAD_DIM, PAD_D)
            k = tl.load(K + n_idx[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + n_idx[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
            if SCALED:  # an fp8 store: convert in registers, scale logits and probabilities
                k_scale = tl.load(KS + n_idx, mask=valid, other=0.0)
                v_scale = tl.load(VS + n_idx, mask=valid, other=0.0)
                m_i, l_i, acc = _online_softmax_block(q, k.to(q.dtype), v.to(q.dtype), valid[None, :], scaling,
                                                      m_i, l_i, acc, IEEE, k_scale, v_scale, SCALED=True)
            else:
                m_i, l_i, acc = _online_softmax_block(q, k, v, valid[None, :], scaling, m_i, l_i, acc, IEEE)

        has_keys = l_i > 0
        out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        row_mask = offs_m < rows
        o_ptr = O + b * stride_ob + h * stride_oh + split * stride_os
        tl.store(o_ptr + offs_m[:, None] * stride_om + offs_d[None, :], out,
                 mask=_dim_mask(row_mask[:, None], offs_d, HEAD_DIM, PAD_D))
        tl.store(LSE + b * stride_lb + h * stride_lh + split * stride_ls + offs_m, lse, mask=row_mask)


    @triton.jit
    def _tail_merge_kernel(
        Q, TK, TV, VALID, END, PO, PL, OUT,
        scaling,
        stride_qb, stride_qh, stride_qm,
        stride_tb, stride_th, stride_tn,
        stride_vb,
        stride_pb, stride_ph, stride_ps, stride_pm,
        stride_lb, stride_lh, stride_ls,
        stride_ob, stride_oq, stride_oh,
        num_heads, rows, q_len, group, tail_len, num_splits, share,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_VALID: tl.constexpr, HAS_END: tl.constexpr, IEEE: tl.constexpr,
    ):
        bh = tl.program_id(0)
        m_block = tl.program_id(1)
        if HAS_END:  # a static tail: only the first END slots are written (read on the device, never on the host)
            tail_len = tl.load(END).to(tl.int32)
        b = bh // num_heads
        h = bh % num_heads
        PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        row_ok = offs_m < rows
        row_mask = _dim_mask(row_ok[:, None], offs_d, HEAD_DIM, PAD_D)
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=row_mask, other=0.0)
        pos = tail_len - q_len + offs_m % q_len  # each row's own position in the tail
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # 1. the dense tail, causal, with padding; a query always sees itself, so m_i is finite after the loop
        for start in range(0, tail_len, BLOCK_N):
            n_idx = start + offs_n
            in_tail = n_idx < tail_len
            kv_mask = _dim_mask(in_tail[:, None], offs_d, HEAD_DIM, PAD_D)
            k = tl.load(TK + b * stride_tb + h * stride_th + n_idx[:, None] * stride_tn + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            v = tl.load(TV + b * stride_tb + h * stride_th + n_idx[:, None] * stride_tn + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            allowed = (n_idx[None, :] <= pos[:, None]) & in_tail[None, :]
            if HAS_VALID:
                valid = tl.load(VALID + b * stride_vb + n_idx, mask=in_tail, other=0) != 0
                allowed = (allowed & valid[None, :]) | (n_idx[None, :] == pos[:, None])
            m_i, l_i, acc = _online_softmax_block(q, k, v, allowed, scaling, m_i, l_i, acc, IEEE)
        # 2. the context splits (each a normalised output with its log-sum-exp). First the overall maximum, so that
        # the accumulation below has no loop-carried rescaling and its loads can be pipelined. Shared contexts
        # (share > 1): batch row b's partials are rows (b % share) * rows + m of context row b // share.
        part_b = b // share
        part_m = (b % share) * rows + offs_m
        lse_ptr = PL + part_b * stride_lb + h * stride_lh + part_m
        m_all = m_i
        for split in range(0, num_splits):
            m_all = tl.maximum(m_all, tl.load(lse_ptr + split * stride_ls, mask=row_ok, other=float("-inf")))
        scale = tl.exp(m_i - m_all)
        acc = acc * scale[:, None]
        l_i = l_i * scale
        o_ptr = PO + part_b * stride_pb + h * stride_ph + part_m[:, None] * stride_pm + offs_d[None, :]
        for split in tl.range(0, num_splits, num_stages=3):
            weight = tl.exp(tl.load(lse_ptr + split * stride_ls, mask=row_ok, other=float("-inf")) - m_all)
            acc += tl.load(o_ptr + split * stride_ps, mask=row_mask, other=0.0) * weight[:, None]
            l_i += weight
        out = acc / l_i[:, None]
        # row m = j * q_len + i is query head h * group + j at position i: write [B, q, Hq, D] directly
        q_idx = offs_m % q_len
        head = h * group + offs_m // q_len
        tl.store(OUT + b * stride_ob + q_idx[:, None] * stride_oq + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(OUT.dtype.element_ty), mask=row_mask)


def choose_splits(programs: int, max_seqlen: int, num_sms: int, block_n: int, factor: int = 2) -> int:
    """Enough splits for ``factor`` programs per SM over (``programs`` x splits), none shorter than one key block.

    ``programs``: the grid's other programs, rows x KV heads x query blocks. (Counting the query blocks matters for
    shared contexts: 64 rows x 4 query heads are 4 blocks of 64 per KV head, each a program of its own, so a split
    count sized for one block would cut the keys four times finer and write four times the partial results that the
    merge then reads back.)"""
    wanted = max(1, (factor * num_sms + programs - 1) // programs)
    return max(1, min(wanted, (max_seqlen + block_n - 1) // block_n))


_DEVICE_LIMITS: dict[int, tuple[int, int]] = {}


def _device_limits(device: torch.device) -> tuple[int, int]:
    """``(SMs, bytes of shared memory a program may use)`` of ``device``; Triton's interpreter (tests on the CPU):
    4 SMs and no shared-memory limit."""
    if device.type != "cuda":
        return 4, 1 << 30
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_LIMITS:
        properties = torch.cuda.get_device_properties(index)  # (ROCm builds lack the opt-in limit: 48 KB then)
        _DEVICE_LIMITS[index] = (properties.multi_processor_count,
                                 getattr(properties, "shared_memory_per_block_optin", 48 * 1024))
    return _DEVICE_LIMITS[index]


def ragged_context_partials(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    src_rows: torch.Tensor,
    max_seqlen: int,
    scaling: float,
    num_splits: int | None = None,
    block_m: int = 16,
    block_n: int = 128,
    num_warps: int = 4,
    num_stages: int = 2,
    split_factor: int = 2,
    poison: bool = False,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
    seg_ends: torch.Tensor | None = None,
    fp8_dots: torch.dtype = torch.float16,
    maxnreg: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-split attention over the compressed context (not yet merged).

    Args:
        query: ``[B, H, M, D]`` (M = GQA group x query positions); last dim contiguous.
        keys: ``[N, D]`` contiguous, bf16/fp16/fp32, or float8 e4m3 with ``key_scales``.
        values: ``[N, D]``, like ``keys``.
        key_scales: None, or ``[N]`` float32 for fp8 keys (key ``n`` is ``keys[n] * key_scales[n]``).
        value_scales: None, or ``[N]`` float32 for fp8 values.
        cu_seqlens: ``[S + 1]`` int32 on the device: segment ``s`` starts at ``cu_seqlens[s]``.
        seg_ends: None (segment ``s`` ends at ``cu_seqlens[s + 1]``), or ``[S]`` int32 on the device, where each
            segment's pairs end (a store with reserved room, `CompressedContext.append`).
        src_rows: ``[B]`` int32 on the device.
        max_seqlen: a bound on the longest segment (host int; caps the number of splits without a device sync).
        num_splits: splits per segment, each segment cut into that many equal slices of its own length; default:
            enough for ``split_factor`` programs per SM. (Two: with the merge counted, an H100 sweep of one layer
            found 33 splits faster than 66 for one row at 32K and 128K, and 8 faster than 17 for 64 shared rows;
            docs/results/h100-depth-2/splits.md. The split kernel alone is fastest at about 4 programs per SM.)
        poison: fill the buffers with NaN first (tests: every element must be written).
        fp8_dots: the type the products over fp8 pairs run in for 16-bit queries: ``torch.float16`` (default: one
            conversion instruction per two values, see the module docstring), or ``torch.bfloat16``: the query's own
            type (the earlier kernel's way, kept for comparisons; a scalar conversion per element for bf16 queries).
        maxnreg: None, or a cap on the registers per thread (more programs per SM, perhaps with spills; for
            launch sweeps: the fp8 kernel takes 200 registers, 2 programs of 4 warps per SM, and 168 would fit 3).

    Returns:
        ``(out [B, H, splits, M, D] float32, lse [B, H, splits, M] float32)``: normalised per-split outputs and
        their log-sum-exps (an empty split has out 0, lse -inf).
    """
    batch, num_heads, rows, head_dim = query.shape
    if triton is None:
        raise RuntimeError("Triton is not installed: pip install triton (or use the reference backend)")
    if fp8_dots not in (torch.float16, torch.bfloat16):
        raise ValueError(f"fp8_dots must be torch.float16 or torch.bfloat16, not {fp8_dots}")
    block_d = head_dim_block(head_dim)
    # At most 64 KB of K+V tile per pipeline stage, so that two stages fit in shared memory with room to spare (the
    # tiles are BLOCK_D wide: padded lanes take shared memory too; this also keeps block_n a power of two).
    block_n = min(block_n, 32768 // (block_d * max(keys.element_size(), query.element_size())))  # fp8 tiles widen
    if num_splits is None:
        num_splits = choose_splits(batch * num_heads * triton.cdiv(rows, block_m), max_seqlen,
                                   _device_limits(query.device)[0], block_n, split_factor)
    num_splits = max(1, min(num_splits, -(-max(max_seqlen, 1) // block_n)))  # no split shorter than a key block
    fill = torch.full if poison else (lambda shape, _, **kw: torch.empty(shape, **kw))
    out = fill((batch, num_heads, num_splits, rows, head_dim), float("nan"), dtype=torch.float32, device=query.device)
    lse = fill((batch, num_heads, num_splits, rows), float("nan"), dtype=torch.float32, device=query.device)
    grid = (batch * num_heads, num_splits, triton.cdiv(rows, block_m))
    scaled = key_scales is not None
    _ragged_split_kernel[grid](
        query, keys, values, key_scales if scaled else keys, value_scales if scaled else values,  # dummies unscaled
        cu_seqlens, cu_seqlens[1:] if seg_ends is None else seg_ends, src_rows, out, lse,
        scaling,
        query.stride(0), query.stride(1), query.stride(2),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        num_heads, rows, num_splits,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=query.dtype == torch.float32,
        SCALED=scaled, F16_DOTS=scaled and query.dtype != torch.float32 and fp8_dots == torch.float16,
        num_warps=num_warps if block_d <= 128 and block_m <= 64 else max(num_warps, 8),
        num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    return out, lse


def ragged_context_attention(query, keys, values, cu_seqlens, src_rows, max_seqlen, scaling, **kwargs):
    """Triton split-K attention over the compressed context, merged over splits.

    Same arguments as `ragged_context_partials`; returns ``(out [B, H, M, D] float32, lse [B, H, M] float32)``,
    as `ragged_context_attention_reference`.
    """
    return merge_splits(*ragged_context_partials(query, keys, values, cu_seqlens, src_rows, max_seqlen, scaling,
                                                 **kwargs))


def ragged_attention_with_tail(
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
    **kwargs,
) -> torch.Tensor:
    """Full decode/question attention: compressed context (split-K) + causal dense tail, merged in one kernel.

    With ``share = R > 1`` (rows ``c * R .. c * R + R - 1`` all read compressed row ``src_rows[c * R]``, as
    `shared_run_length` finds), the context is read once per (compressed row, KV head) for its R batch rows: their
    queries are stacked into one ``[R * M]`` matrix per KV head for the split kernel (a shared-prefix, or cascade,
    attention), and each row's tail kernel merges its own slice of the partial results. A step then reads the
    context's keys once, not R times.

    Args:
        query: ``[B, H, M, D]`` with ``M = g * q_len``, row ``j * q_len + i`` = query head ``h * g + j``, position i.
        tail_keys: ``[B, H, t, D]`` (the last ``q_len`` are the queries' own tokens), last dim contiguous.
        tail_values: ``[B, H, t, D]``, like ``tail_keys``.
        tail_valid: ``[B, t]`` bool padding mask or None.
        tail_end: None, or a 0-dim integer device tensor: only the first ``tail_end`` tail slots are written (a
            static tail), and the queries are the last ``q_len`` of those. Read by the kernel, not by the host.
        share: R, batch rows per shared context row (B must be a multiple of it); 1 reads the context per row.
        context_block_m: query rows per program of the context's split kernel (default: ``block_m``, or
            `shared_launch`'s choice for the stacked rows when ``share > 1``).

    Returns:
        ``[B, q_len, H * g, D]`` in the query dtype (the layout transformers expects from an attention function).
    """
    batch, num_heads, rows, head_dim = query.shape
    group = rows // q_len
    out_part, lse_part = context_partials(query, keys, values, cu_seqlens, src_rows, max_seqlen, scaling, share,
                                          block_m, context_block_m, **kwargs)
    out = torch.empty(batch, q_len, num_heads * group, head_dim, dtype=query.dtype, device=query.device)
    valid = tail_valid.to(torch.int8).contiguous() if tail_valid is not None else out_part  # dummy when absent
    tail_len = tail_keys.shape[2]
    grid = (batch * num_heads, triton.cdiv(rows, block_m))
    end = tail_end if tail_end is not None else out_part  # dummy pointer when absent
    _tail_merge_kernel[grid](
        query, tail_keys, tail_values, valid, end, out_part, lse_part, out,
        scaling,
        query.stride(0), query.stride(1), query.stride(2),
        tail_keys.stride(0), tail_keys.stride(1), tail_keys.stride(2),
        valid.stride(0) if tail_valid is not None else 0,
        out_part.stride(0), out_part.stride(1), out_part.stride(2), out_part.stride(3),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        num_heads, rows, q_len, group, tail_len, out_part.shape[2], share,
        HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim), BLOCK_M=block_m, BLOCK_N=32,
        HAS_VALID=tail_valid is not None, HAS_END=tail_end is not None,
        IEEE=query.dtype == torch.float32, num_warps=4,
    )
    return out


def context_partials(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    src_rows: torch.Tensor,
    max_seqlen: int,
    scaling: float,
    share: int,
    block_m: int,
    context_block_m: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ragged_context_partials` for ``[B, H, M, D]`` queries; with ``share = R > 1`` the R rows of each shared
    context are stacked into one ``[R * M]`` query matrix per KV head (the context read once for them).

    ``context_block_m``: query rows per program; default ``block_m`` for rows of their own, `shared_launch`'s
    choice (with its key block, stages, warps and splits, unless ``kwargs`` name them) for stacked rows.

    Returns:
        ``(out [B / R, H, splits, R * M, D], lse [B / R, H, splits, R * M])``: batch row ``b``'s query row ``m`` is
        row ``(b % R) * M + m`` of context row ``b // R``.
    """
    batch, num_heads, rows, head_dim = query.shape
    if share == 1:
        return ragged_context_partials(query, keys, values, cu_seqlens, src_rows, max_seqlen, scaling,
                                       block_m=context_block_m or block_m, **kwargs)
    if batch % share:
        raise ValueError(f"share={share} does not divide the batch of {batch} rows")
    contexts = batch // share
    stacked = query.reshape(contexts, share, num_heads, rows, head_dim).transpose(1, 2)
    stacked = stacked.reshape(contexts, num_heads, share * rows, head_dim)
    launch = ({"block_m": context_block_m} if context_block_m else
              shared_launch(share * rows, head_dim, query.dtype, keys.dtype, query.device))
    launch.update(kwargs)
    return ragged_context_partials(stacked, keys, values, cu_seqlens, src_rows[::share].contiguous(), max_seqlen,
                                   scaling, **launch)


def shared_launch(stacked_rows: int, head_dim: int, query_dtype: torch.dtype, kv_dtype: torch.dtype,
                  device: torch.device) -> dict:
    """Launch configuration of the split kernel over a shared context's ``stacked_rows`` query rows per KV head.

    By default all rows in one query block up to 64 (`shared_block_m`: each key block loaded once for every row),
    with the kernel's other defaults. Many stacked rows make the kernel compute-bound: for 16-bit queries and pairs,
    at least 64 stacked rows and head_dim up to 128, it takes key blocks of 64 through a three-stage pipeline, query
    blocks of 128 (8 warps) from 128 rows on, and one program per SM (fewer splits: the merge reads fewer partial
    results). H100 sweep, 64 rows x 4 query heads on a 32K context at 0.3 (docs/results/h100-depth-3): the whole
    attention of a layer 58.7 against 84.5 us, the split kernel alone 42.9 against 68.4. fp8 pairs keep the
    defaults (their best configuration, two stages and 128-key blocks with 8 splits, was 4 us faster than them), as
    do float32 and larger heads (whose three stages would not fit in shared memory).
    """
    default = {"block_m": shared_block_m(stacked_rows)}
    sixteen_bit = (torch.float16, torch.bfloat16)
    if stacked_rows < 64 or head_dim > 128 or query_dtype not in sixteen_bit or kv_dtype not in sixteen_bit:
        return default
    block_m, block_d = (128 if stacked_rows >= 128 else 64), head_dim_block(head_dim)
    tiles = 3 * (2 * 64 * block_d * 2) + block_m * block_d * 2  # three stages of key + value tiles, the queries
    if tiles > _device_limits(device)[1]:
        return default
    return {"block_m": block_m, "block_n": 64, "num_stages": 3, "num_warps": 8 if block_m > 64 else 4,
            "split_factor": 1}


def shared_block_m(rows: int) -> int:
    """Query rows per program of a shared context's split kernel: all of them up to 64 (each key block is then loaded
    once for every row), in blocks of 64 beyond (the blocks of one split read the same keys, mostly from L2)."""
    return min(64, max(16, 1 << (rows - 1).bit_length()))


def merge_splits(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp merge over dim 2: ``out [B, H, S, M, D]``, ``lse [B, H, S, M]`` -> ``[B, H, M, D]``, ``[B, H, M]``."""
    total = torch.logsumexp(lse, dim=2)
    weights = torch.exp(lse - total.unsqueeze(2)).nan_to_num_(0.0)  # all -inf (empty segment): weight 0
    return (out * weights.unsqueeze(-1)).sum(dim=2), total

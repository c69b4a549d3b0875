"""Plain-PyTorch attention backend: the reference every faster backend is tested against.

It runs on any device. Dense attention goes through `torch.nn.functional.scaled_dot_product_attention` (so a
16K-token prefill chunk never materialises its score matrix); the ragged and scoring paths use explicit math,
because they need log-sum-exps and restricted softmaxes that SDPA does not return.

Shapes: B batch, Hq query heads, H KV heads, g = Hq // H (GQA group), q queries, k keys, D head_dim.
Query head ``h * g + j`` reads KV head ``h`` (the order of transformers' ``repeat_kv``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ..views import CompressedScoringKV, RaggedKV, ScoringKV


def attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, allowed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp, for merging partial results.

    Args:
        query: ``[..., q, D]``.
        key: ``[..., k, D]``, broadcastable against the query's leading dims.
        value: ``[..., k, D]``, like ``key``.
        scaling: multiplier of ``query @ key^T``.
        allowed: bool ``[..., q, k]`` (broadcastable), True where a query may attend.

    Returns:
        ``(out [..., q, D] in float32, lse [..., q] float32)``; a row with nothing allowed has out 0 and lse -inf.
    """
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.unsqueeze(-1)).nan_to_num_(0.0)  # rows with lse = -inf give NaN: they have no keys
    return torch.matmul(probs, value.float()), lse


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Combine two attention results over disjoint key sets into the result over their union.

    ``out_*``: ``[..., q, D]``, ``lse_*``: ``[..., q]``. At least one of the two must have attended to a key.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse).unsqueeze(-1)
    weight_b = torch.exp(lse_b - lse).unsqueeze(-1)
    return out_a * weight_a + out_b * weight_b


def causal_allowed(
    q_len: int,
    k_len: int,
    device: torch.device,
    key_valid: torch.Tensor | None = None,
    sliding_window: int | None = None,
    causal: bool = True,
    end: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool mask ``[B or 1, 1, q, k]`` for queries that are the LAST ``q_len`` of the ``k_len`` keys.

    ``key_valid``: ``[B, k]`` bool (False = padding). Sliding windows follow transformers (a query at position p sees
    keys at positions ``> p - sliding_window``), with positions counted over real tokens only when there is padding,
    as if each row were alone. A query that may see no key at all (a padding query) is allowed its
    own position, so that softmaxes stay finite (padding outputs are never used). ``end``: a 0-dim device tensor for
    a static tail: the queries are the last ``q_len`` of the first ``end`` keys, and later keys are not written yet
    (computed on the device, no host sync).
    """
    last = k_len if end is None else end
    q_pos = (torch.arange(q_len, device=device) + (last - q_len)).unsqueeze(-1)
    k_pos = torch.arange(k_len, device=device).unsqueeze(0)
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        allowed &= k_pos <= q_pos
    elif end is not None:
        allowed &= k_pos < end
    if sliding_window is not None and key_valid is None:
        allowed &= k_pos > q_pos - sliding_window
    allowed = allowed[None, None]
    if key_valid is not None:
        key_valid = key_valid.to(device)
        allowed = allowed & key_valid[:, None, None, :]
        if sliding_window is not None:
            # The window counts real tokens only: padding between a context and its question never displaces one.
            rank = key_valid.long().cumsum(-1)  # [B, k]: real tokens up to and including each slot
            q_rank = rank[:, q_pos.squeeze(-1)]  # [B, q]
            allowed = allowed & (rank[:, None, None, :] > q_rank[:, None, :, None] - sliding_window)
        if end is not None:
            allowed |= k_pos == q_pos  # the own slot (only padding queries lacked it)
        else:
            # In place on the diagonal: a long padded prefill chunk's mask is large, so avoid another full-size
            # temporary.
            allowed.diagonal(offset=k_len - q_len, dim1=-2, dim2=-1).logical_or_(~allowed.any(dim=-1))
    return allowed


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor | None = None,
    sliding_window: int | None = None,
    causal: bool = True,
    end: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the last ``q`` positions over ``k`` contiguous cached+new positions.

    Args:
        query: ``[B, Hq, q, D]``; key, value: ``[B, H, k, D]`` with ``k >= q``.
        key_valid: ``[B, k]`` bool padding mask (True = real token) or None.
        sliding_window: transformers' window size for sliding layers, None for full layers.
        end: None, or (a static sliding layer's fixed buffers) a 0-dim device tensor: only the first ``end`` slots
            are written and the queries are the last of them.

    Returns:
        ``[B, q, Hq, D]`` in the query dtype.
    """
    q_len, k_len = query.shape[-2], key.shape[-2]
    # (compiled code must not read the mask on the host: there, a given mask counts as padded)
    padded = key_valid is not None and (end is not None or torch.compiler.is_compiling() or not bool(key_valid.all()))
    windowed = sliding_window is not None and (end is not None or k_len > sliding_window)
    plain = end is None and not padded and not windowed and (not causal or q_len == 1 or q_len == k_len)
    if end is not None:
        allowed = causal_allowed(q_len, k_len, query.device, key_valid, sliding_window, causal, end=end)
    elif plain:
        allowed = None  # SDPA's is_causal aligns the diagonal top-left: right only when q == k
    elif causal and not padded and not windowed:
        allowed = causal_lower_right(q_len, k_len)  # a later prefill chunk: no [q, k] mask is built on GPU
    else:
        allowed = causal_allowed(q_len, k_len, query.device, key_valid if padded else None,
                                 sliding_window if windowed else None, causal)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=allowed,
        is_causal=plain and causal and q_len > 1,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2)


# Above this many queries per row (a prefill chunk arriving after heads were dropped, a very long question), ragged
# attention runs segment by segment through SDPA instead of materialising [group, q, kept] logits per segment.
LARGE_QUERY = 512


def segment_attention(
    query: torch.Tensor, kv: RaggedKV, scaling: float, tail_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """`ragged_attention` for many queries: per (row, KV head), SDPA over ``[kept context | tail]``.

    The tail's causal structure is SDPA's lower-right bias, so no ``[q, k]`` mask exists unless the tail is padded.
    Copies each segment's kept keys once per call (a prefill chunk is long, so that is small next to the attention).

    Shapes as in `ragged_attention`; returns ``[B, q, Hq, D]`` in the query dtype.
    """
    batch, num_q_heads, q_len, head_dim = query.shape
    ctx, offsets, ends = kv.context, kv.context.offsets, kv.context.host_ends
    group = num_q_heads // ctx.num_heads
    out = query.new_empty(batch, q_len, num_q_heads, head_dim)
    for b, src in enumerate(kv.src_rows):
        for h in range(ctx.num_heads):
            start, end = offsets[src * ctx.num_heads + h], ends[src * ctx.num_heads + h]
            kept_keys, kept_values = ctx.read(slice(start, end), kv.tail_keys.dtype)
            keys = torch.cat([kept_keys, kv.tail_keys[b, h]])[None, None]  # [1, 1, kept + t, D]
            values = torch.cat([kept_values, kv.tail_values[b, h]])[None, None]
            valid = None
            if tail_valid is not None:
                valid = torch.cat([tail_valid.new_ones(end - start), tail_valid[b]])[None]
            heads = slice(h * group, (h + 1) * group)
            out[b, :, heads] = dense_attention(query[b : b + 1, heads], keys, values, scaling, valid)[0]
    return out


def ragged_attention(
    query: torch.Tensor, kv: RaggedKV, scaling: float, tail_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention over a compressed context (ragged per KV head) followed by a dense, causal tail.

    More than `LARGE_QUERY` queries go to `segment_attention`; otherwise explicit float32 math (the reference).

    Args:
        query: ``[B, Hq, q, D]``, the last ``q`` tokens of the tail (of its written part, for a static tail).
        kv: the layer's view; ``kv.tail_keys`` is ``[B, H, t, D]`` with ``t >= q``.
        tail_valid: ``[B, t]`` bool padding mask of the tail, or None.

    Returns:
        ``[B, q, Hq, D]`` in the query dtype.
    """
    batch, num_q_heads, q_len, head_dim = query.shape
    if q_len > LARGE_QUERY:
        kv, tail_valid = kv.written(tail_valid)
        return segment_attention(query, kv, scaling, tail_valid)
    num_heads = kv.context.num_heads
    group = num_q_heads // num_heads
    tail_len = kv.tail_keys.shape[-2]
    grouped = query.view(batch, num_heads, group, q_len, head_dim)

    allowed = causal_allowed(q_len, tail_len, query.device, tail_valid, end=kv.tail_end).unsqueeze(1)  # [B|1,1,1,q,t]
    out, lse = attend(grouped, kv.tail_keys.unsqueeze(2), kv.tail_values.unsqueeze(2), scaling, allowed)
    if kv.tail_end is not None:
        ctx_out, ctx_lse = _static_context_attention(grouped, kv, scaling)
        out = merge_attention(ctx_out, ctx_lse, out, lse)
        return out.to(query.dtype).permute(0, 3, 1, 2, 4).reshape(batch, q_len, num_q_heads, head_dim)

    # Rows reading the same compressed row attend to its segments together (one matmul per segment for all of them).
    ctx, offsets, ends = kv.context, kv.context.offsets, kv.context.host_ends
    readers: dict[int, list[int]] = {}
    for b, src in enumerate(kv.src_rows):
        readers.setdefault(src, []).append(b)
    for src, rows in readers.items():
        index = torch.tensor(rows, device=query.device)
        for h in range(num_heads):
            start, end = offsets[src * num_heads + h], ends[src * num_heads + h]
            if end == start:
                continue  # this head kept no context pair
            seg_out, seg_lse = attend(grouped[index, h], *ctx.read(slice(start, end), torch.float32), scaling)
            out[index, h] = merge_attention(seg_out, seg_lse, out[index, h], lse[index, h])
    return out.to(query.dtype).permute(0, 3, 1, 2, 4).reshape(batch, q_len, num_q_heads, head_dim)


def _static_context_attention(grouped: torch.Tensor, kv: RaggedKV, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Context part of a static view without host offsets (so one compiled graph serves every document).

    Each (row, KV head)'s segment is gathered into ``ctx.max_seqlen`` slots (a bucketed bound, see
    `KVzipLayer.make_static`) using the device-side ``cu_seqlens`` and segment ends; slots past a segment's end are
    masked.

    Args:
        grouped: ``[B, H, g, q, D]`` queries.

    Returns:
        ``(out [B, H, g, q, D] float32, lse [B, H, g, q])``; an empty segment gives out 0 and lse -inf.
    """
    ctx = kv.context
    batch, num_heads = grouped.shape[:2]
    if ctx.keys.shape[0] == 0:
        return torch.zeros_like(grouped, dtype=torch.float32), grouped.new_full(grouped.shape[:-1], float("-inf"),
                                                                                  dtype=torch.float32)
    segment = kv.src_index.long()[:, None] * num_heads + torch.arange(num_heads, device=grouped.device)  # [B, H]
    start = ctx.cu_seqlens.long()[segment]
    length = ctx.end_offsets.long()[segment] - start
    slots = torch.arange(max(ctx.max_seqlen, 1), device=grouped.device)
    valid = slots < length[..., None]  # [B, H, L]
    index = (start[..., None] + slots).clamp(max=ctx.keys.shape[0] - 1)
    keys, values = ctx.read(index, torch.float32)  # [B, H, L, D]
    return attend(grouped, keys.unsqueeze(2), values.unsqueeze(2), scaling, valid[:, :, None, None, :])


def restricted_max_scores(
    query: torch.Tensor,
    prefix_keys: torch.Tensor,
    chunk_keys: torch.Tensor,
    new_keys: torch.Tensor,
    scaling: float,
    block_elements: int = 1 << 25,
    chunk_kept: torch.Tensor | None = None,
) -> torch.Tensor:
    """KVzip importance of each chunk key: max over queries and the GQA group of the restricted softmax.

    The softmax of each query runs over ``[prefix_keys | chunk_keys | new_keys (causal)]`` only; the new tokens are
    the queries' own keys, query ``i`` seeing new keys ``0..i``. Computed in float32, a block of queries at a time so
    that at most ``block_elements`` logits exist at once (``[H, g, block, P + C + n]``, independent of the cache).

    Args:
        query: ``[H * g, n, D]`` (query heads of one row, post-RoPE).
        prefix_keys: ``[H, P, D]``; chunk_keys: ``[H, C, D]``; new_keys: ``[H, n, D]``.
        chunk_kept: None, or ``[H, C]`` bool: only these chunk keys exist (a compressed layer scored again); the
            others are left out of the softmax and score 0.

    Returns:
        ``[H, C]`` float32.
    """
    best = torch.zeros(chunk_keys.shape[:2], dtype=torch.float32, device=query.device)
    for _, _, probs in _restricted_probabilities(query, prefix_keys, chunk_keys, new_keys, scaling, block_elements,
                                                 chunk_kept):
        best = torch.maximum(best, probs.amax(dim=(1, 2)))
    return best


def _restricted_probabilities(query, prefix_keys, chunk_keys, new_keys, scaling, block_elements, chunk_kept=None):
    """Yield ``(lo, hi, probs [H, g, hi - lo, C])``: the restricted softmax of queries ``lo:hi`` on the chunk keys,
    a block at a time (float32; shapes as in `restricted_max_scores`; ``chunk_kept`` [H, C]: the chunk keys that
    exist, the others masked out)."""
    num_heads, chunk_len, head_dim = chunk_keys.shape
    num_q_heads, n_new, _ = query.shape
    grouped = query.float().view(num_heads, num_q_heads // num_heads, n_new, head_dim)
    keys = torch.cat([prefix_keys, chunk_keys, new_keys], dim=1).float().unsqueeze(1)  # [H, 1, P+C+n, D]
    chunk_lo = prefix_keys.shape[1]
    chunk_hi = chunk_lo + chunk_len
    new_pos = torch.arange(n_new, device=query.device)
    block = max(1, min(n_new, block_elements // (num_q_heads * keys.shape[2])))
    for lo in range(0, n_new, block):
        hi = min(lo + block, n_new)
        logits = torch.matmul(grouped[:, :, lo:hi], keys.transpose(-1, -2)).mul_(scaling)  # [H, g, b, P+C+n]
        future = new_pos[None, :] > torch.arange(lo, hi, device=query.device)[:, None]  # [b, n]
        logits[..., chunk_hi:].masked_fill_(future, float("-inf"))
        if chunk_kept is not None:
            logits[..., chunk_lo:chunk_hi].masked_fill_(~chunk_kept[:, None, None, :], float("-inf"))
        yield lo, hi, torch.softmax(logits, dim=-1)[..., chunk_lo:chunk_hi]


def output_value_norms(out_weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``||W_O^(j) v_i||``: how much each cached value writes into the residual stream through each query head.

    ``W_O^(j) = out_weight[:, j * D:(j + 1) * D]`` is query head ``j``'s slice of the attention module's output
    projection; query head ``j = h * g + r`` reads KV head ``h``. Computed in float32 through the ``[Hq, D, D]``
    Gram matrices ``W_O^(j)T W_O^(j)`` (``||W v||^2 = v^T (W^T W) v``), so no ``[Hq, C, hidden]`` tensor exists.

    Args:
        out_weight: ``[hidden, Hq * D]`` (``module.o_proj.weight``).
        values: ``[H, C, D]`` cached values of the scored chunk.

    Returns:
        ``[H, g, C]`` float32.
    """
    num_heads, chunk_len, head_dim = values.shape
    hidden, width = out_weight.shape
    if width % head_dim or (width // head_dim) % num_heads:
        raise ValueError(
            f"o_proj.weight has shape {tuple(out_weight.shape)}: its input width is not query heads x head_dim "
            f"(head_dim {head_dim}, {num_heads} KV heads), so KVzip+ cannot split it per query head"
        )
    group = width // head_dim // num_heads
    per_head = out_weight.to(values.device, torch.float32).view(hidden, num_heads, group, head_dim)
    gram = torch.einsum("khgd,khge->hgde", per_head, per_head)  # [H, g, D, D]
    v = values.float().unsqueeze(1)  # [H, 1, C, D]
    squared = (torch.matmul(v, gram) * v).sum(-1)  # [H, g, C]
    return squared.clamp_(min=0.0).sqrt_()


def restricted_max_scores_plus(
    query: torch.Tensor,
    prefix_keys: torch.Tensor,
    chunk_keys: torch.Tensor,
    new_keys: torch.Tensor,
    scaling: float,
    value_norms: torch.Tensor,
    query_norms: torch.Tensor,
    block_elements: int = 1 << 25,
    chunk_kept: torch.Tensor | None = None,
) -> torch.Tensor:
    """KVzip+ importance of each chunk key: `restricted_max_scores` with the probabilities weighted.

    ``score+[h, i] = max over queries t and query heads j of group h of p[j, t, i] * value_norms[h, j, i] /
    query_norms[t]``, with ``p`` the softmax restricted to ``[prefix_keys | chunk_keys | new_keys (causal)]`` exactly
    as in `restricted_max_scores`. Float32, a block of queries at a time (at most ``block_elements`` logits).

    Args:
        query: ``[H * g, n, D]`` (query heads of one row, post-RoPE).
        prefix_keys: ``[H, P, D]``; chunk_keys: ``[H, C, D]``; new_keys: ``[H, n, D]``.
        value_norms: ``[H, g, C]`` ``||W_O^(j) v_i||`` (`output_value_norms`).
        query_norms: ``[n]`` ``||h_t||``, the norm of the hidden state entering the attention module.
        chunk_kept: as in `restricted_max_scores`.

    Returns:
        ``[H, C]`` float32.
    """
    weights = value_norms.float().unsqueeze(2)  # [H, g, 1, C]
    inverse_norms = query_norms.float().reciprocal()  # [n]
    best = torch.zeros(chunk_keys.shape[:2], dtype=torch.float32, device=query.device)
    for lo, hi, probs in _restricted_probabilities(query, prefix_keys, chunk_keys, new_keys, scaling, block_elements,
                                                   chunk_kept):
        weighted = probs * weights * inverse_norms[lo:hi, None]  # [H, g, b, C]
        best = torch.maximum(best, weighted.amax(dim=(1, 2)))
    return best


def scoring_attention(
    query: torch.Tensor,
    kv: ScoringKV | CompressedScoringKV,
    scaling: float,
    key_valid: torch.Tensor | None,
    dense=None,
    scores=None,
    out_weight: torch.Tensor | None = None,
    ragged=None,
) -> torch.Tensor:
    """One reconstruction pass through a full layer: the usual output, plus the chunk's scores into ``kv.scores_out``.

    A dense layer (`ScoringKV`): the output is ordinary attention over ``[cached row | new tokens (causal)]`` (SDPA,
    so the ``[q, T + n]`` matrix is never built). A compressed layer (`CompressedScoringKV`): attention over the
    row's kept pairs, then the new tokens (``ragged``). The scores come from `restricted_max_scores` (KVzip) or
    `restricted_max_scores_plus` (KVzip+, when ``kv.query_norms`` is set), whose key set is one chunk's worth
    (a compressed layer's: the chunk's kept pairs). ``kv.scores_out`` None: no score.

    Args:
        query: ``[1, Hq, n, D]`` post-RoPE queries of the reconstruction input.
        kv: the layer's scoring view.
        key_valid: ``[1, kv.width]`` bool padding mask over ``[cached row | new tokens]``, or None.
        dense: the dense-attention function (other backends pass their own); default: this module's
            `dense_attention`.
        scores: the KVzip score function of a dense layer's chunk (other backends pass their own); default: this
            module's `restricted_max_scores`, which KVzip+ passes and compressed layers always use.
        out_weight: ``[hidden, Hq * D]``, the module's ``o_proj.weight``; needed by KVzip+ passes only.
        ragged: the ragged-attention function for a compressed layer; default: this module's `ragged_attention`.

    Returns:
        ``[1, n, Hq, D]`` in the query dtype.
    """
    if isinstance(kv, CompressedScoringKV):
        new = kv.context.tail_keys.shape[-2]
        out = (ragged or ragged_attention)(query, kv.context, scaling, None if key_valid is None else key_valid[:, -new:])
        scores = restricted_max_scores  # the kernel has no mask for evicted chunk pairs
    else:
        out = (dense or dense_attention)(query, kv.keys, kv.values, scaling, key_valid)
        scores = scores or restricted_max_scores
    if kv.scores_out is None:
        return out
    inputs = kv.score_inputs()
    if not kv.is_plus:
        kept = {} if inputs.chunk_kept is None else {"chunk_kept": inputs.chunk_kept}
        kv.scores_out.copy_(scores(query[0], inputs.prefix_keys, inputs.chunk_keys, inputs.new_keys, scaling, **kept))
        return out
    if out_weight is None:
        raise ValueError("a KVzip+ scoring pass needs the attention module's o_proj.weight (out_weight)")
    value_norms = output_value_norms(out_weight, inputs.chunk_values)
    kv.scores_out.copy_(restricted_max_scores_plus(
        query[0], inputs.prefix_keys, inputs.chunk_keys, inputs.new_keys, scaling, value_norms, kv.query_norms,
        chunk_kept=inputs.chunk_kept,
    ))
    return out

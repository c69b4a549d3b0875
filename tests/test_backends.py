"""Reference backend vs naive float64 attention on random inputs of awkward shapes."""

import functools

import pytest
import torch

from kvzip_cache.backends import reference as ref
from kvzip_cache.storage import CompressedContext
from kvzip_cache.views import RaggedKV, ScoringKV


def naive(query, keys, values, allowed, scaling):
    """query [q, D], keys/values [k, D], allowed [q, k] -> [q, D] in float64."""
    logits = (query.double() @ keys.double().T) * scaling
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, -1) @ values.double()


def make_context(lengths, num_heads, head_dim, gen):
    """A CompressedContext with the given [rows][heads] segment lengths."""
    counts = torch.tensor([n for row in lengths for n in row])
    total = int(counts.sum())
    keys, values = torch.randn(total, head_dim, generator=gen), torch.randn(total, head_dim, generator=gen)
    return CompressedContext.from_counts(keys, values, torch.zeros(total, dtype=torch.int32), counts, num_heads)


def with_nan_room(ctx: CompressedContext) -> CompressedContext:
    """The same pairs in a store with reserved room (what eviction while decoding appends into), the free slots NaN:
    attention must read each segment only up to its end."""
    head_dim = ctx.keys.shape[-1]
    nothing = torch.zeros(ctx.num_rows, ctx.num_heads, 1, dtype=torch.bool)
    roomy = ctx.append(torch.zeros(ctx.num_rows, ctx.num_heads, 1, head_dim),
                       torch.zeros(ctx.num_rows, ctx.num_heads, 1, head_dim), nothing, 10_000, room=True)
    for end, next_start in zip(roomy.ends, roomy.offsets[1:]):
        roomy.keys[end:next_start] = float("nan")
        roomy.values[end:next_start] = float("nan")
    assert roomy.ends != roomy.offsets[1:]
    return roomy


@pytest.mark.parametrize("ragged", [ref.ragged_attention, ref.segment_attention])  # few / many queries
@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("room", [False, True])
def test_ragged_attention_matches_naive(q_len, group, ragged, room):
    gen = torch.Generator().manual_seed(q_len * 10 + group)
    num_heads, head_dim, tail = 3, 8, 7
    lengths = [[0, 1, 37], [129, 2, 0]]
    packed = ctx = make_context(lengths, num_heads, head_dim, gen)
    if room:
        ctx = with_nan_room(packed)
    src_rows = (1, 0, 0)  # row 0 reads compressed row 1; rows 1 and 2 share compressed row 0 (beams)
    batch = len(src_rows)
    tail_k = torch.randn(batch, num_heads, tail, head_dim, generator=gen)
    tail_v = torch.randn(batch, num_heads, tail, head_dim, generator=gen)
    tail_valid = torch.ones(batch, tail, dtype=torch.bool)
    tail_valid[2, :2] = False  # padding inside the tail of row 2
    query = torch.randn(batch, num_heads * group, q_len, head_dim, generator=gen)
    out = ragged(query, RaggedKV(ctx, src_rows, torch.tensor(src_rows), tail_k, tail_v, length=200), 0.3, tail_valid)
    assert out.shape == (batch, q_len, num_heads * group, head_dim)
    for b, src in enumerate(src_rows):
        for qh in range(num_heads * group):
            h = qh // group
            lo, hi = packed.offsets[src * num_heads + h], packed.offsets[src * num_heads + h + 1]
            keys = torch.cat([packed.keys[lo:hi], tail_k[b, h]])
            values = torch.cat([packed.values[lo:hi], tail_v[b, h]])
            causal = torch.arange(tail)[None, :] <= torch.arange(tail - q_len, tail)[:, None]
            allowed = torch.cat([torch.ones(q_len, hi - lo, dtype=torch.bool), causal & tail_valid[b]], 1)
            expected = naive(query[b, qh], keys, values, allowed, 0.3)
            torch.testing.assert_close(out[b, :, qh].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("q_len,k_len", [(1, 9), (5, 13), (11, 11)])
def test_dense_attention_matches_naive(window, q_len, k_len):
    gen = torch.Generator().manual_seed(q_len + k_len)
    query = torch.randn(2, 4, q_len, 8, generator=gen)
    keys, values = torch.randn(2, 2, k_len, 8, generator=gen), torch.randn(2, 2, k_len, 8, generator=gen)
    valid = torch.ones(2, k_len, dtype=torch.bool)
    valid[1, :3] = False  # left padding of row 1
    out = ref.dense_attention(query, keys, values, 0.25, valid, window)
    q_pos = torch.arange(k_len - q_len, k_len)[:, None]
    k_pos = torch.arange(k_len)[None, :]
    for b in range(2):
        allowed = (k_pos <= q_pos) & valid[b]
        if window is not None:
            allowed &= k_pos > q_pos - window
        rows = allowed.any(-1)  # padding queries see nothing: their output is unspecified
        for qh in range(4):
            expected = naive(query[b, qh], keys[b, qh // 2], values[b, qh // 2], allowed, 0.25)
            torch.testing.assert_close(out[b, rows, qh].double(), expected[rows], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("block_elements", [1 << 26, 2000])  # one block / many blocks of queries
def test_scoring_attention_matches_naive(block_elements):
    gen = torch.Generator().manual_seed(7)
    num_heads, group, head_dim, cached, n, chunk = 2, 3, 8, 40, 23, (17, 33)
    keys, values = torch.randn(1, num_heads, cached, head_dim, generator=gen), torch.randn(1, num_heads, cached, head_dim, generator=gen)
    new_k, new_v = torch.randn(1, num_heads, n, head_dim, generator=gen), torch.randn(1, num_heads, n, head_dim, generator=gen)
    query = torch.randn(1, num_heads * group, n, head_dim, generator=gen)
    valid = torch.ones(1, cached + n, dtype=torch.bool)
    valid[0, :4] = False  # left padding
    prefix = torch.arange(4, 9)
    scores = torch.full((num_heads, chunk[1] - chunk[0]), float("nan"))
    kv = ScoringKV(torch.cat([keys, new_k], 2), torch.cat([values, new_v], 2), cached, prefix, chunk, scores)
    scores_fn = functools.partial(ref.restricted_max_scores, block_elements=block_elements)
    out = ref.scoring_attention(query, kv, 0.4, valid, scores=scores_fn)
    all_k, all_v = torch.cat([keys, new_k], 2)[0], torch.cat([values, new_v], 2)[0]
    causal = torch.arange(cached + n)[None, :] <= torch.arange(cached, cached + n)[:, None]
    restricted = torch.cat([prefix, torch.arange(*chunk), torch.arange(cached, cached + n)])
    for h in range(num_heads):
        best = torch.zeros(chunk[1] - chunk[0], dtype=torch.float64)
        for j in range(group):
            qh = h * group + j
            expected = naive(query[0, qh], all_k[h], all_v[h], causal & valid[0], 0.4)
            torch.testing.assert_close(out[0, :, qh].double(), expected, atol=1e-5, rtol=1e-5)
            logits = (query[0, qh].double() @ all_k[h].double().T * 0.4).masked_fill(~causal, float("-inf"))
            probs = torch.softmax(logits[:, restricted], -1)[:, len(prefix) : len(prefix) + chunk[1] - chunk[0]]
            best = torch.maximum(best, probs.amax(0))
        torch.testing.assert_close(scores[h].double(), best, atol=1e-6, rtol=1e-5)


def test_merge_attention_of_two_halves_equals_whole():
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(4, 8, generator=gen), torch.randn(10, 8, generator=gen), torch.randn(10, 8, generator=gen)
    out_a, lse_a = ref.attend(q, k[:6], v[:6], 0.5)
    out_b, lse_b = ref.attend(q, k[6:], v[6:], 0.5)
    whole, _ = ref.attend(q, k, v, 0.5)
    torch.testing.assert_close(ref.merge_attention(out_a, lse_a, out_b, lse_b), whole)
    empty_out, empty_lse = ref.attend(q, k[:0], v[:0], 0.5)
    assert torch.isneginf(empty_lse).all()
    torch.testing.assert_close(ref.merge_attention(empty_out, empty_lse, out_b, lse_b), out_b)

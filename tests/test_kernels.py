"""Triton kernels vs their plain-PyTorch references on random inputs of awkward shapes.

On a GPU they run compiled (bf16, fp16, fp32) and are marked ``gpu`` (``pytest -m gpu``, scripts/gpu_check.sh);
without one, conftest turns on Triton's interpreter and they run on the CPU in float32, in the default run. A CUDA
machine without Triton fails every test here (the kernels are what the GPU path runs): never a silent skip.
Outputs are poisoned with NaN before each run, so an element the kernel forgot fails the test.

Every result is compared with float32 math on the same (rounded) inputs, within bounds per dtype: what the kernels'
own rounding can explain (bf16/fp16 probabilities before the value product, the output's rounding), measured by
emulating it on these shapes and taken with a margin of about 3. Each test also checks that a wrong answer of the
kind a kernel bug gives (a key dropped at a segment's end, one more tail slot masked, a softmax scale off by 2%)
falls outside those bounds, so they are shown to tell right from wrong.
"""

import dataclasses
import functools

import pytest
import torch

from kvzip_cache import kernels
from kvzip_cache.backends import reference

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu] if CUDA else []  # compiled kernels need the GPU; the interpreter runs anywhere
if not kernels.TRITON_AVAILABLE and not CUDA:
    pytest.skip("Triton is not installed (the CPU runs go through its interpreter)", allow_module_level=True)


@pytest.fixture(autouse=True)
def _triton_where_cuda_is():
    if not kernels.TRITON_AVAILABLE:
        pytest.fail("a CUDA device but no Triton: the kernels (what every GPU prefill, compress and decode runs) "
                    "cannot be tested; install triton (`pip install kvzip-cache[gpu]`)")


DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if DEVICE == "cuda" else [torch.float32]
# (atol, rtol) against float32 math on the same inputs. Attention outputs: bf16/fp16 probabilities meet the values
# in the low precision (emulated worst case on these shapes: bf16 atol 2.7e-3 with rtol 4e-3, fp16 3e-4). lse and
# KVzip scores: float32 throughout (exact products, float32 sums), so float32-level bounds for every dtype.
OUT_TOL = {torch.bfloat16: (8e-3, 1.6e-2), torch.float16: (1e-3, 4e-3), torch.float32: (2e-5, 2e-5)}
LSE_TOL = {torch.bfloat16: (2e-4, 2e-5), torch.float16: (2e-4, 2e-5), torch.float32: (2e-5, 2e-5)}
SCORE_TOL = {torch.bfloat16: (1e-4, 1e-3), torch.float16: (1e-4, 1e-3), torch.float32: (2e-5, 2e-5)}


def _close(got, expected, tol):
    atol, rtol = tol
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=rtol, equal_nan=False)


def _outside(wrong, expected, tol) -> bool:
    """True when ``wrong`` fails the comparison that ``expected`` passes: the bound tells them apart."""
    atol, rtol = tol
    wrong, expected = wrong.float(), expected.float()
    both_inf = torch.isinf(wrong) & torch.isinf(expected) & (wrong == expected)
    excess = (wrong - expected).abs() - (atol + rtol * expected.abs())
    return bool((excess.masked_fill(both_inf, 0.0) > 0).any())


def _float32(kv):
    """The same view with float32 keys and values (the references then run on the same rounded numbers)."""
    ctx = dataclasses.replace(kv.context, keys=kv.context.keys.float(), values=kv.context.values.float())
    return dataclasses.replace(kv, context=ctx, tail_keys=kv.tail_keys.float(), tail_values=kv.tail_values.float())


def _first_real_masked(valid):
    """The padding mask with each row's first real tail slot masked too (a kernel that loses one slot)."""
    wrong = valid.clone()
    first = valid.int().argmax(-1)
    wrong[torch.arange(len(valid), device=valid.device), first] = False
    return wrong
# Power-of-two head dims run on every shape. Other head dims (96: Phi-3-mini, 80) pad their tiles to the next power
# of two and mask the extra lanes: a few shapes each, so that the interpreter run stays short. 192 (tiles 256 wide,
# so smaller key blocks and 8 warps) only where the kernels are compiled.
WIDE_PADDED = [192] if DEVICE == "cuda" else []


def _flat_context(lengths, head_dim, dtype, gen):
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    keys = torch.randn(offsets[-1], head_dim, generator=gen).to(DEVICE, dtype)
    values = torch.randn(offsets[-1], head_dim, generator=gen).to(DEVICE, dtype)
    return keys, values, offsets


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(  # rows = GQA group x query positions: decode, questions, not a multiple of 16
    "head_dim,rows",
    [(d, rows) for d in (64, 128) for rows in (1, 4, 20, 33)] + [(96, 20), (80, 4)] + [(d, 20) for d in WIDE_PADDED],
)
def test_ragged_context_attention(dtype, head_dim, rows):
    gen = torch.Generator().manual_seed(rows * 1000 + head_dim)
    num_heads = 2
    lengths = [0, 1, 64, 65, 300, 7]  # empty heads, one key, block edges, very unequal heads: 3 rows x 2 heads
    keys, values, offsets = _flat_context(lengths, head_dim, dtype, gen)
    src_rows = (2, 0, 0, 1)  # beams share row 0
    query = torch.randn(len(src_rows), num_heads, rows, head_dim, generator=gen).to(DEVICE, dtype)
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    src = torch.tensor(src_rows, dtype=torch.int32, device=DEVICE)
    ref_out, ref_lse = kernels.ragged_context_attention_reference(query.float(), keys.float(), values.float(),
                                                                  tuple(offsets), src_rows, 0.3)
    for splits in (None, 1, 3):
        out, lse = kernels.ragged_context_attention(query, keys, values, cu, src, max(lengths), 0.3,
                                                    num_splits=splits, poison=True)
        assert not out.isnan().any() and not lse.isnan().any()
        _close(out, ref_out, OUT_TOL[dtype])
        _close(lse, ref_lse, LSE_TOL[dtype])
    assert torch.isneginf(lse[1, 0]).all() and (out[1, 0] == 0).all()  # row 1 reads compressed row 0: head 0 empty
    # the bounds catch a kernel that loses the last key of each segment (a block edge)
    kept = torch.ones(len(keys), dtype=torch.bool, device=DEVICE)
    short = [0]
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        if hi - lo > 1:
            kept[hi - 1] = False
        short.append(short[-1] + (hi - lo - 1 if hi - lo > 1 else hi - lo))
    wrong_out, wrong_lse = kernels.ragged_context_attention_reference(query.float(), keys[kept].float(),
                                                                      values[kept].float(), tuple(short), src_rows, 0.3)
    assert _outside(wrong_out, ref_out, OUT_TOL[dtype]) and _outside(wrong_lse, ref_lse, LSE_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_ragged_context_attention_reads_each_segment_only_up_to_its_end(dtype):
    """A store with reserved room (eviction while decoding appends into it, `CompressedContext.append`): each segment
    is followed by free slots, here NaN, which neither the kernel nor the reference may read; both equal the packed
    store's attention."""
    gen = torch.Generator().manual_seed(11)
    num_heads, head_dim, rows = 2, 64, 4
    lengths, room = [0, 1, 64, 65, 300, 7], [5, 0, 17, 64, 3, 200]
    keys, values, offsets = _flat_context(lengths, head_dim, dtype, gen)
    src_rows = (2, 0, 0, 1)
    query = torch.randn(len(src_rows), num_heads, rows, head_dim, generator=gen).to(DEVICE, dtype)
    packed_out, packed_lse = kernels.ragged_context_attention_reference(query.float(), keys.float(), values.float(),
                                                                        tuple(offsets), src_rows, 0.3)
    starts, ends, rows_of = [0], [], []
    for s, (n, r) in enumerate(zip(lengths, room)):
        ends.append(starts[-1] + n)
        rows_of += list(range(offsets[s], offsets[s + 1])) + [-1] * r
        starts.append(starts[-1] + n + r)
    index = torch.tensor(rows_of, device=DEVICE)
    spread_keys = torch.where((index >= 0)[:, None], keys[index.clamp(min=0)], float("nan")).to(dtype)
    spread_values = torch.where((index >= 0)[:, None], values[index.clamp(min=0)], float("nan")).to(dtype)
    ref_out, ref_lse = kernels.ragged_context_attention_reference(query.float(), spread_keys.float(),
                                                                  spread_values.float(), tuple(starts), src_rows, 0.3,
                                                                  ends=tuple(ends))
    torch.testing.assert_close(ref_out, packed_out, atol=1e-6, rtol=1e-6)
    cu = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    seg_ends = torch.tensor(ends, dtype=torch.int32, device=DEVICE)
    src = torch.tensor(src_rows, dtype=torch.int32, device=DEVICE)
    for splits in (None, 3):
        out, lse = kernels.ragged_context_attention(query, spread_keys, spread_values, cu, src, max(lengths), 0.3,
                                                    num_splits=splits, poison=True, seg_ends=seg_ends)
        assert not out.isnan().any() and not lse.isnan().any()  # no free slot was read
        _close(out, packed_out, OUT_TOL[dtype])
        _close(lse, packed_lse, LSE_TOL[dtype])


def _dense_float64(query, keys, values, offsets, src_rows, scaling):
    """Attention in float64 over each segment: an independent reference (no kernel, no twin code)."""
    batch, num_heads, rows, head_dim = query.shape
    out = torch.zeros(batch, num_heads, rows, head_dim, dtype=torch.float64, device=query.device)
    for b, src in enumerate(src_rows):
        for h in range(num_heads):
            lo, hi = offsets[src * num_heads + h], offsets[src * num_heads + h + 1]
            if hi > lo:
                weights = torch.softmax(query[b, h].double() @ keys[lo:hi].double().T * scaling, dim=-1)
                out[b, h] = weights @ values[lo:hi].double()
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,rows", [(64, 1), (64, 20), (128, 4), (96, 20), (80, 1)])
def test_ragged_context_attention_fp8(dtype, head_dim, rows):
    """fp8 keys/values with per-pair scales: the kernel (conversion in registers, scales folded into logits and
    probabilities) matches its PyTorch twin, the twin matches float64 attention over the dequantized pairs, and a
    kernel that forgot either scale would fall outside the bounds."""
    from kvzip_cache.storage import dequantize_fp8, quantize_fp8

    gen = torch.Generator().manual_seed(rows * 100 + head_dim + 7)
    num_heads, lengths = 2, [0, 1, 129, 64, 300, 5]
    wide_keys, wide_values, offsets = _flat_context(lengths, head_dim, torch.float32, gen)
    wide_keys = wide_keys * torch.linspace(0.05, 4.0, offsets[-1], device=DEVICE)[:, None]  # scales vary by pair
    (keys, key_scales), (values, value_scales) = quantize_fp8(wide_keys), quantize_fp8(wide_values)
    src_rows = (2, 0, 0, 1)
    query = torch.randn(len(src_rows), num_heads, rows, head_dim, generator=gen).to(DEVICE, dtype)
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    src = torch.tensor(src_rows, dtype=torch.int32, device=DEVICE)
    twin_out, twin_lse = kernels.ragged_context_attention_reference(query.float(), keys, values, tuple(offsets),
                                                                    src_rows, 0.3, key_scales, value_scales)
    exact = _dense_float64(query, dequantize_fp8(keys, key_scales, torch.float64),
                           dequantize_fp8(values, value_scales, torch.float64), offsets, src_rows, 0.3)
    torch.testing.assert_close(twin_out.double(), exact, atol=2e-5, rtol=2e-5)
    for splits in (None, 3):
        out, lse = kernels.ragged_context_attention(query, keys, values, cu, src, max(lengths), 0.3,
                                                    num_splits=splits, poison=True, key_scales=key_scales,
                                                    value_scales=value_scales)
        assert not out.isnan().any() and not lse.isnan().any()
        _close(out, twin_out, OUT_TOL[dtype])
        _close(lse, twin_lse, LSE_TOL[dtype])
    ones = torch.ones_like(key_scales)
    no_key_scale, _ = kernels.ragged_context_attention_reference(query.float(), keys, values, tuple(offsets),
                                                                 src_rows, 0.3, ones, value_scales)
    no_value_scale, _ = kernels.ragged_context_attention_reference(query.float(), keys, values, tuple(offsets),
                                                                   src_rows, 0.3, key_scales, ones)
    assert _outside(no_key_scale, twin_out, OUT_TOL[dtype]) and _outside(no_value_scale, twin_out, OUT_TOL[dtype])


FP8_DOTS = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]  # (the interpreter: no bf16)


@pytest.mark.parametrize("query_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fp8_dots", FP8_DOTS)
@pytest.mark.parametrize("magnitude", [1.0, 1e-6])
def test_fp8_pairs_with_16_bit_queries(query_dtype, fp8_dots, magnitude):
    """16-bit queries over fp8 pairs run the products in float16 (or bf16, ``fp8_dots``): within 1e-3 of the largest
    output of float64 attention over the dequantized pairs, also when the values are tiny (scales ~1e-12, which
    float16 probabilities times scales would flush to zero) and their scales span four decades within a key block.
    (On the CPU only float16 products: Triton's interpreter computes bf16 products wrongly.)"""
    from kvzip_cache.storage import dequantize_fp8, quantize_fp8

    gen = torch.Generator().manual_seed(5)
    head_dim, num_heads, lengths = 128, 2, [0, 1, 129, 64, 300, 5]
    wide_keys, wide_values, offsets = _flat_context(lengths, head_dim, torch.float32, gen)
    wide_keys = wide_keys * torch.linspace(0.05, 4.0, offsets[-1], device=DEVICE)[:, None]
    wide_values = wide_values * magnitude * torch.logspace(-3, 1, offsets[-1], device=DEVICE)[:, None]
    (keys, key_scales), (values, value_scales) = quantize_fp8(wide_keys), quantize_fp8(wide_values)
    src_rows = (2, 0, 0, 1)
    query = torch.randn(len(src_rows), num_heads, 4, head_dim, generator=gen).to(DEVICE, query_dtype)
    exact = _dense_float64(query, dequantize_fp8(keys, key_scales, torch.float64),
                           dequantize_fp8(values, value_scales, torch.float64), offsets, src_rows, 0.3)
    out, _ = kernels.ragged_context_attention(
        query, keys, values, torch.tensor(offsets, dtype=torch.int32, device=DEVICE),
        torch.tensor(src_rows, dtype=torch.int32, device=DEVICE), max(lengths), 0.3, key_scales=key_scales,
        value_scales=value_scales, fp8_dots=fp8_dots)
    error = (out.double() - exact).abs().max() / exact.abs().max()
    assert error < 1e-3, f"largest error {error:.2e} of the largest output"


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_context_through_the_backends(dtype):
    """A compressed context stored in fp8 (`CompressedContext.to_fp8`): the Triton backend and the reference
    backend agree (per-row, shared rows, static tail), and both equal attention over the dequantized pairs."""
    from kvzip_cache.backends import triton_backend
    from kvzip_cache.storage import CompressedContext
    from kvzip_cache.views import RaggedKV

    gen = torch.Generator().manual_seed(11)
    head_dim, num_heads, q_len, group = 64, 2, 3, 2
    keys, values, offsets = _flat_context([0, 150, 33, 129], head_dim, dtype, gen)
    counts = torch.tensor([b - a for a, b in zip(offsets[:-1], offsets[1:])])
    ctx = CompressedContext.from_counts(keys, values, torch.zeros(len(keys), dtype=torch.int32, device=DEVICE),
                                        counts.to(DEVICE), num_heads).to_fp8()
    assert ctx.keys.dtype == torch.float8_e4m3fn and ctx.dtype == dtype
    dequantized = dataclasses.replace(ctx, keys=ctx.read(slice(None), torch.float32)[0],
                                      values=ctx.read(slice(None), torch.float32)[1], key_scales=None,
                                      value_scales=None, dtype=torch.float32)
    for src_rows in ((1, 0, 1), (0, 0, 0, 1, 1, 1)):
        batch, tail = len(src_rows), q_len + 20
        buffer_k = torch.randn(batch, num_heads, tail + 3, head_dim, generator=gen).to(DEVICE, dtype)
        buffer_v = torch.randn(batch, num_heads, tail + 3, head_dim, generator=gen).to(DEVICE, dtype)
        index = torch.tensor(src_rows, dtype=torch.int32, device=DEVICE)
        share = 3 if batch == 6 else 1
        kv = RaggedKV(ctx, src_rows, index, buffer_k[:, :, :tail], buffer_v[:, :, :tail], length=400, share=share)
        static = RaggedKV(ctx, src_rows, index, buffer_k, buffer_v, length=403,
                          tail_end=torch.tensor(tail, device=DEVICE), share=share)
        query = torch.randn(batch, num_heads * group, q_len, head_dim, generator=gen).to(DEVICE, dtype)
        valid = torch.ones(batch, tail, dtype=torch.bool, device=DEVICE)
        valid[1, :7] = False
        padded_valid = torch.cat([valid, torch.ones(batch, 3, dtype=torch.bool, device=DEVICE)], 1)
        expected = reference.ragged_attention(query.float(), _float32(dataclasses.replace(kv, context=dequantized)),
                                              0.125, valid)
        for got in (triton_backend.ragged_attention(query, kv, 0.125, valid),
                    triton_backend.ragged_attention(query, static, 0.125, padded_valid),
                    reference.ragged_attention(query, kv, 0.125, valid),
                    reference.ragged_attention(query, static, 0.125, padded_valid)):
            assert got.shape == expected.shape and got.dtype == dtype and not got.isnan().any()
            _close(got, expected, OUT_TOL[dtype])
        long_query = torch.randn(batch, num_heads * group, reference.LARGE_QUERY + 1, head_dim,
                                 generator=gen).to(DEVICE, dtype)  # many queries: the SDPA path per segment
        long_tail = torch.randn(batch, num_heads, reference.LARGE_QUERY + 1, head_dim, generator=gen).to(DEVICE, dtype)
        long_kv = RaggedKV(ctx, src_rows, index, long_tail, long_tail, length=900)
        _close(reference.ragged_attention(long_query, long_kv, 0.125),
               reference.ragged_attention(long_query.float(), _float32(dataclasses.replace(long_kv, context=dequantized)),
                                          0.125), OUT_TOL[dtype])


SCORE_SHAPES = [(0, 1, 1, 1), (5, 70, 37, 4), (13, 130, 129, 3)]  # prefix, chunk, n_new, GQA group


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "head_dim,prefix,chunk,n_new,group",
    [(d, *shape) for d in (64, 128) for shape in SCORE_SHAPES]
    + [(d, *SCORE_SHAPES[1]) for d in [96, 80, *WIDE_PADDED]],
)
def test_restricted_max_scores(dtype, head_dim, prefix, chunk, n_new, group):
    gen = torch.Generator().manual_seed(prefix + chunk + n_new)
    num_heads = 2
    query = torch.randn(num_heads * group, n_new, head_dim, generator=gen).to(DEVICE, dtype)
    pk, ck, nk = (torch.randn(num_heads, m, head_dim, generator=gen).to(DEVICE, dtype) for m in (prefix, chunk, n_new))
    scores = kernels.restricted_max_scores_triton(query, pk, ck, nk, head_dim ** -0.5, poison=True)
    expected = reference.restricted_max_scores(query.float(), pk.float(), ck.float(), nk.float(), head_dim ** -0.5)
    assert not scores.isnan().any() and scores.dtype == torch.float32
    _close(scores, expected, SCORE_TOL[dtype])
    wrong = reference.restricted_max_scores(query.float(), pk.float(), ck.float(), nk.float(), 1.02 * head_dim ** -0.5)
    assert _outside(wrong, expected, SCORE_TOL[dtype])  # a softmax scale 2% off: outside the bounds
    assert _outside(torch.zeros_like(expected), expected, SCORE_TOL[dtype])


def test_merge_splits_ignores_empty_splits():
    out = torch.randn(1, 1, 3, 2, 4)
    lse = torch.tensor([[[[0.5, float("-inf")], [float("-inf"), float("-inf")], [1.0, 2.0]]]])
    merged, total = kernels.merge_splits(out, lse)
    torch.testing.assert_close(total[0, 0], torch.tensor([torch.logaddexp(torch.tensor(0.5), torch.tensor(1.0)), 2.0]))
    torch.testing.assert_close(merged[0, 0, 1], out[0, 0, 2, 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,q_len,group", [(64, 1, 4), (64, 3, 2), (80, 17, 1)])
def test_tail_split_partials_match_their_reference(dtype, head_dim, q_len, group):
    """The tail's split kernel against its PyTorch twin: causal, padding (more than a key block in one row), a static
    tail whose written end is on the device, split counts that leave some splits empty or cut mid-block."""
    from kvzip_cache.kernels.split_tail import tail_split_partials

    gen = torch.Generator().manual_seed(head_dim + q_len)
    batch, num_heads, capacity, written = 3, 2, 100, 77
    tail_k = torch.randn(batch, num_heads, capacity, head_dim, generator=gen).to(DEVICE, dtype)
    tail_v = torch.randn(batch, num_heads, capacity, head_dim, generator=gen).to(DEVICE, dtype)
    query = torch.randn(batch, num_heads, group * q_len, head_dim, generator=gen).to(DEVICE, dtype)
    valid = torch.ones(batch, capacity, dtype=torch.bool, device=DEVICE)
    valid[1, :40] = False
    valid[2, 10:13] = False
    for splits in (1, 3, 5):
        for tail_valid in (None, valid):
            for end in (None, written):  # the whole buffer, or a static tail's first `written` slots
                got_out, got_lse = tail_split_partials(
                    query, tail_k, tail_v, tail_valid, 0.125, q_len, splits,
                    tail_end=None if end is None else torch.tensor(end, device=DEVICE))
                out, lse = kernels.tail_split_partials_reference(query, tail_k.float(), tail_v.float(), tail_valid,
                                                                 0.125, q_len, splits, tail_len=end)
                assert torch.equal(torch.isinf(got_lse), torch.isinf(lse))
                _close(got_lse.masked_fill(lse.isinf(), 0), lse.masked_fill(lse.isinf(), 0), LSE_TOL[dtype])
                _close(got_out, out, OUT_TOL[dtype])
    assert torch.isinf(lse).any()  # row 1's padding leaves some splits with nothing to see


@pytest.mark.parametrize("share,q_len", [(1, 1), (3, 2)])
def test_merge_partials_equals_merge_splits_over_both_sets(share, q_len):
    """The split-tail merge adds up the context's and the tail's partial results as `merge_splits` does over both
    sets together (empty splits included), and writes each (row, query head, position) where transformers expects."""
    from kvzip_cache.kernels.split_tail import merge_partials

    gen = torch.Generator().manual_seed(share)
    batch, num_heads, group, head_dim, context_splits, tail_splits = 6, 2, 2, 48, 37, 3
    rows = group * q_len
    c_out = torch.randn(batch // share, num_heads, context_splits, share * rows, head_dim, generator=gen).to(DEVICE)
    c_lse = torch.randn(batch // share, num_heads, context_splits, share * rows, generator=gen).to(DEVICE)
    c_lse[:, :, ::5] = float("-inf")  # empty context splits
    t_out = torch.randn(batch, num_heads, tail_splits, rows, head_dim, generator=gen).to(DEVICE)
    t_lse = torch.randn(batch, num_heads, tail_splits, rows, generator=gen).to(DEVICE) + 3
    t_lse[:, :, 1] = float("-inf")
    got = merge_partials(c_out, c_lse, t_out, t_lse, q_len, share, torch.float32)
    # batch row b's context partials are rows (b % share) * rows .. of context row b // share
    contexts = batch // share
    per_row_out = c_out.reshape(contexts, num_heads, context_splits, share, rows, head_dim).permute(0, 3, 1, 2, 4, 5)
    per_row_lse = c_lse.reshape(contexts, num_heads, context_splits, share, rows).permute(0, 3, 1, 2, 4)
    merged, _ = kernels.merge_splits(
        torch.cat([per_row_out.reshape(batch, num_heads, context_splits, rows, head_dim), t_out], dim=2),
        torch.cat([per_row_lse.reshape(batch, num_heads, context_splits, rows), t_lse], dim=2))
    # [B, H, g * q, D] with row j * q + i -> [B, q, H * g, D]
    expected = merged.reshape(batch, num_heads, group, q_len, head_dim).permute(0, 3, 1, 2, 4)
    _close(got, expected.reshape(batch, q_len, num_heads * group, head_dim), OUT_TOL[torch.float32])


def _entry(kernel: str):
    """The Triton backend's ragged attention through one of its kernel entry points: the two-launch path, or the
    split tail with its tail cut into 3 splits (more than the short tails here would get by default)."""
    from kvzip_cache.backends import triton_backend

    if kernel == "two-launch":
        return functools.partial(triton_backend.ragged_attention, kernel=kernels.ragged_attention_with_tail)
    split_tail = functools.partial(kernels.ragged_attention_split_tail, tail_splits=3)
    return functools.partial(triton_backend.ragged_attention, kernel=split_tail)


KERNEL_PATHS = ["two-launch", "split-tail"]


def test_the_backend_picks_the_split_tail_unless_shared_rows_have_short_tails():
    """`decode_kernel`, as measured (docs/results/h100-depth-2/splits.md): one row, or a long tail, takes the split
    tail (25.4 vs 32.8 us a layer at 32K; 45.9 vs 228.8 with an 8K tail); 64 rows sharing a context with 80-slot
    tails take the two-launch path (85.9 vs 95.0)."""
    from kvzip_cache.backends import triton_backend

    assert triton_backend.decode_kernel(1, 80) is kernels.ragged_attention_split_tail
    assert triton_backend.decode_kernel(1, 8256) is kernels.ragged_attention_split_tail
    assert triton_backend.decode_kernel(64, 80) is kernels.ragged_attention_with_tail
    assert triton_backend.decode_kernel(64, triton_backend.SHARED_SHORT_TAIL + 1) is kernels.ragged_attention_split_tail


def test_shared_rows_take_the_pipelined_launch_only_where_it_was_measured_and_fits():
    """`shared_launch`: 16-bit queries and pairs, >= 64 stacked rows, head_dim <= 128 take the configuration the H100
    sweep found fastest (docs/results/h100-depth-3); fp8 pairs, float32, few rows, wide heads and a device without
    the shared memory for three stages keep the defaults."""
    from kvzip_cache.kernels.ragged_attention import shared_block_m, shared_launch

    bf16, cpu = torch.bfloat16, torch.device("cpu")
    pipelined = {"block_n": 64, "num_stages": 3, "split_factor": 1}
    assert shared_launch(256, 128, bf16, bf16, cpu) == {"block_m": 128, "num_warps": 8, **pipelined}
    assert shared_launch(64, 64, torch.float16, torch.float16, cpu) == {"block_m": 64, "num_warps": 4, **pipelined}
    for rows, head_dim, query, pairs in [(256, 128, bf16, torch.float8_e4m3fn), (32, 128, bf16, bf16),
                                         (256, 128, torch.float32, torch.float32), (256, 256, bf16, bf16)]:
        assert shared_launch(rows, head_dim, query, pairs, cpu) == {"block_m": shared_block_m(rows)}
    if CUDA:  # the fitting rule against this GPU's own limit
        properties = torch.cuda.get_device_properties(0)
        fits = 3 * 2 * 64 * 128 * 2 + 128 * 128 * 2 <= getattr(properties, "shared_memory_per_block_optin", 48 * 1024)
        assert ("num_stages" in shared_launch(256, 128, bf16, bf16, torch.device("cuda"))) == fits


@pytest.mark.parametrize("kernel", KERNEL_PATHS)
def test_the_pipelined_shared_launch_matches_the_reference(kernel):
    """The launch `shared_launch` picks for many 16-bit shared rows (query blocks of 128, 64-key blocks, three
    stages, one program per SM), forced on float32 inputs so that the CPU interpreter runs it too: 64 rows x 4
    query heads over one context, uneven and empty heads, equal to the reference backend."""
    from kvzip_cache.storage import CompressedContext
    from kvzip_cache.views import RaggedKV

    head_dim, num_heads, group, batch, tail = 64, 2, 4, 64, 9
    gen = torch.Generator().manual_seed(64)
    keys, values, offsets = _flat_context([0, 300, 77, 129], head_dim, torch.float32, gen)
    counts = torch.tensor([b - a for a, b in zip(offsets[:-1], offsets[1:])])
    ctx = CompressedContext.from_counts(keys, values, torch.zeros(len(keys), dtype=torch.int32, device=DEVICE),
                                        counts.to(DEVICE), num_heads)
    src_rows = (1,) * batch
    tail_k = torch.randn(batch, num_heads, tail, head_dim, generator=gen).to(DEVICE)
    tail_v = torch.randn(batch, num_heads, tail, head_dim, generator=gen).to(DEVICE)
    index = torch.tensor(src_rows, dtype=torch.int32, device=DEVICE)
    kv = RaggedKV(ctx, src_rows, index, tail_k, tail_v, length=400, share=batch)
    query = torch.randn(batch, num_heads * group, 1, head_dim, generator=gen).to(DEVICE)
    expected = reference.ragged_attention(query, kv, 0.125, None)
    entry = kernels.ragged_attention_with_tail if kernel == "two-launch" else kernels.ragged_attention_split_tail
    got = entry(query.reshape(batch, num_heads, group, head_dim), keys, values, ctx.cu_seqlens, index, 300, tail_k,
                tail_v, None, 0.125, 1, share=batch, context_block_m=128, block_n=64, num_stages=3, num_warps=8,
                split_factor=1)
    _close(got, expected, OUT_TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNEL_PATHS)
@pytest.mark.parametrize(
    "head_dim,q_len,group",
    [(64, 1, 4), (64, 3, 2), (64, 17, 1), (96, 3, 2), (80, 1, 4)] + [(d, 3, 2) for d in WIDE_PADDED],
)
def test_ragged_attention_with_tail_matches_reference_backend(dtype, kernel, head_dim, q_len, group):
    from kvzip_cache.backends import triton_backend
    from kvzip_cache.storage import CompressedContext
    from kvzip_cache.views import RaggedKV

    gen = torch.Generator().manual_seed(q_len * 7 + group + head_dim)
    num_heads, tail = 2, q_len + 40
    keys, values, offsets = _flat_context([0, 70, 1, 129], head_dim, dtype, gen)
    counts = torch.tensor([b - a for a, b in zip(offsets[:-1], offsets[1:])])
    ctx = CompressedContext.from_counts(keys, values, torch.zeros(len(keys), dtype=torch.int32, device=DEVICE),
                                        counts.to(DEVICE), num_heads)
    src_rows = (1, 0, 1)
    buffer_k = torch.randn(3, num_heads, tail + 5, head_dim, generator=gen).to(DEVICE, dtype)  # spare capacity
    buffer_v = torch.randn(3, num_heads, tail + 5, head_dim, generator=gen).to(DEVICE, dtype)
    kv = RaggedKV(ctx, src_rows, torch.tensor(src_rows, dtype=torch.int32, device=DEVICE),
                  buffer_k[:, :, :tail], buffer_v[:, :, :tail], length=500)
    query = torch.randn(3, num_heads * group, q_len, head_dim, generator=gen).to(DEVICE, dtype)
    valid = torch.ones(3, tail, dtype=torch.bool, device=DEVICE)
    valid[2, :9] = False  # padding inside row 2's tail
    valid[1, :38] = False  # more padding than one key block: a row's first blocks are fully masked
    # A static tail (KVzipCache.make_static): the whole buffer, of which the first `tail` slots are written; the
    # rest holds garbage that must stay invisible. Its length is a device tensor the kernel reads itself.
    static = RaggedKV(ctx, src_rows, kv.src_index, buffer_k, buffer_v, length=505,
                      tail_end=torch.tensor(tail, device=DEVICE))
    padded_valid = torch.cat([valid, torch.ones(3, 5, dtype=torch.bool, device=DEVICE)], 1)
    attention = _entry(kernel)
    for tail_valid in (None, valid):
        out = attention(query, kv, 0.125, tail_valid)
        expected = reference.ragged_attention(query.float(), _float32(kv), 0.125, tail_valid)
        assert out.shape == expected.shape and out.dtype == dtype and not out.isnan().any()
        _close(out, expected, OUT_TOL[dtype])
        static_valid = None if tail_valid is None else padded_valid
        for got in (attention(query, static, 0.125, static_valid),
                    triton_backend.ragged_attention(query, static, 0.125, static_valid),
                    reference.ragged_attention(query, static, 0.125, static_valid)):
            _close(got, expected, OUT_TOL[dtype])
        full = torch.ones(3, tail, dtype=torch.bool, device=DEVICE) if tail_valid is None else tail_valid
        wrong = reference.ragged_attention(query.float(), _float32(kv), 0.125, _first_real_masked(full))
        assert _outside(wrong, expected, OUT_TOL[dtype])  # one tail slot lost: outside the bounds


@pytest.mark.parametrize("dtype", DTYPES)
def test_tail_merge_over_any_number_of_splits(dtype):
    """The tail kernel merges every split's partial result, whatever their number and with empty splits (a segment
    shorter than the splits): the same output as the reference over the whole context and tail."""
    from kvzip_cache.storage import CompressedContext
    from kvzip_cache.views import RaggedKV

    head_dim, num_heads, group, batch, tail = 64, 2, 4, 2, 9
    gen = torch.Generator().manual_seed(5)
    keys, values, offsets = _flat_context([1, 700, 300, 1100], head_dim, dtype, gen)
    counts = torch.tensor([b - a for a, b in zip(offsets[:-1], offsets[1:])])
    ctx = CompressedContext.from_counts(keys, values, torch.zeros(len(keys), dtype=torch.int32, device=DEVICE),
                                        counts.to(DEVICE), num_heads)
    tail_k = torch.randn(batch, num_heads, tail, head_dim, generator=gen).to(DEVICE, dtype)
    tail_v = torch.randn(batch, num_heads, tail, head_dim, generator=gen).to(DEVICE, dtype)
    src_rows = (1, 0)
    kv = RaggedKV(ctx, src_rows, torch.tensor(src_rows, dtype=torch.int32, device=DEVICE), tail_k, tail_v,
                  length=2000)
    query = torch.randn(batch, num_heads * group, 1, head_dim, generator=gen).to(DEVICE, dtype)
    expected = reference.ragged_attention(query.float(), _float32(kv), 0.125, None)
    stacked = query.reshape(batch, num_heads, group, head_dim)  # row j = query head h * group + j (q_len 1)
    for splits in (1, 3, 5, 9):
        got = kernels.ragged_attention_with_tail(stacked, keys, values, ctx.cu_seqlens, kv.src_index, 1100, tail_k,
                                                 tail_v, None, 0.125, 1, num_splits=splits)
        assert not got.isnan().any()
        _close(got, expected, OUT_TOL[dtype])
    half = kernels.ragged_attention_with_tail(stacked, keys, values, ctx.cu_seqlens, kv.src_index, 1100, tail_k,
                                              tail_v, None, 0.125, 1, num_splits=9, block_n=64)
    _close(half, expected, OUT_TOL[dtype])  # more splits than some segments have key blocks: empty splits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNEL_PATHS)
@pytest.mark.parametrize(  # (src rows, q_len, GQA group): one context for 5 rows; 2 contexts x 3 rows; 64 rows
    "src_rows,q_len,group",
    [((0,) * 5, 1, 4), ((1, 1, 1, 0, 0, 0), 3, 2), ((0,) * 64, 1, 4)],
)
def test_shared_context_attention_matches_reference_backend(dtype, kernel, src_rows, q_len, group):
    """Rows sharing a compressed row read it once (queries stacked, share > 1): same output as the reference and as
    the per-row kernels, with padded tails, empty heads and a static tail."""
    from kvzip_cache.backends import triton_backend
    from kvzip_cache.storage import CompressedContext
    from kvzip_cache.views import RaggedKV, shared_run_length

    head_dim, num_heads, batch = 64, 2, len(src_rows)
    gen = torch.Generator().manual_seed(batch * 10 + q_len)
    keys, values, offsets = _flat_context([0, 150, 33, 129], head_dim, dtype, gen)
    counts = torch.tensor([b - a for a, b in zip(offsets[:-1], offsets[1:])])
    ctx = CompressedContext.from_counts(keys, values, torch.zeros(len(keys), dtype=torch.int32, device=DEVICE),
                                        counts.to(DEVICE), num_heads)
    share = shared_run_length(src_rows)
    assert share == (5 if batch == 5 else 3 if batch == 6 else 64)
    tail = q_len + 20  # rows of one context have different tails (own questions, own padding)
    buffer_k = torch.randn(batch, num_heads, tail + 3, head_dim, generator=gen).to(DEVICE, dtype)
    buffer_v = torch.randn(batch, num_heads, tail + 3, head_dim, generator=gen).to(DEVICE, dtype)
    index = torch.tensor(src_rows, dtype=torch.int32, device=DEVICE)
    kv = RaggedKV(ctx, src_rows, index, buffer_k[:, :, :tail], buffer_v[:, :, :tail], length=400, share=share)
    static = RaggedKV(ctx, src_rows, index, buffer_k, buffer_v, length=403, tail_end=torch.tensor(tail, device=DEVICE),
                      share=share)
    query = torch.randn(batch, num_heads * group, q_len, head_dim, generator=gen).to(DEVICE, dtype)
    valid = torch.ones(batch, tail, dtype=torch.bool, device=DEVICE)
    valid[1, :7] = False
    valid[-1, :tail - q_len] = False  # a row that sees nothing of its tail but its own tokens
    expected = reference.ragged_attention(query.float(), _float32(kv), 0.125, valid)
    per_row = triton_backend.ragged_attention(query, kv, 0.125, valid, shared=False)
    padded_valid = torch.cat([valid, torch.ones(batch, 3, dtype=torch.bool, device=DEVICE)], 1)
    attention = _entry(kernel)
    for got in (attention(query, kv, 0.125, valid),
                attention(query, static, 0.125, padded_valid),
                reference.ragged_attention(query, static, 0.125, padded_valid), per_row):
        assert got.shape == expected.shape and got.dtype == dtype and not got.isnan().any()
        _close(got, expected, OUT_TOL[dtype])
    wrong = reference.ragged_attention(query.float(), _float32(kv), 0.125, _first_real_masked(valid))
    assert _outside(wrong, expected, OUT_TOL[dtype])  # one tail slot lost: outside the bounds


def test_shared_run_length():
    from kvzip_cache.views import shared_run_length

    assert shared_run_length((0, 0, 0, 0)) == 4
    assert shared_run_length((0, 0, 1, 1, 2, 2)) == 2
    assert shared_run_length((0, 0, 1, 1, 1, 1)) == 2  # runs of 2 (two of them read row 1)
    for rows in ((0,), (0, 1), (0, 0, 1), (1, 0, 0, 1), (0, 0, 0, 1, 1)):
        assert shared_run_length(rows) == 1


@pytest.mark.parametrize("head_dim", [8, 15, 257, 512])
def test_unsupported_head_dim_names_the_reference_backend(head_dim):
    """Outside 16..256 both kernels refuse before launching, and say which backend to use instead."""
    query = torch.zeros(1, 2, 4, head_dim, device=DEVICE)
    keys = torch.zeros(3, head_dim, device=DEVICE)
    cu = torch.tensor([0, 1, 3], dtype=torch.int32, device=DEVICE)
    src = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=rf'head_dim {head_dim} .*use_backend\("reference"\)'):
        kernels.ragged_context_attention(query, keys, keys, cu, src, 2, 1.0)
    with pytest.raises(ValueError, match=rf'head_dim {head_dim} .*use_backend\("reference"\)'):
        kernels.restricted_max_scores_triton(query[0], keys[None, :0], keys[None], query[0, :1], 1.0)

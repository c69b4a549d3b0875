"""Triton kernels vs their plain-PyTorch references on random inputs of awkward shapes.

On a GPU they run compiled (bf16, fp16, fp32); without one, conftest turns on Triton's interpreter and they run on
the CPU in float32. Outputs are poisoned with NaN before each run, so an element the kernel forgot fails the test.
"""

import pytest
import torch

kernels = pytest.importorskip("kvzip_cache.kernels")
if not kernels.TRITON_AVAILABLE:
    pytest.skip("Triton is not installed", allow_module_level=True)

from kvzip_cache.backends import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if DEVICE == "cuda" else [torch.float32]
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 2e-5}


def _flat_context(lengths, head_dim, dtype, gen):
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    keys = torch.randn(offsets[-1], head_dim, generator=gen).to(DEVICE, dtype)
    values = torch.randn(offsets[-1], head_dim, generator=gen).to(DEVICE, dtype)
    return keys, values, offsets


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("rows", [1, 4, 20, 33])  # GQA group x query positions: decode, questions, not a multiple of 16
def test_ragged_context_attention(dtype, head_dim, rows):
    gen = torch.Generator().manual_seed(rows * 1000 + head_dim)
    num_heads = 2
    lengths = [0, 1, 64, 65, 300, 7]  # empty heads, one key, block edges, very unequal heads: 3 rows x 2 heads
    keys, values, offsets = _flat_context(lengths, head_dim, dtype, gen)
    src_rows = (2, 0, 0, 1)  # beams share row 0
    query = torch.randn(len(src_rows), num_heads, rows, head_dim, generator=gen).to(DEVICE, dtype)
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    src = torch.tensor(src_rows, dtype=torch.int32, device=DEVICE)
    for splits in (None, 1, 3):
        out, lse = kernels.ragged_context_attention(query, keys, values, cu, src, max(lengths), 0.3,
                                                    num_splits=splits, poison=True)
        ref_out, ref_lse = kernels.ragged_context_attention_reference(query, keys, values, tuple(offsets), src_rows, 0.3)
        assert not out.isnan().any() and not lse.isnan().any()
        torch.testing.assert_close(out, ref_out, atol=TOL[dtype], rtol=TOL[dtype])
        torch.testing.assert_close(lse, ref_lse, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.isneginf(lse[1, 0]).all() and (out[1, 0] == 0).all()  # row 1 reads compressed row 0: head 0 empty


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("prefix,chunk,n_new,group", [(0, 1, 1, 1), (5, 70, 37, 4), (13, 130, 129, 3)])
def test_restricted_max_scores(dtype, head_dim, prefix, chunk, n_new, group):
    gen = torch.Generator().manual_seed(prefix + chunk + n_new)
    num_heads = 2
    query = torch.randn(num_heads * group, n_new, head_dim, generator=gen).to(DEVICE, dtype)
    pk, ck, nk = (torch.randn(num_heads, m, head_dim, generator=gen).to(DEVICE, dtype) for m in (prefix, chunk, n_new))
    scores = kernels.restricted_max_scores_triton(query, pk, ck, nk, head_dim ** -0.5, poison=True)
    expected = reference.restricted_max_scores(query, pk, ck, nk, head_dim ** -0.5)
    assert not scores.isnan().any()
    torch.testing.assert_close(scores, expected, atol=TOL[dtype], rtol=TOL[dtype])


def test_merge_splits_ignores_empty_splits():
    out = torch.randn(1, 1, 3, 2, 4)
    lse = torch.tensor([[[[0.5, float("-inf")], [float("-inf"), float("-inf")], [1.0, 2.0]]]])
    merged, total = kernels.merge_splits(out, lse)
    torch.testing.assert_close(total[0, 0], torch.tensor([torch.logaddexp(torch.tensor(0.5), torch.tensor(1.0)), 2.0]))
    torch.testing.assert_close(merged[0, 0, 1], out[0, 0, 2, 1])

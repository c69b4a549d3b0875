"""Triton kernels of kvzip-cache.

Each kernel has a plain-PyTorch reference with the same contract; `tests/test_kernels.py` compares them on random
inputs of awkward shapes (on a GPU, or on the CPU through Triton's interpreter with ``TRITON_INTERPRET=1``).
"""

from .ragged_attention import (
    merge_splits,
    ragged_attention_with_tail,
    ragged_context_attention,
    ragged_context_partials,
    ragged_context_attention_reference,
    triton,
)
from .restricted_scores import restricted_max_scores_triton
from .split_tail import ragged_attention_split_tail, tail_split_partials_reference

TRITON_AVAILABLE = triton is not None

__all__ = [
    "TRITON_AVAILABLE",
    "merge_splits",
    "ragged_attention_split_tail",
    "ragged_attention_with_tail",
    "ragged_context_attention",
    "ragged_context_partials",
    "ragged_context_attention_reference",
    "restricted_max_scores_triton",
    "tail_split_partials_reference",
]

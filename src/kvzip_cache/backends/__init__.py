"""Attention backends behind the "kvzip" attention function.

A backend is three functions with the signatures of `reference.py`: `dense` (contiguous keys, prefill and sliding
layers), `ragged` (compressed context + dense tail) and `scoring` (a reconstruction pass that also writes KVzip
scores). The reference backend is plain PyTorch and runs everywhere; faster backends (Triton, flash-attn) register
themselves here and are picked per device.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from . import reference


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    dense: Callable[..., torch.Tensor]
    ragged: Callable[..., torch.Tensor]
    scoring: Callable[..., torch.Tensor]
    supports: Callable[[torch.device], bool]


REFERENCE = AttentionBackend(
    name="reference",
    dense=reference.dense_attention,
    ragged=reference.ragged_attention,
    scoring=reference.scoring_attention,
    supports=lambda device: True,
)

# Tried in order; the first that supports the device wins. Faster backends are inserted before the reference.
_BACKENDS: list[AttentionBackend] = [REFERENCE]


def _register_triton() -> None:
    """Prefer the Triton backend on CUDA devices when Triton is installed."""
    try:
        from . import triton_backend
    except ImportError:
        return
    from kvzip_cache.kernels import TRITON_AVAILABLE, ragged_attention_split_tail, ragged_attention_with_tail

    if TRITON_AVAILABLE:
        register_backend(AttentionBackend(
            name="triton",
            dense=reference.dense_attention,
            ragged=triton_backend.ragged_attention,
            scoring=triton_backend.scoring_attention,
            supports=lambda device: device.type == "cuda",
        ))
        # The same kernels reading a shared context once per row (never picked unless named): the benchmark's
        # baseline for `KVzipCache.inputs_for(..., shared=True)`.
        register_backend(AttentionBackend(
            name="triton-per-row",
            dense=reference.dense_attention,
            ragged=functools.partial(triton_backend.ragged_attention, shared=False),
            scoring=triton_backend.scoring_attention,
            supports=lambda device: device.type == "cuda",
        ), first=False)
        # Each of the two decode paths alone (never picked unless named; "triton" picks per step with
        # `triton_backend.decode_kernel`): for tests that must run both, and for timing one against the other.
        for name, kernel in (("triton-split-tail", ragged_attention_split_tail),
                             ("triton-two-launch", ragged_attention_with_tail)):
            register_backend(AttentionBackend(
                name=name,
                dense=reference.dense_attention,
                ragged=functools.partial(triton_backend.ragged_attention, kernel=kernel),
                scoring=triton_backend.scoring_attention,
                supports=lambda device: device.type == "cuda",
            ), first=False)


def register_backend(backend: AttentionBackend, *, first: bool = True) -> None:
    """Add a backend; ``first=True`` makes it preferred over the ones already registered."""
    _BACKENDS.insert(0 if first else len(_BACKENDS), backend)


def available_backends() -> list[str]:
    return [backend.name for backend in _BACKENDS]


_preferred: list[str] = []  # stack of names set by `use_backend`


@contextmanager
def use_backend(name: str):
    """Within this block, run the kvzip attention with the named backend (e.g. "reference" to compare on a GPU)."""
    if name not in available_backends():
        raise ValueError(f"unknown backend {name!r}; available: {available_backends()}")
    _preferred.append(name)
    try:
        yield
    finally:
        _preferred.pop()


def select_backend(device: torch.device, name: str | None = None) -> AttentionBackend:
    """The backend to use on ``device``: the named (or preferred) one, else the first that supports the device."""
    name = name or (_preferred[-1] if _preferred else None)
    for backend in _BACKENDS:
        if (name is None or backend.name == name) and backend.supports(device):
            return backend
    raise ValueError(f"no attention backend named {name!r} supports {device}; available: {available_backends()}")


_register_triton()

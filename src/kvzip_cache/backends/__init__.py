"""Attention backends behind the "kvzip" attention function.

A backend is three functions with the signatures of `reference.py`: `dense` (contiguous keys, prefill and sliding
layers), `ragged` (compressed context + dense tail) and `scoring` (a reconstruction pass that also writes KVzip
scores). The reference backend is plain PyTorch and runs everywhere; faster backends (Triton, flash-attn) register
themselves here and are picked per device.
"""

from __future__ import annotations

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


def register_backend(backend: AttentionBackend, *, first: bool = True) -> None:
    """Add a backend; ``first=True`` makes it preferred over the ones already registered."""
    _BACKENDS.insert(0 if first else len(_BACKENDS), backend)


def available_backends() -> list[str]:
    return [backend.name for backend in _BACKENDS]


def select_backend(device: torch.device, name: str | None = None) -> AttentionBackend:
    """The backend to use on ``device``: the named one, or the first registered one that supports the device."""
    for backend in _BACKENDS:
        if (name is None or backend.name == name) and backend.supports(device):
            return backend
    raise ValueError(f"no attention backend named {name!r} supports {device}; available: {available_backends()}")

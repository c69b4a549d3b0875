"""Undo RoPE on cached keys with the model's own rotary embedding (no table of per-model formulas).

Llama, Qwen2/2.5/3, Gemma3, Mistral and Phi3 rotate with transformers' ``x * cos + rotate_half(x) * sin`` on the
first ``cos.shape[-1]`` dims (Phi3's partial rotary leaves the rest as they are). Scaled RoPE variants (YaRN,
longrope) multiply cos and sin by one factor ``a``; the inverse below divides by ``cos^2 + sin^2 = a^2``, so it
undoes those too.
"""

from __future__ import annotations

import inspect

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_tables(model, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's RoPE ``(cos, sin)`` for full-attention layers at ``positions``, in float32.

    Args:
        model: a transformers causal LM (its decoder's ``rotary_emb`` module is called, never changed).
        positions: ``[B, t]`` int64 position ids (what the prefill passed as ``position_ids``).

    Returns:
        ``(cos, sin)``, each ``[B, t, R]`` float32 with ``R`` the rotary dims (``head_dim`` unless partial).
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        raise ValueError(
            f"{type(model).__name__} has no rotary embedding at model.get_decoder().rotary_emb; the score predictor "
            "undoes RoPE on cached keys and supports RoPE models (Llama, Qwen2/3, Gemma3, Mistral, Phi3)"
        )
    probe = torch.zeros(1, dtype=torch.float32, device=positions.device)
    if "layer_type" in inspect.signature(rotary.forward).parameters:  # Gemma3: one table per layer type
        cos, sin = rotary(probe, positions, "full_attention")
    else:
        cos, sin = rotary(probe, positions)
    return cos.float(), sin.float()


def unrotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pre-RoPE keys from post-RoPE ones.

    Args:
        keys: ``[B, H, t, D]`` post-RoPE keys (any float dtype).
        cos: ``[B, t, R]`` from `rotary_tables` at the keys' positions, ``R <= D``.
        sin: ``[B, t, R]``, likewise.
        dtype: the dtype of the result and of the arithmetic (the tables are prepared in float32 first).

    Returns:
        ``[B, H, t, D]`` keys before the rotation, in ``dtype``.
    """
    keys = keys.to(dtype)
    rot = cos.shape[-1]
    # R(theta)^-1 = R(-theta) / a^2 for the rotation a * R(theta) that transformers applies; the 1 / a^2 goes into
    # the small [B, t, R] tables, not the [B, H, t, D] keys
    scale = (cos * cos + sin * sin).reciprocal()
    cos, sin = (cos * scale).to(dtype)[:, None], (sin * scale).to(dtype)[:, None]  # broadcast over heads
    head, rest = keys[..., :rot], keys[..., rot:]
    restored = head * cos - _rotate_half(head) * sin
    return torch.cat([restored, rest], dim=-1) if rest.shape[-1] else restored

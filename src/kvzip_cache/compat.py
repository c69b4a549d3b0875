"""Differences between the transformers versions we support (5.17 to the newest 5.x)."""

from __future__ import annotations

import inspect


def cache_kwarg(model) -> str:
    """Name of the forward argument that takes a Cache: ``cache`` (5.24+) or ``past_key_values`` (earlier)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

"""Differences between the transformers versions we support (5.17 to 5.25)."""

from __future__ import annotations

import inspect


def cache_kwarg(model) -> str:
    """Name of the argument of ``model.forward`` and ``model.generate`` that takes a Cache: ``cache`` (5.24+) or
    ``past_key_values`` (earlier).

    5.24 and later still accept ``past_key_values=`` but warn (a FutureWarning from transformers' ``deprecate_kwarg``);
    ``model.generate(**inputs, **{cache_kwarg(model): cache})`` runs quietly on every supported release.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

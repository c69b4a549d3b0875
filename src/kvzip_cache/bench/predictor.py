"""Score-predictor rows of the default benchmark (``python -m kvzip_cache.bench --predictor linear|mlp``).

`predictor_rows` measures, on one context, a predicted compress after a plain prefill (``kvzip-pred``), a prefill
that evicts while it runs (``kvzip-evict``) and the path that evicts to twice the ratio while prefilling, then
scores the survivors with KVzip (``kvzip-evict+kvzip``); `kvzip_cache.bench.decode.run` adds them to its rows and
`kvzip_cache.bench.decode.write_report` gives them a table of their own.
"""

from __future__ import annotations

import torch

from kvzip_cache import KVzipCache, ScorePredictor

from ..eval.methods import RESCORED_LOOSENESS
from .common import GB, NoTemplateTokenizer, Row, decode_loop, free_memory, measured, one_chunk_gb


def predictor_rows(model, predictor: ScorePredictor, ids: torch.Tensor, mask: torch.Tensor, starts: torch.Tensor,
                   ratios: list[float], *, chunk: int, kv_per_token: int, dynamic_prefill_s: float = float("nan"),
                   decode_steps: int = 0, score_chunk: int = 2048, tokenizer=None) -> list[Row]:
    """Rows of a score predictor on one context; prints one line per row as it is measured.

    Args:
        model: loaded with (or set to) the kvzip attention.
        predictor: a `ScorePredictor` for the model (its weights do not change speed or memory).
        ids: ``[B, S]`` context ids (left padding when B > 1).
        mask: ``[B, S]`` padding mask (1 = token).
        starts: ``[B]`` first context position of each row (the protected prefix comes before).
        ratios: fractions of context pairs kept.
        chunk: prefill chunk size.
        kv_per_token: dense KV bytes per token (`kv_bytes_per_token`): full KV = kv_per_token x S x B.
        dynamic_prefill_s: the DynamicCache prefill time of the same context, to compare with (NaN: none).
        decode_steps: > 0 also times decode steps on each compressed cache (CUDA only).
        score_chunk: context tokens per reconstruction pass of ``kvzip-evict+kvzip``.
        tokenizer: builds its reconstruction prompts; default `NoTemplateTokenizer` (random-weight shapes).

    Returns, for each ratio r (largest first):

    - ``kvzip-pred``: a plain KVzipCache prefill (``prefill_s``, ``peak_prefill_gb``), then
      ``compress(model, r, predictor=p)`` (``compress_s``, ``peak_compress_gb``). The first ratio's compress predicts
      and evicts (``scoring_s``); later ones re-select with the stored predictions.
    - ``kvzip-evict``: ``prefill(..., predictor=p, ratio=r)`` (``prefill_s``, ``peak_prefill_gb``) beside the plain
      prefill (``plain_prefill_s``), DynamicCache's (``dynamic_prefill_s``) and the bound
      ``bound_gb = allocated before (weights, inputs) + r x full KV + chunk_gb``.
    - ``kvzip-evict+kvzip``: ``prefill(..., predictor=p, ratio=min(1, RESCORED_LOOSENESS x r))`` (``prefill_s``,
      ``peak_prefill_gb``; the bound with that ratio), then ``compress(model, r, scorer="kvzip")``, KVzip's scores of
      the surviving pairs (``compress_s``, ``peak_compress_gb``): the quality path of docs/score-predictors.md.

    ``chunk_gb``, "one chunk's activations" in the bound, is measured by `one_chunk_gb` on the last ``chunk`` tokens
    of each row (they hold no left padding).
    """
    batch, context = ids.shape
    full_kv_gb = kv_per_token * context * batch / GB
    padded = not bool(mask.all())
    chunk_gb = one_chunk_gb(model, ids[:, -chunk:])

    def decode_ms(cache: KVzipCache) -> float:
        if decode_steps <= 0:
            return float("nan")
        ms = decode_loop(model, cache, batch, context, decode_steps, mask if padded else None)
        cache.rollback()
        return ms

    rows: list[Row] = []

    def evicting_prefill(prefill_ratio: float) -> tuple[KVzipCache, float, float, float]:
        """A prefill that evicts to ``prefill_ratio``: the cache, its seconds and peak GB, and its bound."""
        cache = KVzipCache(model)
        with measured() as m:
            cache.prefill(model, ids, mask, context_start=starts, chunk_size=chunk, predictor=predictor,
                          ratio=prefill_ratio)
        return cache, m.seconds, m.peak_gb, m.before_gb + prefill_ratio * full_kv_gb + chunk_gb

    def add(row: Row, cache: KVzipCache, note: str = "") -> None:
        """Complete ``row`` from ``cache`` (kept KV, decode time, achieved ratio), keep it and print it."""
        achieved = int(cache.keep_mask.sum()) / max(int(cache.selectable_pairs().sum()), 1)
        row.kv_gb, row.decode_ms = (cache.kv_bytes() + cache.metadata_bytes()) / GB, decode_ms(cache)
        row.notes.append(f"achieved ratio {achieved:.3f}{note}")
        rows.append(row)
        print(_predictor_line(row), flush=True)

    plain = KVzipCache(model)
    with measured() as m:
        plain.prefill(model, ids, mask, context_start=starts, chunk_size=chunk)
    plain_s, plain_peak = m.seconds, m.peak_gb
    scoring_s = float("nan")
    for ratio in sorted(ratios, reverse=True):
        with measured() as m:
            plain.compress(model, ratio, predictor=predictor)
        scoring_s = m.seconds if scoring_s != scoring_s else scoring_s
        add(Row("kvzip-pred", context, batch, ratio, prefill_s=plain_s, scoring_s=scoring_s, compress_s=m.seconds,
                peak_prefill_gb=plain_peak, peak_compress_gb=m.peak_gb, plain_prefill_s=plain_s,
                dynamic_prefill_s=dynamic_prefill_s, chunk_gb=chunk_gb), plain)
    del plain
    free_memory()
    for ratio in sorted(ratios, reverse=True):
        cache, prefill_s, prefill_peak, bound = evicting_prefill(ratio)
        add(Row("kvzip-evict", context, batch, ratio, prefill_s=prefill_s, peak_prefill_gb=prefill_peak,
                plain_prefill_s=plain_s, dynamic_prefill_s=dynamic_prefill_s, chunk_gb=chunk_gb, bound_gb=bound), cache)
        del cache
        free_memory()
    for ratio in sorted(ratios, reverse=True):
        loose = min(1.0, RESCORED_LOOSENESS * ratio)
        cache, prefill_s, prefill_peak, bound = evicting_prefill(loose)
        with measured() as m:
            cache.compress(model, ratio, scorer="kvzip", tokenizer=tokenizer or NoTemplateTokenizer(),
                           chunk_size=score_chunk)
        add(Row("kvzip-evict+kvzip", context, batch, ratio, prefill_s=prefill_s, scoring_s=m.seconds,
                compress_s=m.seconds, peak_prefill_gb=prefill_peak, peak_compress_gb=m.peak_gb,
                plain_prefill_s=plain_s, dynamic_prefill_s=dynamic_prefill_s, chunk_gb=chunk_gb, bound_gb=bound),
            cache, f"; prefill kept {loose:g}")
        del cache
        free_memory()
    return rows


def _predictor_line(row: Row) -> str:
    head = f"{row.method:11} ctx {row.context:>6} b {row.batch} r {row.ratio:.1f}:"
    if row.method == "kvzip-pred":
        return (f"{head} plain prefill {row.prefill_s:6.2f}s, predicted compress {row.compress_s:6.3f}s = "
                f"{100 * row.compress_s / row.prefill_s:.1f}% of it; peaks {row.peak_prefill_gb:.1f}/"
                f"{row.peak_compress_gb:.1f} GB; KV {row.kv_gb:.2f} GB; {'; '.join(row.notes)}")
    rescored = (f" + KVzip on the survivors {row.compress_s:6.2f}s (peak {row.peak_compress_gb:.1f} GB), total "
                f"{(row.prefill_s + row.compress_s) / row.plain_prefill_s:.2f}x plain"
                if row.method == "kvzip-evict+kvzip" else "")
    return (f"{head} evicting prefill {row.prefill_s:6.2f}s = {row.prefill_s / row.plain_prefill_s:.2f}x plain "
            f"({row.plain_prefill_s:.2f}s), {row.prefill_s / row.dynamic_prefill_s:.2f}x DynamicCache; peak "
            f"{row.peak_prefill_gb:.1f} GB, bound {row.bound_gb:.1f} GB (one chunk {row.chunk_gb:.2f} GB){rescored}; "
            f"KV {row.kv_gb:.2f} GB; {'; '.join(row.notes)}")

"""Prefill capacity: the longest context one GPU prefills with a dense cache and with eviction while prefilling
(``python -m kvzip_cache.bench --capacity``; `run_capacity`, `capacity_rows`, `write_capacity_report`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kvzip_cache import KVzipCache, ScorePredictor
from kvzip_cache.config import kv_shape

from .common import (GB, Measurement, Row, chunked_forward, copy_bandwidth, free_memory, kv_bytes_per_token,
                     load_model, measured, one_chunk_gb, report_header, result_record, warm_up_predictor)

CAPACITY_START = 131072  # the capacity search doubles from here...
CAPACITY_STEP = 65536  # ...then bisects down to this granularity


def capacity_rows(model, predictor: ScorePredictor, ratio: float, *, cap: int, chunk: int, budget_s: float,
                  dense: str = "kvzip", start: int = CAPACITY_START,
                  step: int = CAPACITY_STEP) -> tuple[list[Row], dict]:
    """The longest context (batch 1, multiples of ``step`` up to ``cap``) that the model's GPU prefills with a dense
    cache, and with eviction at ``ratio`` by ``predictor``; prints one line per try.

    Tries, in this order, each catching `torch.cuda.OutOfMemoryError` and freeing memory afterwards:

    1. a real dense prefill of ``start`` tokens: the check of the stand-in below (compare the two peaks at ``start``);
    2. eviction (``prefill(predictor=p, ratio=ratio)``, real, the whole prefill): at ``cap`` first (the longest
       tries come first, so that the budget cuts the short ones); if it does not fit, bisection below it;
    3. dense (``dense``: ``"kvzip"``, a plain KVzipCache prefill, or ``"dynamic"``, DynamicCache + SDPA), through the
       last-chunk stand-in of `_dense_try`: doubling from ``start`` until a try fails, then bisection.

    A try starts only while ``budget_s`` seconds (from this call) are not spent; a try in flight is not interrupted.

    Returns:
        ``(rows, summary)``: one ``capacity-dense`` / ``capacity-evict`` row per try (``fits``, ``prefill_s``,
        ``peak_prefill_gb``, ``kv_gb``; eviction rows also ``bound_gb`` and ``chunk_gb`` as in `predictor_rows`) and
        the summary (longest fitting and shortest failing length of each, whether
        each search finished within the budget, the ratio of the two capacities, a memory-only projection).
    """
    began = time.perf_counter()
    deadline = began + budget_s
    rows: list[Row] = []
    longest_fit: list[tuple[int, Measurement]] = []
    kv_per_token = kv_bytes_per_token(model.config, model.dtype.itemsize)
    chunk_gb = one_chunk_gb(model, torch.randint(10, model.config.vocab_size, (1, chunk), device=model.device))

    def record(row: Row) -> bool:
        rows.append(row)
        print(_capacity_line(row), flush=True)
        free_memory()
        return bool(row.fits)

    def evict_fits(length: int) -> bool:
        row, m = _evict_try(model, predictor, ratio, length, chunk)
        row.chunk_gb, row.bound_gb = chunk_gb, m.before_gb + ratio * kv_per_token * length / GB + chunk_gb
        if row.fits:
            longest_fit.append((length, m))
        return record(row)

    record(_dense_try(model, start, chunk, dense, real=True))
    evict_ok, evict_bad, evict_done = longest(evict_fits, cap, cap, step, deadline)
    dense_ok, dense_bad, dense_done = longest(
        lambda length: record(_dense_try(model, length, chunk, dense, real=False)), start, cap, step, deadline)
    projected = None
    if longest_fit and torch.cuda.is_available():
        # Peak = allocated before + a constant + a per-token slope: scaling (peak - before) linearly through the
        # longest fitting try under-estimates the capacity when that try fitted (conservative). Never run.
        length, m = max(longest_fit, key=lambda item: item[0])
        total = torch.cuda.get_device_properties(0).total_memory / GB
        projected = int(length * (total - m.before_gb) / (m.peak_gb - m.before_gb))
    summary = {
        "ratio": ratio, "predictor": predictor.kind, "dense_cache": dense, "chunk": chunk, "start": start,
        "step": step, "cap": cap, "budget_s": budget_s, "seconds": time.perf_counter() - began,
        "dense_tokens": dense_ok, "dense_failed_at": dense_bad, "dense_search_complete": dense_done,
        "evict_tokens": evict_ok, "evict_failed_at": evict_bad, "evict_search_complete": evict_done,
        # eviction fits >= evict_tokens and dense fits < dense_failed_at, so the ratio of capacities is at least:
        "evict_vs_dense_at_least": evict_ok / dense_bad if dense_bad else None,
        "evict_projected_tokens": projected,
    }
    return rows, summary


def longest(fits: Callable[[int], bool], first: int, cap: int, step: int,
            deadline: float) -> tuple[int, int | None, bool]:
    """Longest length (<= ``cap``) for which ``fits(length)`` holds: doubling from ``first`` until a try fails or
    ``cap`` fits, then bisecting down to ``step``. No try starts after ``time.perf_counter()`` passes ``deadline``.

    Returns ``(longest that fitted (0: none), shortest that failed (None: none), whether the search finished)``.
    """
    ok, bad, length = 0, None, min(first, cap)
    while bad is None and ok < cap:
        if time.perf_counter() > deadline:
            return ok, bad, False
        if fits(length):
            ok, length = length, min(2 * length, cap)
        else:
            bad = length
    while bad is not None and bad - ok > step:
        if time.perf_counter() > deadline:
            return ok, bad, False
        mid = ok + max(step, (bad - ok) // 2 // step * step)
        if fits(mid):
            ok = mid
        else:
            bad = mid
    return ok, bad, True


def _oom_note(error: BaseException) -> str:
    return f"out of memory: {str(error).splitlines()[0][:200]}"


def _evict_try(model, predictor: ScorePredictor, ratio: float, length: int, chunk: int) -> tuple[Row, Measurement]:
    """A real evicting prefill of ``length`` random tokens (batch 1, protected prefix 16): its row and measurement."""
    ids = torch.randint(10, model.config.vocab_size, (1, length), device=model.device)
    cache = KVzipCache(model)
    row = Row("capacity-evict", length, 1, ratio)
    try:
        with measured() as m:
            cache.prefill(model, ids, context_start=16, chunk_size=chunk, predictor=predictor, ratio=ratio)
        row.fits, row.kv_gb = True, (cache.kv_bytes() + cache.metadata_bytes()) / GB
    except torch.cuda.OutOfMemoryError as error:
        row.fits = False
        row.notes.append(_oom_note(error))
    row.prefill_s, row.peak_prefill_gb = m.seconds, m.peak_gb
    return row, m


def _dense_try(model, length: int, chunk: int, kind: str, real: bool) -> Row:
    """One dense prefill of ``length`` random tokens (batch 1) into a plain KVzipCache (``kind="kvzip"``) or into a
    DynamicCache with SDPA attention (``"dynamic"``).

    ``real``: the whole chunked prefill. Otherwise a stand-in for it: every layer is given the keys and values of the
    first ``fill`` tokens (random, through `Cache.update`), and only the prefill's last chunk ``[fill, length)`` runs,
    for real. A dense prefill's memory only grows, and its last chunk holds the most KV, attends over the most keys
    and makes the largest transient copies (a growing layer's concatenation, SDPA's mask and GQA copies), so the last
    chunk's peak is the prefill's peak; the earlier chunks cost time (their attention grows with the square of the
    length), not memory. The stand-in's fresh tensors fragment the allocator less than a real prefill's growing
    layers do, so it can only overstate the dense capacity: the comparison favours the dense cache.
    """
    from transformers import DynamicCache

    config = model.config
    ids = torch.randint(10, config.vocab_size, (1, length), device=model.device)
    mask = torch.ones_like(ids)
    fill = 0 if real else (length - 1) // chunk * chunk  # where a chunked prefill's last chunk starts
    row = Row("capacity-dense", length, 1, notes=[f"{kind} cache, " + (
        "real prefill" if real else f"stand-in: {fill} random cached tokens, then the last {length - fill} for real")])
    model.set_attn_implementation("kvzip" if kind == "kvzip" else "sdpa")
    cache = KVzipCache(model) if kind == "kvzip" else DynamicCache(config=config)
    try:
        with measured() as m:
            if real and kind == "kvzip":
                cache.prefill(model, ids, context_start=16, chunk_size=chunk)
            else:
                if fill:
                    _fill_dense(cache, config, fill, model.dtype, model.device)
                chunked_forward(model, cache, ids, mask, chunk, start=fill)
        row.fits, row.kv_gb = True, kv_bytes_per_token(config, model.dtype.itemsize) * length / GB
    except torch.cuda.OutOfMemoryError as error:
        row.fits = False
        row.notes.append(_oom_note(error))
    finally:
        model.set_attn_implementation("kvzip")
    row.peak_prefill_gb = m.peak_gb
    if real:
        row.prefill_s = m.seconds
    else:
        row.notes.append(f"{m.seconds:.1f}s")
    return row


def _fill_dense(cache, config, length: int, dtype: torch.dtype, device) -> None:
    """Give every layer of ``cache`` the keys and values of ``length`` tokens (batch 1, random), via `Cache.update`."""
    num_heads, head_dim = kv_shape(config)
    for idx in range(config.num_hidden_layers):
        keys = torch.randn(1, num_heads, length, head_dim, dtype=dtype, device=device)
        cache.update(keys, torch.randn_like(keys), idx)
        del keys


def run_capacity(args) -> dict:
    """``--capacity``: `capacity_rows` for the model on one GPU, within ``--capacity-budget`` seconds (loading
    included); the result record with a ``"capacity"`` summary."""
    began = time.perf_counter()
    device = "cuda"
    dtype = getattr(torch, args.dtype)
    model = load_model(args.model, dtype, device, max_positions=args.capacity_max + args.prefill_chunk)
    model.set_attn_implementation("kvzip")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device)
    predictor = ScorePredictor.init(model, args.predictor or "mlp", seed=0).to(device)
    warm_up_predictor(model, predictor, device)
    ratio = min(args.ratios)
    print(f"weights {weight_bytes / GB:.1f} GB; capacity search: {args.capacity_dense} dense cache vs eviction at "
          f"ratio {ratio:g} ({predictor.kind} predictor), up to {args.capacity_max} tokens", flush=True)
    rows, summary = capacity_rows(model, predictor, ratio, cap=args.capacity_max, chunk=args.prefill_chunk,
                                  budget_s=args.capacity_budget - (time.perf_counter() - began),
                                  dense=args.capacity_dense)
    print(_capacity_summary(summary), flush=True)
    result = result_record(args, weight_bytes, bandwidth, rows)
    result["capacity"] = summary
    return result


def _capacity_line(row: Row) -> str:
    prefill = f"prefill {row.prefill_s:6.1f}s, " if row.prefill_s == row.prefill_s else ""  # stand-ins: in the notes
    bound = f" (bound {row.bound_gb:.1f})" if row.bound_gb == row.bound_gb else ""
    return (f"{row.method:14} ctx {row.context:>7} r {row.ratio:.1f}: {'fits' if row.fits else 'DOES NOT FIT'}, "
            f"{prefill}peak {row.peak_prefill_gb:6.1f} GB{bound}, KV {row.kv_gb:6.2f} GB; {'; '.join(row.notes)}")


def _capacity_summary(c: dict) -> str:
    def side(ok: int, bad: int | None, done: bool) -> str:
        upper = f"; {bad} did not" if bad else ""
        return f"{ok} tokens fit{upper}{'' if done else ' (search cut by the budget)'}"

    ratio, projected, dense_bad = c["evict_vs_dense_at_least"], c["evict_projected_tokens"], c["dense_failed_at"]
    projection = "n/a" if projected is None else f"~{projected} tokens"
    if projected is not None and dense_bad:
        projection += f" = {projected / dense_bad:.1f}x the shortest dense context that did not fit"
    dense = side(c["dense_tokens"], dense_bad, c["dense_search_complete"])
    evict = side(c["evict_tokens"], c["evict_failed_at"], c["evict_search_complete"])
    return (f"capacity: dense ({c['dense_cache']}) {dense}; eviction at ratio {c['ratio']:g} ({c['predictor']}) {evict}"
            f"{' (the cap)' if c['evict_tokens'] == c['cap'] else ''}; eviction / dense >= "
            f"{'n/a' if ratio is None else f'{ratio:.2f}'}; memory-only projection for eviction: {projection} "
            f"(not run); {c['seconds']:.0f}s")


def write_capacity_report(result: dict, out: Path) -> None:
    """``capacity.json`` and ``capacity.md`` (the summary line and one table row per try) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.json").write_text(json.dumps(result, indent=2))
    lines = report_header(result, "Prefill capacity") + [
        _capacity_summary(result["capacity"]),
        "",
        "| method | context | ratio | fits | prefill s | peak GB | bound GB | KV GB | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['context']} | {r['ratio']:.1f} | {'yes' if r['fits'] else 'no'} | "
            f"{r['prefill_s']:.1f} | {r['peak_prefill_gb']:.1f} | {r['bound_gb']:.1f} | {r['kv_gb']:.2f} | "
            f"{'; '.join(r['notes'])} |"
        )
    (out / "capacity.md").write_text("\n".join(lines) + "\n")

"""What page-granular serving would keep of KVzip's compression (issue #30, part 5).

Paged engines (vLLM, SGLang) store KV in pages of P consecutive positions. KVzip keeps (layer, KV head, position)
pairs. With real KVzip scores of the eval's contexts, this script measures, for every page size P:

- **round up**: every page (of one layer and KV head) holding at least one pair of the pair-level keep mask is kept
  whole: the fraction of the context's positions stored (pair granularity stores ``ratio``; no compression 1.0);
  also with pages shared by the KV heads of a layer, and by all layers and KV heads (vLLM's and SGLang's own layout,
  where P = 1 is SGLang's default token slot);
- **select pages**: pages ranked by the sum (``page-sum``) or the maximum (``page-max``) of their pair scores, one
  ranking per row over all layers, KV heads and pages, kept in that order while their positions fit the pair level's
  budget (`select_pages`): the overlap with KVzip's pair mask, and (``--answer``) the eval's answers from the cache
  evicted to those pages, beside pair-level KVzip at the same ratio and the full cache;
- **compact**: KVzip's own pairs, each (layer, KV head)'s kept pairs packed into ``ceil(kept / P)`` pages (what
  KV-Compress does after its per-KV eviction, and what this library's ragged segments become in pages): the slots
  allocated, as a fraction of the context's positions;
- the bytes of each layout (`layout_bytes`): this library's ragged store against the paged ones.

Pages are aligned to the first context position (the protected chat prefix before it is stored whole by every
layout and counted by none). One context at a time (batch 1), as the eval runs on the CPU.

    python scripts/page_granularity.py --model smollm2-135m --task needle --contexts 12 --answer
    python scripts/page_granularity.py --model qwen2.5-coder-0.5b --task squad --contexts 4
    python scripts/page_granularity.py --report docs/results/serving      # the tables of every saved run
    python scripts/page_granularity.py --smoke                            # one short context, ~30 s on 2 CPU cores

Each run appends one JSON line per context to ``<out>/<model>-<task>.jsonl`` (an interrupted run resumes: contexts
already there are skipped) and writes the summary to ``<out>/<model>-<task>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvzip_cache.selection import kept_count, select  # kept_count: the pair level's budget, round(ratio * n)

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "serving"
DEFAULT_PAGES = (16, 32, 64)
REDUCTIONS = ("sum", "max")
SHARING = {"layer_shared": (2,), "all_shared": (0, 2)}  # pages shared by a layer's KV heads / by all layers and heads
SERVING_DTYPE_BYTES = 2  # bf16/fp16 keys and values, what a GPU engine serves (the CPU runs score in fp32)
INDEX_BYTES = 4  # int32: a position, an offset, a block-table entry


# ------------------------------------------------------------------------------------------------------ page logic
def page_view(values: torch.Tensor, page: int, fill: float | bool) -> torch.Tensor:
    """``[..., C]`` -> ``[..., N, page]`` with ``N = ceil(C / page)``; the last page is padded with ``fill``."""
    length = values.shape[-1]
    pages = -(-length // page)
    pad = pages * page - length
    if pad:
        filler = torch.full((*values.shape[:-1], pad), fill, dtype=values.dtype, device=values.device)
        values = torch.cat([values, filler], dim=-1)
    return values.unflatten(-1, (pages, page))


def expand_pages(page_mask: torch.Tensor, page: int, length: int) -> torch.Tensor:
    """``[..., N]`` bool per page -> ``[..., length]`` bool per position (every position of a kept page)."""
    return page_mask.unsqueeze(-1).expand(*page_mask.shape, page).flatten(-2)[..., :length]


def page_sizes(selectable: torch.Tensor, page: int) -> torch.Tensor:
    """``[L, B, H, C]`` bool -> ``[L, B, H, N]`` int64: the selectable positions of each page (P, fewer for the last
    page, 0 for a page of a sliding layer or of padding)."""
    return page_view(selectable, page, False).sum(dim=-1)


def round_up(keep: torch.Tensor, selectable: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep whole every page that holds at least one kept pair.

    Args:
        keep: ``[L, B, H, C]`` bool, a pair-level keep mask.
        selectable: ``[L, B, H, C]`` bool, the pairs that may be kept.
        page: positions per page.

    Returns:
        ``(pairs [L, B, H, C] bool, pages [L, B, H, N] bool)``: the selectable pairs of the kept pages, and which
        pages are kept.
    """
    pages = page_view(keep & selectable, page, False).any(dim=-1)
    return expand_pages(pages, page, keep.shape[-1]) & selectable, pages


def shared_round_up(keep: torch.Tensor, selectable: torch.Tensor, page: int, dims: tuple[int, ...]) -> torch.Tensor:
    """`round_up` with pages shared along ``dims`` of ``[L, B, H, C]``: ``(2,)`` = one page holds every KV head of
    a layer; ``(0, 2)`` = every KV head of every layer (one block table for all layers, as vLLM and SGLang keep).
    A page is kept, in all the layers and heads that share it, when any of them keeps a pair in it.

    Returns:
        ``[L, B, H, C]`` bool, the selectable pairs stored.
    """
    shared = (keep & selectable).any(dim=dims[0], keepdim=True)
    for dim in dims[1:]:
        shared = shared.any(dim=dim, keepdim=True)
    return round_up(shared.expand_as(keep), selectable, page)[0]


def page_scores(scores: torch.Tensor, page: int, reduce: str) -> torch.Tensor:
    """``[L, B, H, C]`` pair scores (NaN = not selectable) -> ``[L, B, H, N]`` page scores: the sum (``"sum"``) or
    the maximum (``"max"``) over the page's selectable pairs; NaN for a page with none."""
    view = page_view(scores, page, float("nan"))
    valid = ~torch.isnan(view)
    if reduce == "sum":
        reduced = view.nan_to_num(0.0).sum(dim=-1)
    elif reduce == "max":
        reduced = view.nan_to_num(float("-inf")).amax(dim=-1)
    else:
        raise ValueError(f"unknown reduce {reduce!r}; choose one of {REDUCTIONS}")
    return reduced.masked_fill(~valid.any(dim=-1), float("nan"))


def select_pages(scores: torch.Tensor, ratio: float, page: int, reduce: str = "sum",
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Page-level selection under pair level's global budget.

    Per row: the budget is ``kept_count(ratio, n)`` positions (``n`` = the row's selectable pairs, over all layers
    and KV heads: as many as `kvzip_cache.selection.select_pairs` keeps). The row's pages of every (layer, KV head) are ranked
    together by `page_scores` (descending; ties: the earlier (layer, head, page) first, a stable sort as in
    `kvzip_cache.selection`), and the longest prefix of that ranking whose selectable positions sum to at most the
    budget is kept. Pages are whole except the last of each (layer, head), which counts its real positions. So the
    budget is met to within one page, never exceeded, and a (layer, head) may keep no page at all or all of them.

    Args:
        scores: ``[L, B, H, C]`` float, NaN = not selectable.
        ratio: fraction of the selectable pairs kept, in (0, 1].
        page: positions per page.
        reduce: ``"sum"`` or ``"max"`` (`page_scores`).

    Returns:
        ``(pairs [L, B, H, C] bool, pages [L, B, H, N] bool)``.
    """
    selectable = ~torch.isnan(scores)
    ranked = page_scores(scores, page, reduce)  # [L, B, H, N]
    sizes = page_sizes(selectable, page)  # [L, B, H, N]
    pages = torch.zeros_like(ranked, dtype=torch.bool)
    for row in range(scores.shape[1]):
        budget = kept_count(ratio, int(selectable[:, row].sum()))
        row_scores, row_sizes = ranked[:, row].flatten(), sizes[:, row].flatten()
        order = torch.sort(row_scores.nan_to_num(float("-inf")), descending=True, stable=True).indices
        fits = (row_sizes[order].cumsum(0) <= budget) & (row_sizes[order] > 0)  # a prefix of the ranking
        chosen = torch.zeros_like(row_sizes, dtype=torch.bool)
        chosen[order[fits]] = True
        pages[:, row] = chosen.view(ranked[:, row].shape)
    return expand_pages(pages, page, scores.shape[-1]) & selectable, pages


def compact_pages(keep: torch.Tensor, page: int) -> int:
    """Pages of ``page`` slots that hold the pairs of ``keep`` (``[L, B, H, C]`` bool) packed per (layer, row, KV
    head), whatever their positions: ``sum(ceil(kept / page))``."""
    kept = keep.sum(dim=-1)
    return int(((kept + page - 1) // page).sum())


def overlap(chosen: torch.Tensor, reference: torch.Tensor, scores: torch.Tensor) -> dict[str, float]:
    """How a keep mask compares with the reference (pair-level KVzip) mask; all ``[L, B, H, C]``.

    Returns:
        ``recall``: |chosen & reference| / |reference| (KVzip's pairs the pages keep); ``precision``: |chosen &
        reference| / |chosen|; ``kept``: |chosen| / |reference|; ``score_mass``: the chosen pairs' summed scores over
        the reference pairs' (pair level maximises that sum at its budget).
    """
    both = int((chosen & reference).sum())
    mass = lambda mask: float(scores.nan_to_num(0.0)[mask].sum())  # noqa: E731
    return {"recall": both / max(int(reference.sum()), 1), "precision": both / max(int(chosen.sum()), 1),
            "kept": int(chosen.sum()) / max(int(reference.sum()), 1),
            "score_mass": mass(chosen) / max(mass(reference), 1e-30)}


# ------------------------------------------------------------------------------------------------ memory accounting
def ragged_bytes(kept_pairs: int, num_layers: int, num_heads: int, head_dim: int,
                 dtype_bytes: int = SERVING_DTYPE_BYTES, rows: int = 1) -> int:
    """Bytes of `kvzip_cache.storage.CompressedContext` over ``num_layers`` layers: per kept pair a key and a value
    (``2 * head_dim * dtype_bytes``) and its int32 position; per layer ``rows * num_heads + 1`` int32 ``cu_seqlens``."""
    return kept_pairs * (2 * head_dim * dtype_bytes + INDEX_BYTES) + num_layers * (rows * num_heads + 1) * INDEX_BYTES


def paged_bytes(pages: int, page: int, head_dim: int, num_tables: int, dtype_bytes: int = SERVING_DTYPE_BYTES,
                slot_positions: bool = False) -> int:
    """Bytes of a paged store with one block table per (layer, KV head): per page ``page`` slots of key and value
    and its int32 block-table entry; per table (``num_tables`` = layers x KV heads x rows) an int32 length. With
    ``slot_positions`` (a compact layout, whose pages hold pairs of any positions), an int32 position per slot."""
    slot = 2 * head_dim * dtype_bytes + (INDEX_BYTES if slot_positions else 0)
    return pages * (page * slot + INDEX_BYTES) + num_tables * INDEX_BYTES


def dense_paged_bytes(length: int, page: int, num_layers: int, num_heads: int, head_dim: int,
                      dtype_bytes: int = SERVING_DTYPE_BYTES) -> int:
    """Bytes of an uncompressed context in a vLLM-style paged store: ``ceil(length / page)`` pages per layer, each
    holding every KV head, and one block table shared by all layers (an int32 per page)."""
    pages = -(-length // page)
    return num_layers * pages * num_heads * page * 2 * head_dim * dtype_bytes + pages * INDEX_BYTES


def layout_bytes(context: dict, dims: dict, dtype_bytes: int = SERVING_DTYPE_BYTES) -> dict[str, int]:
    """Bytes of one context's kept KV in each layout (the protected prefix left out of all), from a context record
    of `analyse_masks` and the model's ``dims`` (``layers``, ``kv_heads``, ``head_dim``)."""
    layers, heads, dim = dims["layers"], dims["kv_heads"], dims["head_dim"]
    length = context["positions"]
    out = {"dense": layers * heads * length * 2 * dim * dtype_bytes,
           "ragged pair": ragged_bytes(context["pair_kept"], layers, heads, dim, dtype_bytes)}
    for page in context["pages"]:
        stats = context["pages"][page]
        out[f"paged dense P={page}"] = dense_paged_bytes(length, int(page), layers, heads, dim, dtype_bytes)
        out[f"paged compact P={page}"] = paged_bytes(stats["compact_pages"], int(page), dim, layers * heads,
                                                     dtype_bytes, slot_positions=True)
        out[f"paged round-up P={page}"] = paged_bytes(stats["round_up_pages"], int(page), dim, layers * heads,
                                                      dtype_bytes)
        out[f"paged page-sum P={page}"] = paged_bytes(stats["sum"]["pages"], int(page), dim, layers * heads,
                                                      dtype_bytes)
    return out


def analyse_masks(scores: torch.Tensor, ratio: float, pages: list[int]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Every mask statistic of one context (batch 1) and the page-selected masks.

    Args:
        scores: ``[L, 1, H, C]`` KVzip scores, NaN = not selectable.
        ratio: the pair-level ratio.
        pages: page sizes.

    Returns:
        ``(record, masks)``: the JSON record (selectable pairs and positions, pair-level kept pairs, and per page
        size the round-up's stored fraction and pages, and per reduction the selected pages' stored fraction and
        `overlap`), and ``{"kvzip": pair mask, "page-sum P=16": ..., ...}``, each ``[L, 1, H, C]`` bool.
    """
    selectable = ~torch.isnan(scores)
    pair = select(scores, ratio, "pair")
    n = int(selectable.sum())
    record = {"selectable_pairs": n, "positions": int(selectable.any(dim=(0, 1, 2)).sum()),
              "compressible_layers": int(selectable.flatten(1).any(dim=1).sum()),
              "pair_kept": int(pair.sum()), "pages": {},
              "pair_kept_per_head": pair.sum(dim=(1, 3)).flatten().tolist()}  # [L * H], row-major (layer, head)
    masks = {"kvzip": pair}
    record["token"] = {f"{name}_fraction": int(shared_round_up(pair, selectable, 1, dims).sum()) / n
                       for name, dims in SHARING.items()}  # pages of one position (SGLang's default page_size)
    for page in pages:
        up_pairs, up_pages = round_up(pair, selectable, page)
        compact = compact_pages(pair, page)
        shared = {f"{name}_fraction": int(shared_round_up(pair, selectable, page, dims).sum()) / n
                  for name, dims in SHARING.items()}
        stats = {"round_up_fraction": int(up_pairs.sum()) / n, "round_up_pages": int(up_pages.sum()),
                 "compact_pages": compact, "compact_fraction": compact * page / n, **shared}
        for reduce in REDUCTIONS:
            chosen, chosen_pages = select_pages(scores, ratio, page, reduce)
            stats[reduce] = {"fraction": int(chosen.sum()) / n, "pages": int(chosen_pages.sum()),
                             **overlap(chosen, pair, scores)}
            masks[f"page-{reduce} P={page}"] = chosen
        record["pages"][str(page)] = stats
    return record, masks


# -------------------------------------------------------------------------------------------------------- the model
def model_dims(model) -> dict[str, int]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    return {"layers": config.num_hidden_layers, "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads}


def score_context(model, tokenizer, text: str):
    """Prefill ``text`` as the eval does (`encode_contexts`, batch 1) and score it with KVzip at ratio 1.0, which
    rates every pair and evicts none (the layers become ragged, holding every pair). Returns the cache."""
    from kvzip_cache import KVzipCache
    from kvzip_cache.templates import encode_contexts

    device = next(model.parameters()).device
    ids, mask, starts = (t.to(device) for t in encode_contexts(tokenizer, [text]))
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=starts)
    cache.compress(model, 1.0, tokenizer=tokenizer)
    return cache


def ask(model, tokenizer, cache, task: str, context, masks: dict[str, torch.Tensor | None]) -> list[dict]:
    """The eval's answers (`kvzip_cache.eval.runner.answer`, greedy, the task's prompt and length) to every question
    of ``context``, from a copy of ``cache`` evicted to each mask (None: every pair, the full cache)."""
    from kvzip_cache.eval.runner import answer
    from kvzip_cache.eval.tasks import question_prompt, score, task_max_new_tokens

    rows = []
    for method, mask in masks.items():
        evicted = copy.deepcopy(cache)
        if mask is not None:
            evicted.evict(mask)
        for question in context.questions:
            prediction = answer(model, tokenizer, evicted, question_prompt(task, question.question),
                                task_max_new_tokens(task))
            rows.append({"method": method, "question_id": question.qid, "answers": question.answers,
                         "prediction": prediction, "scores": score(task, prediction, question.answers)})
        del evicted
    return rows


# -------------------------------------------------------------------------------------------------------- summaries
def spread(values: list[float]) -> dict[str, float]:
    """Mean, standard deviation, min and max over contexts, and the bootstrap interval of the mean (contexts
    resampled)."""
    from kvzip_cache.eval.stats import bootstrap_interval

    lo, hi = bootstrap_interval(values)
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "lo": lo, "hi": hi, "n": len(values)}


def summarise(records: list[dict], dims: dict, config: dict) -> dict:
    """The run's summary: per page size the round-up's stored fraction, the page selections' fraction and overlap
    (`spread` over contexts), the bytes per layout (means over contexts), and the answers' cells and paired
    differences (contexts resampled) when questions were asked."""
    from kvzip_cache.eval.stats import cluster_bootstrap_interval, paired_difference

    ratio = config["ratio"]
    pages = [str(p) for p in config["pages"]]
    contexts = [r for r in records if r.get("kind") == "context"]
    summary = {"model": config["model"], "task": config["task"], "ratio": ratio, "dims": dims, "config": config,
               "contexts": len(contexts), "positions": spread([c["positions"] for c in contexts]), "pages": {}}
    for page in pages:
        entry = {key: spread([c["pages"][page][key] for c in contexts])
                 for key in ("round_up_fraction", "compact_fraction", "layer_shared_fraction", "all_shared_fraction")}
        for reduce in REDUCTIONS:
            entry[reduce] = {key: spread([c["pages"][page][reduce][key] for c in contexts])
                             for key in ("fraction", "recall", "precision", "score_mass")}
        summary["pages"][page] = entry
    summary["token"] = {key: spread([c["token"][key] for c in contexts]) for key in contexts[0]["token"]}
    layouts = [layout_bytes(c, dims) for c in contexts]
    summary["bytes_bf16"] = {name: statistics.fmean(b[name] for b in layouts) for name in layouts[0]}
    summary["bytes_per_kvzip_pair_bf16"] = {
        name: statistics.fmean(b[name] / c["pair_kept"] for b, c in zip(layouts, contexts)) for name in layouts[0]}
    answers = [r for r in records if r.get("kind") == "answer"]
    if answers:
        metrics = sorted({m for r in answers for m in r["scores"]})
        methods = list(dict.fromkeys(r["method"] for r in answers))
        by = {(r["method"], r["context_id"], r["question_id"]): r["scores"] for r in answers}
        keys = sorted({(r["context_id"], r["question_id"]) for r in answers})
        summary["answers"] = {"questions": len(keys), "contexts": len({cid for cid, _ in keys}), "cells": {},
                              "paired": {}}
        for metric in metrics:
            for method in methods:
                mine = [(k, by[(method, *k)][metric]) for k in keys if (method, *k) in by]
                values = [v for _, v in mine]
                lo, hi = cluster_bootstrap_interval(values, [k[0] for k, _ in mine])
                summary["answers"]["cells"][f"{method} | {metric}"] = {
                    "mean": statistics.fmean(values), "lo": lo, "hi": hi, "n": len(values)}
                for reference in ("kvzip", "full"):
                    if method == reference:
                        continue
                    shared = [k for k in keys if (method, *k) in by and (reference, *k) in by]
                    mean, lo, hi = paired_difference([by[(method, *k)][metric] for k in shared],
                                                     [by[(reference, *k)][metric] for k in shared],
                                                     [k[0] for k in shared])
                    summary["answers"]["paired"][f"{method} - {reference} | {metric}"] = {
                        "mean": mean, "lo": lo, "hi": hi, "n": len(shared)}
    return summary


def _pm(s: dict, digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def markdown(summaries: list[dict]) -> str:
    """The tables of one or more run summaries (`summarise`)."""
    pages = sorted({p for s in summaries for p in s["pages"]}, key=int)
    lines = ["### Stored fraction of the context's positions (mean ± sd over contexts [min, max])", "",
             "pair = KVzip's pairs in the ragged store (the ratio); compact = the same pairs packed per (layer, KV "
             "head) into pages (slots allocated); round up = every page holding a kept pair kept whole, the page "
             "owned by one (layer, KV head), by all KV heads of a layer, or by all layers and KV heads (vLLM's and "
             "SGLang's layout; P = 1 is SGLang's default token slot). Saving kept = (1 - stored) / (1 - ratio), for "
             "compact / round up per (layer, head).", "",
             "| model | task | contexts | P | pair | compact | round up: (layer, head) | layer | all | saving kept |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        t = s["token"]
        lines.append(f"| {s['model']} | {s['task']} | {s['contexts']} | 1 | {s['ratio']:g} | {s['ratio']:g} | "
                     f"{s['ratio']:g} | {_pm(t['layer_shared_fraction'])} | {_pm(t['all_shared_fraction'])} | |")
        for p in pages:
            e = s["pages"][p]
            up, compact = e["round_up_fraction"], e["compact_fraction"]
            kept = " / ".join(f"{(1 - f['mean']) / (1 - s['ratio']):.0%}" for f in (compact, up))
            lines.append(f"| {s['model']} | {s['task']} | {s['contexts']} | {p} | {s['ratio']:g} | {_pm(compact)} | "
                         f"{_pm(up)} [{up['min']:.3f}, {up['max']:.3f}] | {_pm(e['layer_shared_fraction'])} | "
                         f"{_pm(e['all_shared_fraction'])} | {kept} |")
    lines += ["", "### Select pages under the same budget: overlap with pair-level KVzip (mean ± sd over contexts)",
              "", "recall = share of KVzip's kept pairs that the selected pages hold; score mass = the selected "
              "pairs' summed KVzip scores over the KVzip pairs'; stored = fraction of positions kept.", "",
              "| model | task | P | page-sum stored | page-sum recall | page-sum score mass | page-max recall | "
              "page-max score mass |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        for p in pages:
            e = s["pages"][p]
            lines.append(f"| {s['model']} | {s['task']} | {p} | {_pm(e['sum']['fraction'])} | "
                         f"{_pm(e['sum']['recall'])} | {_pm(e['sum']['score_mass'])} | {_pm(e['max']['recall'])} | "
                         f"{_pm(e['max']['score_mass'])} |")
    lines += ["", "### Bytes of the kept context KV, bf16 (mean over contexts; prefix excluded)", "",
              "| model | task | layout | MiB | vs dense | bytes per KVzip-kept pair |", "|---|---|---|---:|---:|---:|"]
    for s in summaries:
        dense = s["bytes_bf16"]["dense"]
        for name, value in s["bytes_bf16"].items():
            lines.append(f"| {s['model']} | {s['task']} | {name} | {value / 2**20:.2f} | {value / dense:.3f} | "
                         f"{s['bytes_per_kvzip_pair_bf16'][name]:.1f} |")
    with_answers = [s for s in summaries if "answers" in s]
    if with_answers:
        lines += ["", "### Answers (95% intervals resample contexts)", "",
                  "| model | task | questions / contexts | method | metric | mean [95%] | − kvzip [95%] | "
                  "− full [95%] |",
                  "|---|---|---|---|---|---:|---:|---:|"]
        for s in with_answers:
            a = s["answers"]
            for key, cell in a["cells"].items():
                method, metric = key.split(" | ")
                diffs = []
                for reference in ("kvzip", "full"):
                    d = a["paired"].get(f"{method} - {reference} | {metric}")
                    diffs.append("" if d is None else f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]")
                lines.append(f"| {s['model']} | {s['task']} | {a['questions']} / {a['contexts']} | {method} | "
                             f"{metric} | {cell['mean']:.3f} [{cell['lo']:.3f}, {cell['hi']:.3f}] | "
                             + " | ".join(diffs) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------- run
def read_records(path: Path) -> list[dict]:
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interrupted run
                continue
    return records


def run(args: argparse.Namespace) -> dict:
    """Score the task's contexts, write every record and the summary, print the tables; returns the summary."""
    import kvzip_cache  # noqa: F401  (registers the kvzip attention)
    from kvzip_cache.eval.tasks import load_task
    from kvzip_cache.zoo.loading import load_model

    torch.set_num_threads(args.threads)
    config = {"model": args.model, "task": args.task, "ratio": args.ratio, "pages": args.pages,
              "context_tokens": args.context_tokens, "seed": args.seed, "answer": args.answer,
              "max_questions": args.max_questions}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.model}-{args.task}.jsonl"
    records = read_records(path)
    for record in records:
        if record.get("config") not in (None, config):
            raise SystemExit(f"{path} holds a run with another configuration ({record['config']}); use another --out")
    done = {r["context_id"] for r in records if r.get("kind") == "context"}

    began = time.perf_counter()
    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    dims = model_dims(model)
    contexts = load_task(args.task, tokenizer, args.contexts, args.context_tokens, args.max_questions, args.seed)
    print(f"loaded {args.model} {dims} and {len(contexts)} {args.task} contexts in {time.perf_counter() - began:.1f}s",
          flush=True)
    with path.open("a") as handle:
        for context in contexts:
            if context.cid in done:
                continue
            if args.max_minutes and time.perf_counter() - began > 60 * args.max_minutes:
                print(f"--max-minutes {args.max_minutes} reached: stopping before {context.cid}", flush=True)
                break
            if args.max_questions is not None:  # load_task caps squad's questions, not the needle task's 3
                context.questions = context.questions[: args.max_questions]
            started = time.perf_counter()
            cache = score_context(model, tokenizer, context.text)
            scored = time.perf_counter() - started
            record, masks = analyse_masks(cache.scores.cpu(), args.ratio, args.pages)
            answers = []
            if args.answer:
                answers = ask(model, tokenizer, cache, args.task, context, {"full": None, **masks})
            seconds = time.perf_counter() - started
            rows = [{"kind": "context", "context_id": context.cid, "config": config, **record,
                     "score_seconds": scored, "seconds": seconds}]
            rows += [{"kind": "answer", "context_id": context.cid, "config": config, **a} for a in answers]
            for row in rows:
                handle.write(json.dumps(row) + "\n")
            handle.flush()
            records += rows
            p = str(args.pages[0])
            kvzip = [next(iter(a["scores"].values())) for a in answers if a["method"] == "kvzip"]  # first metric
            print(f"{context.cid}: {record['positions']} positions, scored in {scored:.1f}s, total {seconds:.1f}s; "
                  f"round-up P={p} stores {record['pages'][p]['round_up_fraction']:.3f}"
                  + (f"; kvzip {statistics.fmean(kvzip):.2f}" if kvzip else ""), flush=True)
            del cache
    records = [r for r in records if r.get("config") in (None, config)]
    if not any(r.get("kind") == "context" for r in records):
        raise SystemExit("no context was scored")
    summary = summarise(records, dims, config)
    summary["seconds_total"] = time.perf_counter() - began
    (out / f"{args.model}-{args.task}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(markdown([summary]))
    return summary


def report(folder: Path) -> str:
    """The tables of every summary saved in ``folder`` (smollm2 first, needle before squad)."""
    summaries = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    summaries.sort(key=lambda s: (not s["model"].startswith("smollm2"), s["model"], s["task"]))
    return markdown(summaries)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a PyPI short name (kvzip_cache.zoo.PYPI_MODELS)")
    parser.add_argument("--task", default="needle", help="needle or squad (any built-in eval task)")
    parser.add_argument("--contexts", type=int, default=4, help="contexts of the task (the eval's, in order)")
    parser.add_argument("--pages", type=int, nargs="+", default=list(DEFAULT_PAGES), help="page sizes P")
    parser.add_argument("--ratio", type=float, default=0.3, help="pair-level ratio (fraction of pairs kept)")
    parser.add_argument("--context-tokens", type=int, default=1500)
    parser.add_argument("--max-questions", type=int, default=None, help="questions per context (squad: default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--answer", action="store_true",
                        help="also ask every question from the full cache, pair-level KVzip and each page selection")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no new context after this many minutes (the summary covers those done)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--report", metavar="FOLDER", default=None,
                        help="print the tables of every summary saved in FOLDER and exit")
    parser.add_argument("--smoke", action="store_true",
                        help="SmolLM2, one 300-token needle context, P=16, answers, into a temporary folder")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.task, args.contexts, args.context_tokens, args.pages = "smollm2-135m", "needle", 1, 300, [16]
        args.answer, args.max_questions, args.out = True, 1, tempfile.mkdtemp(prefix="page_granularity_")
    if any(p < 1 for p in args.pages) or not 0.0 < args.ratio <= 1.0:
        parser.error(f"--pages must be >= 1 and --ratio in (0, 1]; got {args.pages}, {args.ratio}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report:
        print(report(Path(args.report)))
        return
    run(args)


if __name__ == "__main__":
    sys.exit(main())

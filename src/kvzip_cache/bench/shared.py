"""Many questions, one context: shared-context decoding and compile reuse on a GPU.

    python -m kvzip_cache.bench --shared 16 --contexts 131072 --ratios 0.3 --out DIR
    python -m kvzip_cache.bench --shared 64 --contexts 32768 --ratios 0.3 --compile-reuse --out DIR

For every context length, one compressed context (a plain prefill, then ``compress(predictor=p)`` with a random-weight
`ScorePredictor`: the speed and memory of decoding do not depend on which pairs are kept), made static and decoded
with ``torch.compile(model.forward, mode="reduce-overhead")`` (CUDA graphs), one row per method:

- ``single``: one question (batch 1), the baseline step;
- ``shared``: ``--shared`` questions at once through ``inputs_for(..., shared=True)``: the context is stored once and
  each decode step reads it once for all rows;
- ``per-row``: the same batch, the context read once per row (the "triton-per-row" backend: how the kernels read a
  repeated context before the shared path); its memory is the shared layout's;
- ``sequential``: the questions one after another on the single-question cache (derived: ``--shared`` x the single
  step, tokens/s = 1000 / single ms).

KV GB is `KVzipCache.kv_bytes` (the context plus every row's static tail), ``of it context GB`` the kept context
alone (`context_kv_bytes`: what every row reads, once); ``copied KV GB`` is what a cache holding one copy of the
context per question would keep (computed: ``--shared`` x the single row's KV).

``--compile-reuse`` also times the first and a warm ``model.generate`` on two documents of different lengths in one
length bucket (`length_bucket`), each made static the same way, and counts the graphs dynamo compiles for each
(``--shared 0 --compile-reuse``: only those rows).
"""

from __future__ import annotations

import copy
import gc
import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..backends import use_backend
from ..cache import KVzipCache
from ..compat import cache_kwarg
from ..scorers.predictor import ScorePredictor
from .common import (GB, compiled_forward, copy_bandwidth, load_model, machine_record, question_step, report_header,
                     timed_steps, warm_up)


@dataclass
class SharedRow:
    method: str  # single | shared | per-row | sequential | generate-doc1 | generate-doc2
    context: int
    questions: int
    ratio: float
    step_ms: float = float("nan")
    tokens_per_s: float = float("nan")
    kv_gb: float = float("nan")
    context_kv_gb: float = float("nan")  # the kept context alone (read once for all rows); kv_gb - this: the tails
    copied_kv_gb: float = float("nan")
    compile_s: float = float("nan")
    first_call_s: float = float("nan")
    warm_call_s: float = float("nan")
    new_graphs: int = -1
    notes: list[str] = field(default_factory=list)


def _room(args) -> int:
    """Static tail room: the question, the decoded tokens and a little slack."""
    return args.question_tokens + args.decode_steps + 8


def _static_copy(base: KVzipCache, model, questions: int, room: int, tokens: int) -> tuple[KVzipCache, torch.Tensor]:
    """A static copy of the compressed ``base`` laid out for ``questions`` shared rows, and their question ids."""
    cache = copy.deepcopy(base)
    ask = torch.randint(10, model.config.vocab_size, (questions, tokens), device=model.device)
    cache.inputs_for(ask, shared=True)
    cache.make_static(room)
    return cache, ask


def _decode_row(model, base, method: str, questions: int, args, single: SharedRow | None) -> tuple[SharedRow, list]:
    """Compile, then time ``--decode-steps`` one-token steps of a static copy of ``base`` (CUDA graphs)."""
    context = base.context_length
    room = _room(args)
    cache, ask = _static_copy(base, model, questions, room, args.question_tokens)
    row = SharedRow(method, context, questions, args.ratios[-1], kv_gb=cache.kv_bytes() / GB,
                    context_kv_gb=context_kv_bytes(cache) / GB)
    with use_backend("triton-per-row") if method == "per-row" else nullcontext():
        forward = compiled_forward(model)
        token, position = question_step(model, cache, ask, context)
        began = time.perf_counter()
        timed_steps(forward, model, cache, token, position, 1, warmup=2)
        row.compile_s = time.perf_counter() - began
        cache.rollback()
        token, position = question_step(model, cache, ask, context)
        row.step_ms, tokens = timed_steps(forward, model, cache, token, position, args.decode_steps, warmup=0)
    row.tokens_per_s = questions * 1e3 / row.step_ms
    if single is not None:
        row.copied_kv_gb = questions * single.kv_gb
        tails, single_tail = row.kv_gb - row.context_kv_gb, single.kv_gb - single.context_kv_gb
        row.notes.append(f"{row.step_ms / single.step_ms:.2f}x the single step, KV {row.kv_gb / single.kv_gb:.3f}x "
                         f"one row's = context {row.context_kv_gb / single.context_kv_gb:.3f}x one row's context + "
                         f"{questions} tails of {single_tail * 1e3:.1f} MB ({tails:.2f} GB)")
    del cache, forward
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    return row, tokens


def _compiled_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _generate_calls(model, cache: KVzipCache, ask: torch.Tensor, steps: int) -> tuple[float, float, int]:
    """(first generate s, warm generate s, graphs compiled during the first) on a static cache."""
    inputs = cache.inputs_for(ask, shared=True)
    timings, graphs = [], 0
    for call in range(2):
        before = _compiled_graphs()
        torch.cuda.synchronize()
        began = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, **{cache_kwarg(model): cache}, max_new_tokens=steps, min_new_tokens=steps,
                           do_sample=False)
        torch.cuda.synchronize()
        timings.append(time.perf_counter() - began)
        if call == 0:
            graphs = _compiled_graphs() - before
        cache.rollback()
    return timings[0], timings[1], graphs


def compile_reuse_rows(model, predictor: ScorePredictor, context: int, args) -> list[SharedRow]:
    """Two documents in one length bucket, each compressed and made static, answered with ``model.generate``."""
    rows = []
    room = _room(args)
    torch._dynamo.reset()
    for doc, length in enumerate((context, context - context // 8), start=1):  # both in length_bucket(context)
        ids = torch.randint(10, model.config.vocab_size, (1, length), device=model.device)
        cache = KVzipCache(model)
        cache.prefill(model, ids, context_start=16, chunk_size=args.prefill_chunk)
        cache.compress(model, args.ratios[-1], predictor=predictor)
        ask = torch.randint(10, model.config.vocab_size, (1, args.question_tokens), device=model.device)
        cache.make_static(room)
        row = SharedRow(f"generate-doc{doc}", length, 1, args.ratios[-1], kv_gb=cache.kv_bytes() / GB)
        row.first_call_s, row.warm_call_s, row.new_graphs = _generate_calls(model, cache, ask, args.decode_steps)
        row.notes.append(f"first call {row.first_call_s / row.warm_call_s:.2f}x the warm one")
        rows.append(row)
        del cache
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def run_shared(args) -> dict:
    device, dtype = "cuda", getattr(torch, args.dtype)
    model = load_model(args.model, dtype, device, max_positions=max(args.contexts) + 4096)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device)
    predictor = ScorePredictor.init(model, "mlp", seed=0).to(device)
    warm_up(model, device, predictor)
    torch._dynamo.config.cache_size_limit = 64
    rows: list[SharedRow] = []

    def record(row: SharedRow) -> None:
        rows.append(row)
        print(f"{row.method:14} ctx {row.context:>6} q {row.questions:>3}: step {row.step_ms:6.2f} ms "
              f"{row.tokens_per_s:8.1f} tok/s KV {row.kv_gb:6.2f} GB compile {row.compile_s:5.1f}s "
              f"first {row.first_call_s:6.1f}s warm {row.warm_call_s:6.2f}s graphs {row.new_graphs} "
              f"{'; '.join(row.notes)}", flush=True)

    for context in args.contexts:
        if args.compile_reuse:
            torch._logging.set_logs(recompiles=True)  # the guard that failed, if a document recompiles
            for row in compile_reuse_rows(model, predictor, context, args):
                record(row)
            torch._logging.set_logs(recompiles=False)
        if 0 in args.shared:  # --shared 0: the compile-reuse rows only
            continue
        ids = torch.randint(10, model.config.vocab_size, (1, context), device=device)
        base = KVzipCache(model)
        base.prefill(model, ids, context_start=16, chunk_size=args.prefill_chunk)
        base.compress(model, args.ratios[-1], predictor=predictor)
        single, single_tokens = _decode_row(model, base, "single", 1, args, None)
        record(single)
        for questions in args.shared:
            shared, _ = _decode_row(model, base, "shared", questions, args, single)
            record(shared)
            per_row, _ = _decode_row(model, base, "per-row", questions, args, single)
            record(per_row)
            sequential = SharedRow("sequential", context, questions, args.ratios[-1], step_ms=single.step_ms,
                                   tokens_per_s=1e3 / single.step_ms, kv_gb=single.kv_gb,
                                   notes=["derived: one question at a time at the single step"])
            record(sequential)
        del base
        gc.collect()
        torch.cuda.empty_cache()
    return {"machine": machine_record(), "model": args.model, "dtype": args.dtype, "weights_gb": weight_bytes / GB,
            "copy_bandwidth_tbps": bandwidth / 1e12, "rows": [asdict(r) for r in rows]}


def context_kv_bytes(cache: KVzipCache) -> int:
    """Bytes of the kept context pairs (with fp8 scales), without the tails and the sliding layers' windows."""
    return sum(layer.context.kv_bytes() for layer in cache.layers if getattr(layer, "context", None) is not None)


def write_shared_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "shared.json").write_text(json.dumps(result, indent=2))
    lines = report_header(result, "Many questions, one context") + [
        "| method | context | questions | ratio | ms/step | tokens/s | KV GB | of it context GB | copied KV GB "
        "| compile s | first generate s | warm generate s | graphs compiled | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['context']} | {r['questions']} | {r['ratio']} | {r['step_ms']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['kv_gb']:.2f} | {r.get('context_kv_gb', float('nan')):.2f} | "
            f"{r['copied_kv_gb']:.2f} | {r['compile_s']:.1f} | "
            f"{r['first_call_s']:.1f} | {r['warm_call_s']:.2f} | {r['new_graphs']} | {'; '.join(r['notes'])} |"
        )
    text = "\n".join(lines)
    for _ in range(2):  # twice: adjacent empty cells share a "|"
        text = text.replace("| nan |", "| - |").replace("| -1 |", "| - |")
    (out / "shared.md").write_text(text + "\n")

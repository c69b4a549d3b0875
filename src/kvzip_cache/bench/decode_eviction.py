"""Long answers: KV memory and decode speed with and without eviction while decoding, on a GPU.

    python -m kvzip_cache.bench --decode-eviction off on --contexts 32768 --ratios 0.3 --new-tokens 8192 \\
        --out docs/benchmarks/h200/decode_eviction

One context per ``--contexts`` length (random ids), prefilled and compressed to the smallest ``--ratios`` with a
random-weight `ScorePredictor` (speed and memory do not depend on which pairs are kept, nor on trained weights), then
answered by one plain ``model.generate`` of exactly ``--new-tokens`` greedy tokens (batch 1, eager), once per mode:

- ``off``: everything after the context stays in the tail (what KVzip alone does);
- ``on``: ``cache.evict_while_decoding(model, predictor, ratio, window=--window)`` with the same ratio: every
  ``window`` tokens the oldest tail window is scored and only ``ratio`` of its pairs are kept (they join the ragged
  store's reserved room in place, O(pairs kept), with a rebuild, O(context), a logarithmic number of times);
- ``off-compiled`` / ``on-compiled``: a copy of the compressed cache made static (`KVzipCache.make_static`, room for
  the question and ``--new-tokens``), so that ``generate`` compiles its decode steps (CUDA graphs); ``on-compiled``
  turns eviction on first (``level="pair-uniform"``, which a static tail needs) and passes
  ``cache.eviction_criteria()``: evictions pack the kept pairs into the fixed tail between steps, O(window). A short
  generate first pays the compilation, outside the measurement.

A stopping criterion that never stops takes the time after every step (synchronised) and, every ``--sample-every``
tokens, the cache's `KVzipCache.kv_bytes` and the GPU memory allocated. It also notes which steps ran an eviction,
so that a row separates the steady step (median of the steps that evicted nothing) from the cost of an eviction.

``--repeats N`` runs the modes alternately N times on one compressed context (off, on, off, on, ...; rolled back in
between): eager decoding is bound by the host, and two processes, or two minutes apart, can differ by a few percent,
so a difference between the modes counts only where it exceeds the spread between repeats of one mode.

Each mode writes ``decode_eviction_<mode>.json`` under ``--out``, so modes can also run in separate processes;
``decode_eviction.md`` and ``decode_eviction.png`` are rebuilt from every such file there
(``python -m kvzip_cache.bench.decode_eviction --report DIR`` rebuilds them without a GPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..cache import KVzipCache
from ..compat import cache_kwarg
from ..scorers.predictor import ScorePredictor
from .common import (GB, copy_bandwidth, cudagraph_skips, free_memory, load_model, machine_record, peak_gb,
                     report_header, reset_peak, skip_note, warm_up)

MODES = ("off", "on", "off-compiled", "on-compiled")
CONTEXT_START = 16  # the protected prefix of the random context
STEP_BIN = 256  # steps per mean in a row's bin_means_ms
SLOWEST_STEPS = 24  # how many of the slowest steps a row lists


@dataclass
class DecodeRow:
    mode: str  # one of MODES
    context: int
    ratio: float  # the context's compression ratio (and, with "on", the generated tokens' too)
    window: int
    new_tokens: int
    repeat: int = 0  # which of the --repeats alternations
    generate_s: float = float("nan")
    ms_per_token: float = float("nan")  # generate_s / new_tokens: every step, evicting ones included
    median_step_ms: float = float("nan")
    max_step_ms: float = float("nan")
    last_1k_ms_per_token: float = float("nan")  # the last 1,024 steps: where the tail is longest without eviction
    steady_median_ms: float = float("nan")  # median of the steps that ran no eviction
    eviction_step_ms: float = float("nan")  # mean of the steps that ran one (NaN: none did)
    context_kv_gb: float = float("nan")  # kv_bytes() of the compressed context, before generating
    end_kv_gb: float = float("nan")  # kv_bytes() after the last token
    max_kv_gb: float = float("nan")  # the largest sampled kv_bytes()
    end_allocated_gb: float = float("nan")  # GPU memory allocated after the last token, weights included
    peak_generate_gb: float = float("nan")  # peak GPU memory allocated during generate
    evictions: int = 0
    tail_tokens: int = 0  # tokens left in the tail at the end
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (tokens generated, kv GB, allocated GB)
    # where the time went, step by step (JSON only): the mean step of every STEP_BIN steps, and the slowest steps
    bin_means_ms: list[float] = field(default_factory=list)
    slowest_steps: list[tuple[int, float, bool]] = field(default_factory=list)  # (step, ms, ran an eviction)
    notes: list[str] = field(default_factory=list)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _allocated_gb() -> float:
    """GPU GB allocated now (NaN without CUDA: the CPU smoke test)."""
    return torch.cuda.memory_allocated() / GB if torch.cuda.is_available() else float("nan")


class _StepClock(StoppingCriteria):
    """Never stops; records the time after every decode step, whether that step ran an eviction, and, every
    ``every`` steps, the cache's KV GB."""

    def __init__(self, cache: KVzipCache, every: int) -> None:
        self.cache, self.every = cache, every
        self.times: list[float] = []
        self.evicted: list[bool] = []  # per step
        self._seen = 0  # evictions so far, as of the last step
        self.curve: list[tuple[int, float, float]] = []

    def _evictions(self) -> int:
        eviction = self.cache.decode_eviction
        return 0 if eviction is None else len(eviction.history)

    def start(self) -> None:
        _sync()
        self.times, self.evicted, self._seen = [time.perf_counter()], [], self._evictions()
        self.curve = [(0, self.cache.kv_bytes() / GB, _allocated_gb())]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        _sync()
        self.times.append(time.perf_counter())
        seen = self._evictions()
        self.evicted.append(seen > self._seen)
        self._seen = seen
        steps = len(self.times) - 1
        if steps % self.every == 0:
            self.curve.append((steps, self.cache.kv_bytes() / GB, _allocated_gb()))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_row(model, predictor: ScorePredictor, base: KVzipCache, mode: str, args, repeat: int = 0) -> DecodeRow:
    """Generate ``args.new_tokens`` tokens after the compressed ``base`` (rolled back afterwards) in ``mode``; a
    compiled mode decodes a static copy of it (freed afterwards)."""
    ratio = min(args.ratios)
    row = DecodeRow(mode, base.context_length, ratio, args.window, args.new_tokens, repeat,
                    context_kv_gb=base.kv_bytes() / GB)
    question = torch.randint(10, model.config.vocab_size, (1, args.question_tokens), device=model.device)
    hooks, skips = [], cudagraph_skips()  # (counted from before the warm-up, which compiles)
    if mode.endswith("compiled"):
        base = copy.deepcopy(base)
        if mode == "on-compiled":
            base.evict_while_decoding(model, predictor, ratio, window=args.window, level="pair-uniform")
            hooks = [base.eviction_criteria()]
        base.make_static(args.question_tokens + args.new_tokens)
        row.notes.append(f"static tail room {base.layers[base.compressible_layers[0]].tail_keys.shape[2]}")
        with torch.no_grad():  # compile the decode step (and record its CUDA graph) outside the measurement
            model.generate(**base.inputs_for(question), **{cache_kwarg(model): base}, max_new_tokens=4,
                           do_sample=False, stopping_criteria=StoppingCriteriaList(list(hooks)))
        base.rollback()
    elif mode == "on":
        base.evict_while_decoding(model, predictor, ratio, window=args.window)
    inputs = base.inputs_for(question)
    clock = _StepClock(base, args.sample_every)
    free_memory()
    reset_peak()
    clock.start()
    with torch.no_grad():  # the eviction hook runs before the clock: an eviction counts in the step before it
        out = model.generate(**inputs, **{cache_kwarg(model): base}, max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([*hooks, clock]))
    _sync()
    steps = [1e3 * (b - a) for a, b in zip(clock.times, clock.times[1:])]
    row.generate_s = clock.times[-1] - clock.times[0]
    row.ms_per_token = 1e3 * row.generate_s / len(steps)
    row.median_step_ms, row.max_step_ms = statistics.median(steps), max(steps)
    row.last_1k_ms_per_token = statistics.mean(steps[-1024:])
    row.steady_median_ms = statistics.median(t for t, evicted in zip(steps, clock.evicted) if not evicted)
    evicting = [t for t, evicted in zip(steps, clock.evicted) if evicted]
    row.eviction_step_ms = statistics.mean(evicting) if evicting else float("nan")
    row.bin_means_ms = [round(statistics.mean(steps[i : i + STEP_BIN]), 3) for i in range(0, len(steps), STEP_BIN)]
    row.slowest_steps = sorted(((i, round(t, 2), evicted) for i, (t, evicted) in enumerate(zip(steps, clock.evicted))),
                               key=lambda item: -item[1])[:SLOWEST_STEPS]
    row.notes += skip_note(skips)
    slow = [(i, t) for i, t in enumerate(steps) if t > 1e3]  # a recompilation inside the measurement, say
    if slow:
        row.notes.append("steps over 1 s: " + ", ".join(f"#{i} {t / 1e3:.1f} s" for i, t in slow))
    row.end_kv_gb, row.end_allocated_gb, row.peak_generate_gb = base.kv_bytes() / GB, _allocated_gb(), peak_gb()
    row.curve = clock.curve + [(len(steps), row.end_kv_gb, row.end_allocated_gb)]
    row.max_kv_gb = max(kv for _, kv, _ in row.curve)
    row.evictions = len(base.decode_eviction.history) if base.decode_eviction is not None else 0
    first = base.layers[base.compressible_layers[0]]
    row.tail_tokens = int(first.tail_end) - first.packed_slots if first.is_static else first.tail_length
    if out.shape[1] - inputs["input_ids"].shape[1] != args.new_tokens:
        row.notes.append(f"generated {out.shape[1] - inputs['input_ids'].shape[1]} tokens")
    base.evict_while_decoding(None)
    base.rollback()
    return row


def _line(row: DecodeRow) -> str:
    return (f"{row.mode:3} #{row.repeat} ctx {row.context:>6} r {row.ratio:g} w {row.window}: {row.new_tokens} tokens "
            f"in {row.generate_s:6.1f}s = {row.ms_per_token:5.2f} ms/token (median step {row.median_step_ms:5.2f}, "
            f"steady {row.steady_median_ms:5.2f}, evicting {row.eviction_step_ms:6.1f}, max {row.max_step_ms:6.1f}, "
            f"last 1K {row.last_1k_ms_per_token:5.2f}); KV {row.context_kv_gb:.3f} -> "
            f"{row.end_kv_gb:.3f} GB (max {row.max_kv_gb:.3f}), allocated {row.end_allocated_gb:.2f} GB, peak "
            f"{row.peak_generate_gb:.2f} GB; {row.evictions} evictions, {row.tail_tokens} tail tokens")


def decode_rows(model, predictor: ScorePredictor, args, device: str, on_row=None) -> list[DecodeRow]:
    """Every row of the run: per ``--contexts`` length one random context, prefilled and compressed once, then the
    modes of ``args.decode_eviction`` alternately, ``args.repeats`` times (rolled back in between).

    ``on_row(row)`` is called after each row (the GPU run writes its JSON files there, so a time-out keeps them).
    """
    rows = []
    for context in args.contexts:
        ids = torch.randint(10, model.config.vocab_size, (1, context), device=device)
        base = KVzipCache(model)
        base.prefill(model, ids, context_start=CONTEXT_START, chunk_size=args.prefill_chunk)
        base.compress(model, min(args.ratios), predictor=predictor)
        for repeat in range(args.repeats):
            for mode in args.decode_eviction:  # alternately: see the module docstring
                rows.append(decode_row(model, predictor, base, mode, args, repeat))
                if on_row is not None:
                    on_row(rows[-1])
        del base
        free_memory()
    return rows


def run_decode(args) -> list[dict]:
    """One result record per mode of ``args.decode_eviction`` (each also written to its JSON file)."""
    device, dtype = "cuda", getattr(torch, args.dtype)
    longest = max(args.contexts) + args.question_tokens + args.new_tokens + 64
    model = load_model(args.model, dtype, device, max_positions=longest)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device)
    predictor = ScorePredictor.init(model, args.predictor or "mlp", seed=0).to(device)
    warm_up(model, device, predictor)
    _warm_up_decode_eviction(model, predictor, device, args.window)
    rows: dict[str, list[DecodeRow]] = {mode: [] for mode in args.decode_eviction}
    records, machine = {}, machine_record()

    def write(row: DecodeRow) -> None:
        print(_line(row), flush=True)
        rows[row.mode].append(row)
        records[row.mode] = {"machine": machine, "model": args.model, "dtype": args.dtype,
                             "weights_gb": weight_bytes / GB, "copy_bandwidth_tbps": bandwidth / 1e12,
                             "predictor": predictor.kind, "rows": [asdict(r) for r in rows[row.mode]]}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"decode_eviction_{row.mode}.json").write_text(json.dumps(records[row.mode], indent=2))

    decode_rows(model, predictor, args, device, on_row=write)
    return list(records.values())


def _warm_up_decode_eviction(model, predictor: ScorePredictor, device: str, window: int) -> None:
    """A short generate with eviction while decoding: its first-call costs outside the measurements."""
    cache = KVzipCache(model)
    cache.prefill(model, torch.randint(10, 1000, (1, 1024), device=device), context_start=CONTEXT_START)
    cache.compress(model, 0.5, predictor=predictor)
    cache.evict_while_decoding(model, predictor, 0.5, window=window)
    inputs = cache.inputs_for(torch.randint(10, 1000, (1, 8), device=device))
    with torch.no_grad():
        model.generate(**inputs, **{cache_kwarg(model): cache}, max_new_tokens=3 * window, min_new_tokens=3 * window,
                       do_sample=False)
    del cache
    free_memory()


def read_records(out: Path) -> list[dict]:
    """Every ``decode_eviction_<mode>.json`` under ``out``, in `MODES` order."""
    return [json.loads(p.read_text()) for mode in MODES if (p := out / f"decode_eviction_{mode}.json").exists()]


def write_decode_report(out: Path) -> None:
    """``decode_eviction.md`` and ``decode_eviction.png`` from the JSON files under ``out``."""
    records = read_records(out)
    if not records:
        raise SystemExit(f"no decode_eviction_<mode>.json under {out}")
    rows = [{"repeat": 0, "steady_median_ms": float("nan"), "eviction_step_ms": float("nan"), **row}
            for record in records for row in record["rows"]]  # files written before --repeats lack these fields
    rows.sort(key=lambda r: (r["context"], r["repeat"], MODES.index(r["mode"])))
    repeats = max(r["repeat"] for r in rows) + 1
    how = (f"the modes alternated {repeats} times on one compressed context, in one process" if repeats > 1
           else "one run per mode (see each JSON's machine record)")
    lines = report_header(records[0], "Eviction while decoding") + [
        f"Score predictor: {records[0]['predictor']} (random weights). Batch 1, greedy `model.generate` (eager, or "
        f"compiled decode steps on a static cache for the -compiled modes); {how}. "
        "Steady step: the median of the steps that ran no eviction; evicting step: the mean of those that ran one.",
        "",
        "| mode | repeat | context | ratio | window | new tokens | generate s | ms/token | median step ms "
        "| steady step ms | evicting step ms | max step ms | last 1K ms/token | context KV GB | end KV GB "
        "| max KV GB | allocated GB | peak GB | evictions | tail tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['repeat']} | {r['context']} | {r['ratio']:g} | {r['window']} | {r['new_tokens']} | "
            f"{r['generate_s']:.1f} | {r['ms_per_token']:.2f} | {r['median_step_ms']:.2f} | "
            f"{r['steady_median_ms']:.2f} | {r['eviction_step_ms']:.1f} | {r['max_step_ms']:.1f} | "
            f"{r['last_1k_ms_per_token']:.2f} | {r['context_kv_gb']:.3f} | {r['end_kv_gb']:.3f} | "
            f"{r['max_kv_gb']:.3f} | {r['end_allocated_gb']:.2f} | {r['peak_generate_gb']:.2f} | {r['evictions']} | "
            f"{r['tail_tokens']} |"
        )
    for context in sorted({r["context"] for r in rows}):
        for off, on in (("off", "on"), ("off-compiled", "on-compiled")):
            comparison = _comparison([r for r in rows if r["context"] == context and r["mode"] == off],
                                     [r for r in rows if r["context"] == context and r["mode"] == on])
            if comparison:  # both modes ran on this context
                lines += ["", *comparison]
    (out / "decode_eviction.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "decode_eviction.png")


def _comparison(off: list[dict], on: list[dict]) -> list[str]:
    """What eviction changed for one context: the answer's KV, ms/token against the spread between repeats of one
    mode, and the share of the time spent in eviction steps."""
    if not off or not on:
        return []

    def spread(rows: list[dict]) -> str:
        values = [r["ms_per_token"] for r in rows]
        mean = statistics.mean(values)
        return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} (repeats {min(values):.2f}-{max(values):.2f})"

    first_off, first_on = off[0], on[0]
    grown_off = first_off["end_kv_gb"] - first_off["context_kv_gb"]
    grown_on = first_on["end_kv_gb"] - first_on["context_kv_gb"]
    off_ms = statistics.mean(r["ms_per_token"] for r in off)
    on_ms = statistics.mean(r["ms_per_token"] for r in on)
    lines = [f"Context {first_off['context']}, {first_off['mode']} vs {first_on['mode']}: the answer's KV grows by "
             f"{grown_off:.3f} GB without eviction and "
             f"{grown_on:.3f} GB with it ({grown_on / grown_off:.2f}x); the whole cache ends at "
             f"{first_on['end_kv_gb'] / first_off['end_kv_gb']:.2f}x. ms/token: off {spread(off)}, on {spread(on)} "
             f"({100 * (on_ms / off_ms - 1):+.1f}%)."]
    evicting = [r for r in on if r["evictions"] and r["eviction_step_ms"] == r["eviction_step_ms"]]  # not NaN
    if evicting:
        extra = statistics.mean((r["eviction_step_ms"] - r["steady_median_ms"]) * r["evictions"] / r["new_tokens"]
                                for r in evicting)
        lines.append(f"Eviction steps add {extra:.2f} ms per generated token on average ({100 * extra / off_ms:.1f}% "
                     "of the off mode's ms/token); the rest of the difference is in the steady steps.")
    return lines


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        tokens, kv = [c[0] for c in r["curve"]], [c[1] for c in r["curve"]]
        if r["repeat"] == 0:  # the repeats draw the same curve
            ax.plot(tokens, kv, label=f"{r['mode']}: ctx {r['context']}, {r['ms_per_token']:.1f} ms/token")
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("KV cache GB (kv_bytes)")
    ax.set_title("Eviction while decoding")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, required=True, help="rebuild the report from the JSON files here")
    write_decode_report(parser.parse_args(argv).report)


if __name__ == "__main__":
    main()

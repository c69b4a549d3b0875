"""Speed and memory benchmark: HF DynamicCache + SDPA against KVzipCache on a GPU.

    python -m kvzip_cache.bench --model llama3.1-8b    # or: kvzip-bench ... --contexts 8192 32768 131072 --batches 1 8 \\
        --out docs/benchmarks/h200

``--model`` is a path or hub name of a causal LM, or a built-in shape with random weights (``llama3.1-8b``,
``qwen2.5-7b``): speed and memory do not depend on trained weights. For every (context length, batch) that fits,
it reports for the baseline and for KVzip at each ratio: prefill time, compress time, decode ms/token (median of
``--decode-steps`` steps after warm-up, CUDA events; a direct forward loop, plus `model.generate` with left padding
at batch > 1), KV GB after compression, peak GPU GB during prefill / compress / decode, and the ragged attention
kernel's effective bandwidth (retained KV bytes read per second) against the measured copy bandwidth. The physical
floor of a decode step is ``(weight bytes + kept KV bytes) / copy bandwidth`` (`kvzip_cache.bench.decode`).

Writes ``results.json``, ``report.md`` and ``decode.png`` (decode latency and KV memory vs context length) under
``--out``.

``--predictor linear|mlp`` adds, for every (context, batch), the rows of a `ScorePredictor` (random weights, see
`predictor_rows`): ``kvzip-pred`` (a plain prefill, then ``compress(predictor=p)``: no forward pass) and
``kvzip-evict`` (``prefill(predictor=p, ratio=r)``: evicts while prefilling), with their time against the plain
prefill and DynamicCache's, and the evicting prefill's peak memory beside its bound (`kvzip_cache.bench.predictor`).

``--decode-eviction off on`` measures instead long answers (``--new-tokens``) after a compressed context, without and
with eviction while decoding (`kvzip_cache.bench.decode_eviction`).

``--capacity`` measures instead the longest context one GPU prefills with a dense cache and with eviction at the
smallest ``--ratios`` (`capacity_rows`), within ``--capacity-budget`` seconds; writes ``capacity.json`` and
``capacity.md`` (`kvzip_cache.bench.capacity`).

``--compiled`` measures instead compiled decoding, StaticCache + torch.compile against a static KVzip cache; writes
``compiled.json`` and ``compiled.md`` (`kvzip_cache.bench.compiled`).

``--shared QUESTIONS`` measures instead many questions about one context decoded together; writes ``shared.json``
and ``shared.md`` (`kvzip_cache.bench.shared`).

The helpers that several benchmarks share (model loading, bandwidth, memory, timing) are in
`kvzip_cache.bench.common`; the command itself (`parse_args`, `main`) in `kvzip_cache.bench.cli`.
"""

from .capacity import capacity_rows, longest, run_capacity, write_capacity_report
from .cli import main, parse_args
from .common import (GB, SHAPES, Measurement, NoTemplateTokenizer, Row, copy_bandwidth, kv_bytes_per_token,
                     load_model, machine_record, measured, random_context, report_header, result_record, warm_up)
from .decode import kernel_bandwidth, run, write_report
from .predictor import predictor_rows

__all__ = [
    "GB", "SHAPES", "Measurement", "NoTemplateTokenizer", "Row", "capacity_rows", "copy_bandwidth", "kernel_bandwidth",
    "kv_bytes_per_token", "load_model", "longest", "machine_record", "main", "measured", "parse_args",
    "predictor_rows", "random_context", "report_header", "result_record", "run", "run_capacity", "warm_up",
    "write_capacity_report", "write_report",
]

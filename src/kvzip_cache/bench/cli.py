"""The benchmark command, ``python -m kvzip_cache.bench`` or ``kvzip-bench``: `parse_args` reads its flags, `main`
runs the benchmark they choose (``--capacity``, ``--decode-eviction``, ``--shared``, ``--compiled`` or, without any
of those, the default one) and writes its report under ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from kvzip_cache.scorers.predictor import KINDS as PREDICTOR_KINDS

from .capacity import run_capacity, write_capacity_report
from .decode import run, write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command's flags from ``argv`` (None: ``sys.argv``); ``--help`` prints the `kvzip_cache.bench` docstring."""
    parser = argparse.ArgumentParser(prog="kvzip-bench", description=sys.modules[__package__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3.1-8b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.5, 0.3])
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--prefill-chunk", type=int, default=16384)
    parser.add_argument("--score-chunk", type=int, default=2048)
    parser.add_argument("--check-tokens", type=int, default=16, help="greedy tokens compared at ratio 1.0 (0: skip)")
    parser.add_argument("--generate", action="store_true", help="also time model.generate at batch 1")
    parser.add_argument("--compiled", action="store_true",
                        help="compiled decoding instead: StaticCache + torch.compile vs a static KVzip cache "
                             "(kvzip_cache.bench.compiled)")
    parser.add_argument("--baselines", nargs="+", default=None,
                        choices=("dynamic-eager", "static-compiled", "quantized-fp8-eager"),
                        help="with --compiled: the full-cache rows to run (default: dynamic-eager and static-compiled, "
                             "and quantized-fp8-eager when --kv-dtypes has fp8)")
    parser.add_argument("--no-generate", action="store_true",
                        help="with --compiled: skip timing model.generate on the static KVzip cache (a second compile)")
    parser.add_argument("--kv-dtypes", nargs="+", choices=("model", "fp8"), default=["model"],
                        help="with --compiled: the KVzip rows once per storage type of the kept pairs (fp8: float8 "
                             "with a scale per pair, beside transformers' own fp8 QuantizedCache on the full context)")
    parser.add_argument("--predictor", choices=PREDICTOR_KINDS, default=None,
                        help="also the rows of a score predictor of this kind (random weights): predicted compress "
                             "and prefill with eviction (see predictor_rows)")
    parser.add_argument("--capacity", action="store_true",
                        help="instead: the longest context one GPU prefills, dense vs evicting at the smallest "
                             "--ratios (predictor: --predictor, default mlp); writes capacity.json, capacity.md")
    parser.add_argument("--capacity-max", type=int, default=1 << 20, help="longest context a capacity try uses")
    parser.add_argument("--capacity-budget", type=float, default=420.0,
                        help="seconds for the whole capacity run, loading included: no try starts after them")
    parser.add_argument("--capacity-dense", choices=("kvzip", "dynamic"), default="kvzip",
                        help="the dense cache of the capacity run: a plain KVzipCache or DynamicCache + SDPA")
    parser.add_argument("--shared", type=int, nargs="+", default=None, metavar="QUESTIONS",
                        help="instead: QUESTIONS questions about one context decoded together (compiled), against "
                             "one question, per-row context reads and sequential questions "
                             "(kvzip_cache.bench.shared); writes shared.json, shared.md")
    parser.add_argument("--compile-reuse", action="store_true",
                        help="with --shared: also time the first generate on a second document of the same bucket")
    parser.add_argument("--decode-eviction", nargs="+", choices=("off", "on", "off-compiled", "on-compiled"),
                        default=None, metavar="MODE",
                        help="instead: long answers of --new-tokens tokens after a context compressed to the smallest "
                             "--ratios, without (off) and with (on) evict_while_decoding at that ratio, eager or on a "
                             "static cache with compiled decode steps (off-compiled, on-compiled) "
                             "(kvzip_cache.bench.decode_eviction); writes decode_eviction_<mode>.json, "
                             "decode_eviction.md/.png")
    parser.add_argument("--new-tokens", type=int, default=8192, help="with --decode-eviction: tokens generated")
    parser.add_argument("--window", type=int, default=128, help="with --decode-eviction: evict_while_decoding's window")
    parser.add_argument("--repeats", type=int, default=1,
                        help="with --decode-eviction: run the modes alternately this many times on one context")
    parser.add_argument("--sample-every", type=int, default=256,
                        help="with --decode-eviction: generated tokens between two KV memory samples")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark that the flags choose and write its report under ``--out`` (needs a CUDA GPU)."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs a CUDA GPU")
    if args.capacity:
        write_capacity_report(run_capacity(args), args.out)
        print(f"wrote {args.out}/capacity.json, capacity.md")
        return
    if args.decode_eviction:
        from .decode_eviction import run_decode, write_decode_report

        run_decode(args)
        write_decode_report(args.out)
        print(f"wrote {args.out}/decode_eviction_<mode>.json, decode_eviction.md, decode_eviction.png")
        return
    if args.shared:
        from .shared import run_shared, write_shared_report

        write_shared_report(run_shared(args), args.out)
        print(f"wrote {args.out}/shared.json, shared.md")
        return
    if args.compiled:
        from .compiled import run_compiled, write_compiled_report

        write_compiled_report(run_compiled(args), args.out)
        print(f"wrote {args.out}/compiled.json, compiled.md")
        return
    result = run(args)
    write_report(result, args.out)
    print(f"wrote {args.out}/results.json, report.md, decode.png")

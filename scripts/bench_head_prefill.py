"""Peak GPU memory of head-level compression: prefill then compress, vs dropping heads DURING the prefill.

    python scripts/bench_head_prefill.py [context ...]     # default: 32768 131072

Llama-3.1-8B shape, random weights, bf16, batch 1, head ratio 0.6 (the original's recommendation), random head
scores (only which heads are dropped matters for memory and time). Prints one line per (context, mode) and writes
``head_prefill.json`` to ``$OUT`` (or the current folder).
"""

import json
import os
import sys
import time

import torch

import kvzip_cache  # noqa: F401 - registers the kvzip attention
from kvzip_cache import KVzipCache
from kvzip_cache.bench import load_model

RATIO = 0.6
contexts = [int(a) for a in sys.argv[1:]] or [32768, 131072]
model = load_model("llama3.1-8b", torch.bfloat16, "cuda")
model.set_attn_implementation("kvzip")
config = model.config
head_scores = torch.rand(config.num_hidden_layers, config.num_key_value_heads, generator=torch.Generator().manual_seed(0))
weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
results = []
for context in contexts:
    ids = torch.randint(10, 1000, (1, context), device="cuda")
    for mode in ("prefill, then compress", "drop heads during prefill"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        began = time.perf_counter()
        cache = KVzipCache(model)
        if mode.startswith("drop"):
            cache.prefill(model, ids, context_start=16, head_scores=head_scores, ratio=RATIO)
        else:
            cache.prefill(model, ids, context_start=16)
            cache.compress(model, RATIO, level="head", head_scores=head_scores)
        torch.cuda.synchronize()
        row = {
            "context": context, "mode": mode, "seconds": round(time.perf_counter() - began, 2),
            "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
            "peak_minus_weights_gb": round(torch.cuda.max_memory_allocated() / 1e9 - weights_gb, 2),
            "kv_gb_after": round((cache.kv_bytes() + cache.metadata_bytes()) / 1e9, 2),
        }
        results.append(row)
        print(row, flush=True)
        del cache
out = os.environ.get("OUT", ".")
with open(os.path.join(out, "head_prefill.json"), "w") as handle:
    json.dump({"weights_gb": round(weights_gb, 2), "ratio": RATIO, "results": results}, handle, indent=2)

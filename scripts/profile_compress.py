"""Where does compress() spend its time? Llama-3.1-8B shape, random weights, bf16, one context length.

    python scripts/profile_compress.py 32768
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kvzip_cache import KVzipCache
from kvzip_cache.bench import NoTemplateTokenizer, load_model

context = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
model = load_model("llama3.1-8b", torch.bfloat16, "cuda")
model.set_attn_implementation("kvzip")
ids = torch.randint(10, 1000, (1, context), device="cuda")
warm = KVzipCache(model)  # compile the kernels outside the measurement
warm.prefill(model, ids[:, :4096], context_start=16)
warm.compress(model, 0.3, tokenizer=NoTemplateTokenizer())
del warm
cache = KVzipCache(model)
torch.cuda.synchronize()
began = time.perf_counter()
cache.prefill(model, ids, context_start=16)
torch.cuda.synchronize()
prefill = time.perf_counter() - began
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    began = time.perf_counter()
    cache.compress(model, 0.3, tokenizer=NoTemplateTokenizer())
    torch.cuda.synchronize()
    compress = time.perf_counter() - began
print(f"context {context}: prefill {prefill:.2f}s compress {compress:.2f}s ratio {compress / prefill:.2f}")
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))

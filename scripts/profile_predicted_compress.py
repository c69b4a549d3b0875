"""Where does compress(scorer=predictor) spend its time? Llama-3.1-8B shape, random weights, bf16.

    python scripts/profile_predicted_compress.py 32768 131072

Per context: the plain prefill, then the parts of a predicted compress timed one by one (predictions, pair
selection, eviction), the whole compress, and a profiler table of the whole compress.
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kvzip_cache import KVzipCache, ScorePredictor
from kvzip_cache.bench import load_model
from kvzip_cache.scorers import PredictorScorer
from kvzip_cache.scorers.base import score_context_by_layers
from kvzip_cache.selection import select_pairs


def timed(fn):
    torch.cuda.synchronize()
    began = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - began


model = load_model("llama3.1-8b", torch.bfloat16, "cuda")
model.set_attn_implementation("kvzip")
predictor = ScorePredictor.init(model, "mlp").to("cuda")
for context in [int(a) for a in sys.argv[1:]] or [32768]:
    ids = torch.randint(10, 1000, (1, context), device="cuda")
    scorer = PredictorScorer(predictor, model)
    for warm in range(2):  # the first round compiles and caches; the second is measured
        parts = KVzipCache(model)
        _, prefill = timed(lambda: parts.prefill(model, ids, context_start=16))
        selectable = parts.selectable_pairs()
        scores, predict = timed(lambda: score_context_by_layers(scorer, parts.prefilled_context())
                                .masked_fill(~selectable, float("nan")))
        keep, select = timed(lambda: select_pairs(scores, 0.3))
        _, evict = timed(lambda: parts.evict(keep))
        whole_cache = KVzipCache(model)
        whole_cache.prefill(model, ids, context_start=16)
        _, whole = timed(lambda: whole_cache.compress(model, 0.3, scorer=predictor))
    print(f"context {context}: prefill {prefill:.3f}s; predicted compress {whole:.3f}s = {whole / prefill:.1%}: "
          f"predictions {predict:.3f}s, selection {select:.3f}s, eviction {evict:.3f}s")
    cache = KVzipCache(model)
    cache.prefill(model, ids, context_start=16)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        cache.compress(model, 0.3, scorer=predictor)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=50))
    del cache

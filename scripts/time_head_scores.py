"""How long does compute_head_scores take? Llama-3.1-8B shape, random weights, bf16, on the GPU.

    python scripts/time_head_scores.py [tokens_per_sample ...]    # default: 2000 8000

Calibration texts are random characters (random weights have no tokenizer; only the token count matters for time).
Each setting is run twice; the second (warm: kernels compiled) is reported.
"""

import random
import sys
import time

import torch

import kvzip_cache  # noqa: F401 - registers the kvzip attention
from kvzip_cache.bench import NoTemplateTokenizer, load_model
from kvzip_cache.tools import compute_head_scores

sizes = [int(a) for a in sys.argv[1:]] or [2000, 8000]
model = load_model("llama3.1-8b", torch.bfloat16, "cuda")
model.set_attn_implementation("kvzip")
tokenizer = NoTemplateTokenizer()
rng = random.Random(0)
for tokens in sizes:
    texts = ["".join(chr(rng.randrange(32, 1000)) for _ in range(tokens)) for _ in range(2)]
    for attempt in ("cold", "warm"):
        torch.cuda.synchronize()
        began = time.perf_counter()
        scores = compute_head_scores(model, tokenizer, texts, progress=False)
        elapsed = time.perf_counter() - began
        print(f"{attempt}: 2 samples x {tokens} tokens: {elapsed:.2f} s (compute reports {scores.seconds:.2f} s), "
              f"scores {tuple(scores.scores.shape)}, max {scores.scores.max():.3f}", flush=True)

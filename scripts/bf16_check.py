"""Is a bf16 greedy mismatch against DynamicCache noise or a bug? Compare two transformers baselines with each other.

    python scripts/bf16_check.py      # Llama-3.1-8B shape, random weights, bf16, 8K context, 16 greedy tokens

Prints, for SDPA+DynamicCache vs eager+DynamicCache (both transformers) and SDPA+DynamicCache vs KVzip ratio 1.0:
the number of leading greedy tokens that agree, and the first-token logits' max difference and top-2 gap.
"""

import torch
from transformers import DynamicCache

from kvzip_cache import KVzipCache
from kvzip_cache.bench import NoTemplateTokenizer, load_model

model = load_model("llama3.1-8b", torch.bfloat16, "cuda")
torch.manual_seed(1)
context = torch.randint(10, 100000, (1, 8192), device="cuda")
full = torch.cat([context, torch.randint(10, 100000, (1, 32), device="cuda")], 1)


def run(attn, cache_factory):
    model.set_attn_implementation(attn)
    cache = cache_factory()
    with torch.no_grad():
        out = model.generate(full, past_key_values=cache, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, full.shape[1]:], out.logits[0][0].float()


def kvzip_cache():
    cache = KVzipCache(model)
    cache.prefill(model, context, context_start=16)
    cache.compress(model, 1.0, tokenizer=NoTemplateTokenizer())
    return cache


sdpa_tokens, sdpa_logits = run("sdpa", lambda: DynamicCache(config=model.config))
eager_tokens, eager_logits = run("eager", lambda: DynamicCache(config=model.config))
kvzip_tokens, kvzip_logits = run("kvzip", kvzip_cache)
top2 = sdpa_logits.topk(2).values
print(f"first-token top-2 logit gap (sdpa): {float(top2[0] - top2[1]):.4f}")
for name, tokens, logits in (("eager", eager_tokens, eager_logits), ("kvzip r1.0", kvzip_tokens, kvzip_logits)):
    same = (tokens == sdpa_tokens).long().cumprod(0).sum()
    print(f"sdpa vs {name}: {int(same)}/16 leading greedy tokens equal; first-token logits max |diff| "
          f"{float((logits - sdpa_logits).abs().max()):.4f}")

"""Golden outputs of eviction while decoding on a 32-layer random Llama (CPU): greedy tokens and every eviction's keep
masks, for fp32 and bf16, static (packed) and dynamic tails, the "pair" and "pair-uniform" levels, linear and MLP
predictors (12 cases of 200 tokens, 5 evictions each). Record before changing how an eviction rates or packs, check
after: the comparison is bit for bit (on the same machine; another CPU's BLAS gives other bits).

    python scripts/decode_eviction_goldens.py --record /tmp/before.pt
    python scripts/decode_eviction_goldens.py --check /tmp/before.pt
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvzip_cache import KVzipCache
from kvzip_cache.scorers.predictor import ScorePredictor

CASES = [(dtype, static, level, kind) for dtype in (torch.float32, torch.bfloat16)
         for static, level in ((True, "pair-uniform"), (False, "pair"), (False, "pair-uniform"))
         for kind in ("mlp", "linear")]


def run(dtype: torch.dtype, static: bool, level: str, kind: str, new_tokens: int = 200) -> dict:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=32,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.set_attn_implementation("kvzip")
    predictor = ScorePredictor.init(model, kind, seed=0)
    cache = KVzipCache(model)
    cache.prefill(model, torch.randint(10, 512, (1, 600)), context_start=8)
    cache.compress(model, 0.3, predictor=predictor)
    cache.evict_while_decoding(model, predictor, 0.3, window=32, level=level)
    if static:
        cache.make_static(new_tokens + 16)
    inputs = cache.inputs_for(torch.randint(10, 512, (1, 9)))
    with torch.no_grad():
        out = model.generate(**inputs, cache=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, stopping_criteria=[cache.eviction_criteria()] if static else None)
    history = cache.decode_eviction.history
    return {"tokens": out, "keeps": [step.keep for step in history], "spans": [(s.start, s.count) for s in history]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--record", metavar="FILE")
    action.add_argument("--check", metavar="FILE")
    args = parser.parse_args()
    results = {str(case): run(*case) for case in CASES}
    if args.record:
        torch.save(results, args.record)
        print(f"recorded {len(results)} cases in {args.record}")
        return
    expected, failures = torch.load(args.check), 0
    for name, got in results.items():
        want = expected[name]
        same = (torch.equal(got["tokens"], want["tokens"]) and got["spans"] == want["spans"]
                and all(torch.equal(a, b) for a, b in zip(got["keeps"], want["keeps"])))
        failures += not same
        print(f"{'same' if same else 'DIFFERENT'}: {name} ({len(got['keeps'])} evictions)")
    print(f"{len(results) - failures} of {len(results)} cases bit-identical")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()

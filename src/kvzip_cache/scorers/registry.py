"""Scorers by name: ``cache.compress(model, 0.3, scorer="snapkv")``.

A registered name maps to a factory ``factory(model, **options) -> scorer``; the cache passes the options of the
call that needs scores (``tokenizer``, ``chunk_size``, ``progress``), and a factory takes what it uses and ignores
the rest (accept ``**options``). `register_scorer` adds a name; `available_scorers` lists them.

`resolve_scorer` turns whatever a user passes as ``scorer=`` into a scorer object: a registered name, a
`ScorePredictor` (bound to the model), `HeadScores` or a ``[num_layers, num_kv_heads]`` tensor of head scores, or any
object with ``score_layer`` or ``score_context`` (`kvzip_cache.scorers.base`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import config_fingerprint
from ..head_scores import HeadScores, shipped_head_scores
from .base import ContextScorer, LayerScorer
from .baselines import H2OScorer, RandomScorer, SnapKVScorer, StreamingScorer
from .head import HeadScorer
from .keydiff import KeyDiffScorer
from .predictor import PredictorScorer, ScorePredictor, shipped_predictors
from .base import scorer_name
from .reconstruction import ReconstructionScorer

_FACTORIES: dict[str, Callable[..., object]] = {}


def register_scorer(name: str, factory: Callable[..., object], *, replace: bool = False) -> None:
    """Make ``scorer=name`` build ``factory(model, **options)`` (options: ``tokenizer``, ``chunk_size``,
    ``progress``; accept ``**options``). Refuses a taken name unless ``replace``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a scorer's name is a non-empty string; got {name!r}")
    if name in _FACTORIES and not replace:
        raise ValueError(f"a scorer named {name!r} is registered already; pass replace=True to replace it")
    if not callable(factory):
        raise TypeError(f"register_scorer({name!r}, ...) needs a callable factory(model, **options) -> scorer")
    _FACTORIES[name] = factory


def available_scorers() -> tuple[str, ...]:
    """The registered scorer names."""
    return tuple(_FACTORIES)


def resolve_scorer(spec, model, **options) -> LayerScorer | ContextScorer:
    """The scorer object for what was passed as ``scorer=`` (see the module docstring)."""
    if isinstance(spec, str):
        factory = _FACTORIES.get(spec)
        if factory is None:
            raise ValueError(f"unknown scorer {spec!r}; registered: {', '.join(_FACTORIES)} (or pass a scorer "
                             "object, see kvzip_cache.scorers.base)")
        return factory(model, **options)
    if isinstance(spec, ScorePredictor):
        return PredictorScorer(spec, model)
    if isinstance(spec, (HeadScores, torch.Tensor)):
        return HeadScorer(spec, model)
    if isinstance(spec, (LayerScorer, ContextScorer)):
        return spec
    raise TypeError(
        f"scorer must be a registered name ({', '.join(_FACTORIES)}), a ScorePredictor, HeadScores, or an object with "
        f"score_layer(layer_idx, keys, values, positions) or score_context(model, context); got "
        f"{type(spec).__name__}"
    )


def scores_kept_pairs(spec) -> bool:
    """Whether a scorer spec (as `resolve_scorer` takes it) can rate the pairs a compressed cache still keeps,
    without building the scorer: a registered name by its factory, an object by its ``scores_kept_pairs``."""
    if isinstance(spec, str):
        return spec in _FACTORIES and bool(getattr(_FACTORIES[spec], "scores_kept_pairs", False))
    return bool(getattr(spec, "scores_kept_pairs", False))


def scorer_label(spec) -> str:
    """The name a scorer spec records as ``cache.score_source``, without building the scorer: a registered name
    itself, ``"predicted"`` for a `ScorePredictor`, ``"head"`` for head scores, else the object's ``name`` (``""``
    for no spec)."""
    if spec is None:
        return ""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, ScorePredictor):
        return PredictorScorer.name
    if isinstance(spec, (HeadScores, torch.Tensor)):
        return HeadScorer.name
    return scorer_name(spec)


def _shipped_for(model, manifest: dict[str, dict], what: str) -> str:
    """The short name of the shipped artifact made for ``model``'s architecture (matched by config fingerprint)."""
    fingerprint = config_fingerprint(model)
    for name, entry in manifest.items():
        if entry.get("fingerprint") == fingerprint:
            return name
    raise ValueError(
        f"no {what} ships for this model (config fingerprint {fingerprint}; shipped for: {', '.join(manifest)}); "
        f"make one with kvzip_cache.tools and pass it as scorer=..."
    )


def _predicted(model, **options) -> PredictorScorer:
    return PredictorScorer(ScorePredictor.from_pretrained(_shipped_for(model, shipped_predictors(), "score predictor")),
                           model)


def _head(model, **options) -> HeadScorer:
    return HeadScorer(HeadScores.from_pretrained(_shipped_for(model, shipped_head_scores(), "head scores")), model)


def _reconstruction(target: str):
    def factory(model, tokenizer=None, chunk_size: int = 2048, progress: bool = False, **options):
        return ReconstructionScorer(tokenizer, target, chunk_size, progress)

    factory.scores_kept_pairs = ReconstructionScorer.scores_kept_pairs  # known before the scorer is built
    return factory


register_scorer("kvzip", _reconstruction("kvzip"))
register_scorer("kvzip+", _reconstruction("kvzip+"))
register_scorer("predicted", _predicted)
register_scorer("head", _head)
register_scorer("random", lambda model, **options: RandomScorer())
register_scorer("streaming", lambda model, **options: StreamingScorer())
register_scorer("snapkv", lambda model, **options: SnapKVScorer())
register_scorer("h2o", lambda model, **options: H2OScorer())
register_scorer("keydiff", lambda model, **options: KeyDiffScorer())

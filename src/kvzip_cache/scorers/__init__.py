"""Ways of rating context KV pairs, behind one small protocol; none of them imports the cache.

A scorer rates pairs (higher = keep); the cache selects and evicts for real (`kvzip_cache.selection`,
`KVzipCache.keep_pairs`). `base` defines the two kinds (`LayerScorer`: one method over what a cache layer holds;
`ContextScorer`: the whole prefilled context with the model at hand) and what a scorer may see of the cache
(`PrefilledContext`). Every way of scoring is one module: `reconstruction` (KVzip, KVzip+), `head` (precomputed
head scores), `predictor` (trained predictors of KVzip scores), `keydiff`, `baselines` (random, StreamingLLM, SnapKV,
H2O). `registry` maps names to them: ``cache.compress(model, 0.3, scorer="snapkv")``; `register_scorer` adds yours.
"""

from .base import ContextScorer, GivenScores, LayerScorer, PrefilledContext
from .baselines import H2OScorer, RandomScorer, SnapKVScorer, StreamingScorer
from .head import HeadScorer
from .keydiff import KeyDiffScorer
from .predictor import FEATURES, KINDS, TARGETS, PredictorScorer, ScorePredictor, shipped_predictors
from .reconstruction import RECONSTRUCTION_TARGETS, ReconstructionScorer, reconstruction_inputs
from .registry import available_scorers, register_scorer, resolve_scorer, scorer_label
from .rotary import rotary_tables, unrotate

__all__ = [
    "FEATURES", "KINDS", "RECONSTRUCTION_TARGETS", "TARGETS",
    "ContextScorer", "GivenScores", "H2OScorer", "HeadScorer", "KeyDiffScorer", "LayerScorer", "PredictorScorer",
    "PrefilledContext", "RandomScorer", "ReconstructionScorer", "ScorePredictor", "SnapKVScorer", "StreamingScorer",
    "available_scorers", "reconstruction_inputs", "register_scorer", "resolve_scorer", "rotary_tables",
    "scorer_label", "shipped_predictors", "unrotate",
]

"""Ways of scoring context KV pairs that never import the cache.

A scorer turns what a cache layer holds (keys, values, positions) into one score per (row, KV head, position); the
cache turns scores into evictions (`kvzip_cache.selection`). `predictor` holds the trained per-layer predictors of
KVzip scores (KVzap / Fast KVzip style), `rotary` the model-agnostic RoPE inversion they rely on.
"""

from .predictor import FEATURES, KINDS, TARGETS, ScorePredictor, shipped_predictors
from .rotary import rotary_tables, unrotate

__all__ = ["FEATURES", "KINDS", "TARGETS", "ScorePredictor", "rotary_tables", "shipped_predictors", "unrotate"]

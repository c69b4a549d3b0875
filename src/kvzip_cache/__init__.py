"""kvzip-cache: KVzip query-agnostic KV cache compression as a native transformers cache.

Importing the package registers the "kvzip" attention implementation (and its mask function) with transformers.
"""

from ._version import __version__
from .attention import ATTN_IMPLEMENTATION, register
from .cache import CompressReport, KVzipCache
from .head_scores import HeadScores, shipped_head_scores
from .scorers import (GivenScores, PrefilledContext, ScorePredictor, available_scorers, reconstruction_inputs,
                      register_scorer, shipped_predictors)
from .selection import select_heads, select_pairs
from .templates import encode_context, encode_contexts, encode_queries, encode_query

register()

__all__ = [
    "ATTN_IMPLEMENTATION",
    "CompressReport",
    "HeadScores",
    "KVzipCache",
    "GivenScores",
    "PrefilledContext",
    "ScorePredictor",
    "__version__",
    "available_scorers",
    "encode_context",
    "encode_contexts",
    "encode_queries",
    "encode_query",
    "reconstruction_inputs",
    "register",
    "register_scorer",
    "select_heads",
    "select_pairs",
    "shipped_head_scores",
    "shipped_predictors",
]

"""kvzip-cache: KVzip query-agnostic KV cache compression as a native transformers cache.

Importing the package registers the "kvzip" attention implementation (and its mask function) with transformers.
"""

from ._version import __version__
from .attention import ATTN_IMPLEMENTATION, register
from .cache import CompressReport, KVzipCache
from .head_scores import HeadScores, shipped_head_scores
from .scorers import ScorePredictor, shipped_predictors
from .scoring import reconstruction_inputs
from .selection import select_heads, select_pairs
from .templates import encode_context, encode_contexts, encode_queries, encode_query

register()

__all__ = [
    "ATTN_IMPLEMENTATION",
    "CompressReport",
    "HeadScores",
    "KVzipCache",
    "ScorePredictor",
    "__version__",
    "encode_context",
    "encode_contexts",
    "encode_queries",
    "encode_query",
    "reconstruction_inputs",
    "register",
    "select_heads",
    "select_pairs",
    "shipped_head_scores",
    "shipped_predictors",
]

"""Head scores as a layer scorer: KVzip's context-independent compression (``level="head"``).

Every pair of a KV head scores that head's precomputed importance (`HeadScores`), so a head keeps its whole context
or none of it. As a layer scorer it serves ``compress`` (no scoring pass at all) and a prefill that drops heads
chunk by chunk (the full cache never exists).
"""

from __future__ import annotations

import torch

from ..config import kv_shape, text_config
from ..head_scores import HeadScores
from ..parallel import tensor_parallel_of


class HeadScorer:
    """Rates every pair with its KV head's score.

    Args:
        head_scores: a `HeadScores` (checked against ``model``) or a ``[num_layers, num_kv_heads]`` tensor.
        model: the model whose cache is scored (checks the scores' shape and, under tensor parallelism, tells which
            KV heads this rank holds).
    """

    name, level = "head", "head"

    def __init__(self, head_scores: HeadScores | torch.Tensor, model=None) -> None:
        if isinstance(head_scores, HeadScores):
            if model is not None:
                head_scores.check(model)
            head_scores = head_scores.scores
        self.scores = torch.as_tensor(head_scores, dtype=torch.float32)  # [L, H]
        if self.scores.dim() != 2:
            raise ValueError(f"head scores must be [num_layers, num_kv_heads]; got shape {list(self.scores.shape)}")
        self.parallel = None
        if model is not None:
            config = text_config(model)
            expected = (config.num_hidden_layers, kv_shape(config)[0])
            if tuple(self.scores.shape) != expected:
                raise ValueError(f"head_scores has shape {list(self.scores.shape)} but this model needs "
                                 f"[num_layers, num_kv_heads] = {list(expected)}")
            self.parallel = tensor_parallel_of(model, expected[1])

    def score_layer(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor,
                    positions: torch.Tensor) -> torch.Tensor:
        """``[B, H, t]``: the head's score at each of its pairs."""
        if layer_idx >= self.scores.shape[0]:
            raise ValueError(f"these head scores cover {self.scores.shape[0]} layers; the model has more")
        heads = self.scores[layer_idx].to(keys.device)
        if self.parallel is not None:
            heads = self.parallel.local(heads, dim=0)
        if heads.numel() != keys.shape[1]:
            raise ValueError(f"these head scores have {heads.numel()} KV heads per layer; the cache holds "
                             f"{keys.shape[1]}")
        batch, num_heads, length = keys.shape[:3]
        return heads[None, :, None].expand(batch, num_heads, length)

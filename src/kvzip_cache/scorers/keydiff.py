"""KeyDiff (arXiv 2504.15364): keep the keys least like the others.

Per (row, KV head), the anchor is the mean direction of the keys given (``mean(k / ||k||)``); a pair scores the
negative cosine similarity of its key to that anchor, so keys pointing away from the crowd rank first. Keys only:
no query, no attention weights, no extra pass, which makes it a layer scorer that works wherever pairs are evicted
(a whole context, each prefill chunk, each decoding window: the anchor is the mean of what is scored together).
Left padding (position ``-1``) stays out of the anchor. Scores are cosines in [-1, 1], comparable within a head;
hence its level ``"pair-uniform"`` (the same share of every head), as in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KeyDiffScorer:
    """The KeyDiff layer scorer (see the module docstring)."""

    name, level = "keydiff", "pair-uniform"

    def score_layer(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor,
                    positions: torch.Tensor) -> torch.Tensor:
        """``[B, H, t]`` float32: ``-cos(k, anchor)`` with ``anchor = mean over real pairs of k / ||k||``."""
        keys = keys.float()
        real = (positions >= 0)[:, None, :, None].to(keys.dtype)  # [B, 1, t, 1]
        anchor = (F.normalize(keys, dim=-1) * real).sum(dim=2, keepdim=True) / real.sum(dim=2, keepdim=True).clamp(min=1)
        return -F.cosine_similarity(keys, anchor, dim=-1)

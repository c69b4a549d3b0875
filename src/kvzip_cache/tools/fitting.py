"""Fitting score predictors to exact scores: closed-form ridge per layer, and one batched MLP trainer for all layers.

The MLP trainer fits every layer's predictor at once (``[L, ...]`` weights, batched matrix products), on windows of
consecutive positions drawn from the packed training data (`kvzip_cache.tools.training.ScoreDataset`), so that an
objective can compare pairs of the same context and head. Objectives (`OBJECTIVES`):

- ``"mse"``: mean squared error of the log scores, every pair alike (how the first shipped predictors were fitted);
- ``"censored"``: squared error above each (window, head)'s median target only; below it a prediction need only stay
  below the median. Most pairs are evicted at any useful ratio, and their exact order does not matter;
- ``"rank"``: the mean squared error plus a pairwise logistic loss between pairs that exact KVzip ranks on either
  side of a random keep boundary (ratio 0.1 to 0.5) of the same (window, head): the order across the boundary is what
  a top-k selection reads, the squared error keeps heads and layers on one scale (one pair-level top-k).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..scorers.predictor import LayerPredictor

OBJECTIVES = ("mse", "censored", "rank")
RANK_PAIRS = 32  # sampled (kept, evicted) pairs per (window, head) per step
TIE = 1e-3  # log-score differences below this are ties: no ranking signal


class LayerStack(nn.Module):
    """All layers' predictors side by side: standardise ``[L, n, F]`` features, then Linear-GELU-Linear to ``[L, n, H]``.

    Args:
        mean: ``[L, F]`` feature means (the standardisation is fixed, not trained).
        std: ``[L, F]`` feature standard deviations.
        num_heads: KV heads per layer (outputs).
        hidden: the MLP's width.
        generator: seeds the initial weights (uniform in +-1/sqrt(fan_in), as nn.Linear).
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_heads: int, hidden: int,
                 generator: torch.Generator) -> None:
        super().__init__()
        layers, features = mean.shape
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())

        def uniform(*shape: int, fan_in: int) -> nn.Parameter:
            bound = fan_in ** -0.5
            return nn.Parameter(torch.empty(shape).uniform_(-bound, bound, generator=generator).to(mean.device))

        self.w1 = uniform(layers, features, hidden, fan_in=features)
        self.b1 = nn.Parameter(torch.zeros(layers, 1, hidden, device=mean.device))
        self.w2 = uniform(layers, hidden, num_heads, fan_in=hidden)
        self.b2 = nn.Parameter(torch.zeros(layers, 1, num_heads, device=mean.device))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[L, n, F]`` (any float dtype) -> ``[L, n, H]`` float32 predicted log scores."""
        scaled = (features.float() - self.mean[:, None]) / self.std[:, None]
        hidden = nn.functional.gelu(torch.baddbmm(self.b1, scaled, self.w1))
        return torch.baddbmm(self.b2, hidden, self.w2)

    def layer_predictors(self) -> list[LayerPredictor]:
        """One `LayerPredictor` per layer with the same weights (what a `ScorePredictor` holds and saves)."""
        out = []
        layers, features, hidden = self.w1.shape
        for j in range(layers):
            module = LayerPredictor(features, self.w2.shape[2], hidden)
            with torch.no_grad():
                module.mean.copy_(self.mean[j])
                module.std.copy_(self.std[j])
                module.net[0].weight.copy_(self.w1[j].T)
                module.net[0].bias.copy_(self.b1[j, 0])
                module.net[2].weight.copy_(self.w2[j].T)
                module.net[2].bias.copy_(self.b2[j, 0])
            out.append(module.cpu().eval())
        return out


def fit_ridge(features: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-3) -> LayerPredictor:
    """One layer's linear predictor by ridge regression in closed form (float64, deterministic).

    Args:
        features: ``[N, F]`` pair features.
        targets: ``[N, H]`` float32 log scores.
        ridge: L2 penalty, relative to the number of samples.
    """
    num, in_features = features.shape
    features = features.double()
    mean = features.mean(dim=0)
    std = features.std(dim=0).clamp(min=1e-6)
    scaled = (features - mean) / std
    target_mean = targets.double().mean(dim=0)
    gram = scaled.T @ scaled + ridge * num * torch.eye(in_features, dtype=torch.float64, device=features.device)
    weight = torch.linalg.solve(gram, scaled.T @ (targets.double() - target_mean))  # [F, H]
    module = LayerPredictor(in_features, targets.shape[1], None)
    with torch.no_grad():
        module.mean.copy_(mean.float())
        module.std.copy_(std.float())
        module.net.weight.copy_(weight.T.float())
        module.net.bias.copy_(target_mean.float())
    return module.cpu().eval()


def sample_windows(bounds: torch.Tensor, count: int, window: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, window]`` int64 indices of windows of consecutive positions, each inside one context.

    A window starts around a uniformly drawn position (longer contexts give more windows) and is shifted to fit its
    context. ``bounds``: ``[contexts + 1]`` int64 offsets of the packed contexts, each at least ``window`` long.
    """
    total = int(bounds[-1])
    anchor = torch.randint(total, (count,), generator=generator)
    context = torch.searchsorted(bounds, anchor, right=True) - 1
    lo, hi = bounds[context], bounds[context + 1] - window
    start = (anchor - window // 2).clamp(min=lo).minimum(hi)
    return start[:, None] + torch.arange(window)


def objective_loss(objective: str, pred: torch.Tensor, target: torch.Tensor, generator: torch.Generator,
                   rank_weight: float = 1.0) -> torch.Tensor:
    """The training loss of ``[L, W, T, H]`` predicted vs exact log scores (``W`` windows of ``T`` positions)."""
    if objective == "mse":
        return (pred - target).pow(2).mean()
    if objective == "censored":
        floor = target.median(dim=2, keepdim=True).values  # [L, W, 1, H]
        return (pred.maximum(floor) - target.maximum(floor)).pow(2).mean()
    if objective != "rank":
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    length = target.shape[2]
    flat_pred, flat_target = pred.transpose(2, 3), target.transpose(2, 3)  # [L, W, H, T]
    order = flat_target.argsort(dim=-1, descending=True)  # best first
    # CPU draws (reproducible on any device): a keep boundary per (layer, window, head), then pairs across it
    draws = torch.rand((3, *order.shape[:3], RANK_PAIRS), generator=generator).to(target.device)
    kept = ((0.1 + 0.4 * draws[0, ..., :1]) * length).long().clamp(1, length - 1)  # [L, W, H, 1]
    above = order.gather(-1, (draws[1] * kept).long())
    below = order.gather(-1, (kept + draws[2] * (length - kept)).long().clamp(max=length - 1))
    margin = flat_pred.gather(-1, above) - flat_pred.gather(-1, below)
    informative = (flat_target.gather(-1, above) - flat_target.gather(-1, below)) > TIE
    pairwise = (nn.functional.softplus(-margin) * informative).sum() / informative.sum().clamp(min=1)
    return (pred - target).pow(2).mean() + rank_weight * pairwise


def previous_index(index: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """The packed index of each position's predecessor in its context (a context's first position: itself)."""
    starts = bounds.to(index.device)[torch.searchsorted(bounds.to(index.device), index, right=True) - 1]
    return torch.where(index > starts, index - 1, index)


def gather_features(features: torch.Tensor, index: torch.Tensor, bounds: torch.Tensor,
                    previous: bool) -> torch.Tensor:
    """``[L, n, F]`` features at packed ``index`` (``[L, n, 2F]`` with the predecessor's beside them)."""
    here = features.index_select(1, index)
    if not previous:
        return here
    return torch.cat([here, features.index_select(1, previous_index(index, bounds))], dim=-1)


def fit_mlp(features: torch.Tensor, targets: torch.Tensor, bounds: torch.Tensor, *, hidden: int,
            objective: str = "rank", steps: int | None = None, epochs: float = 30.0, window: int = 256,
            windows_per_step: int = 64, lr: float = 1e-3, rank_weight: float = 1.0, previous: bool = False,
            seed: int = 0, progress=None) -> LayerStack:
    """Fit every layer's MLP at once.

    Args:
        features: ``[L, N, F]`` packed pair features (any float dtype; bf16 keeps 1M tokens of a small model on one
            GPU), on the device that trains.
        targets: ``[L, N, H]`` float32 log scores, same device.
        bounds: ``[contexts + 1]`` int64 CPU offsets of the contexts in the packing.
        hidden: the MLP's width.
        objective: one of `OBJECTIVES`.
        steps: optimiser steps; default ``epochs`` passes over the data (at least 50).
        window: consecutive positions per window (at most the shortest context).
        windows_per_step: windows per step (``window * windows_per_step`` positions of every layer).
        previous: also feed the predecessor's features (a study of context beyond one position; such a stack has
            no `LayerPredictor` form).

    Returns:
        the trained `LayerStack` (eval mode). Deterministic for a seed on one device: every random draw comes from a
        seeded CPU generator.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    shortest = int((bounds[1:] - bounds[:-1]).min())
    if shortest < 2:
        raise ValueError(f"the MLP trains on windows of consecutive positions of one context; a training context holds "
                         f"{shortest} position(s): give texts of at least 2 context tokens")
    window = min(window, shortest)
    generator = torch.Generator().manual_seed(seed)
    mean = torch.stack([features[j].float().mean(dim=0) for j in range(len(features))])
    std = torch.stack([features[j].float().std(dim=0) for j in range(len(features))]).clamp(min=1e-6)
    if previous:
        mean, std = torch.cat([mean, mean], dim=-1), torch.cat([std, std], dim=-1)
    stack = LayerStack(mean, std, targets.shape[2], hidden, generator)
    with torch.no_grad():
        stack.b2.copy_(targets.mean(dim=1, keepdim=True))
    per_step = window * windows_per_step
    steps = steps or max(50, math.ceil(epochs * int(bounds[-1]) / per_step))
    optimizer = torch.optim.Adam(stack.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    stack.train()
    for _ in (progress(range(steps)) if progress else range(steps)):
        index = sample_windows(bounds, windows_per_step, window, generator).flatten().to(features.device)
        pred = stack(gather_features(features, index, bounds, previous))
        shape = (len(pred), windows_per_step, window, pred.shape[-1])
        loss = objective_loss(objective, pred.view(shape), targets.index_select(1, index).view(shape), generator,
                              rank_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return stack.eval()

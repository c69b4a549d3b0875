"""The call-order state machine's reference side (tests/test_state_machine.py), written without the library's code.

- **Per-row float64 replay.** Every cache row is replayed alone (its padding stripped: a row answers as it would
  alone) by conftest's float64 reference attention over a dense `DynamicCache`, chunk by chunk as the cache was
  filled, hiding from each chunk exactly the pairs the cache had evicted when that chunk ran (`RowReference`).
- **Raters of our own.** The rating a layer scorer gives is recomputed from the REFERENCE's own keys, values and
  positions: a `ScorePredictor` from its documented weights (RoPE undone with tables computed here from the config,
  features, standardisation, linear / GELU MLP; not ``predict``, ``rotary_tables`` or ``unrotate``), head scores
  broadcast, and a test-owned layer scorer (`KeyScorer`).
- **Selections checked, not recomputed.** `check_selection` accepts a keep mask when it keeps exactly the number of
  pairs a level keeps (``floor(ratio * n + 0.5)``) and no dropped pair outscores a kept one by more than a float
  tolerance (a near tie may go either way between float32 and float64); the replay then hides exactly the pairs the
  cache says it evicted.
- **Refusals.** `check_refusal` accepts an exception only when a ``raise`` statement of the library raised it (not a
  torch shape error inside library code) with one of the expected messages; `cache_state` is a bit-for-bit
  snapshot of everything a cache holds, to show that a refusal changed nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import dis
import math
import os
import re

import torch
from torch import nn
from transformers import DynamicCache

import kvzip_cache
from conftest import HIDDEN_PAIRS

_LIBRARY = os.path.dirname(os.path.abspath(kvzip_cache.__file__)) + os.sep


def full_layers(config) -> list[int]:
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [i for i, kind in enumerate(types) if kind == "full_attention"]


def kept_count(ratio: float, n: int) -> int:
    """The documented budget: ``round(ratio * n)`` with halves up, at most ``n``."""
    return min(n, math.floor(ratio * n + 0.5))


# ------------------------------------------------------------------------------------------------------------ raters
def rope_tables(config, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(cos, sin)`` ``[t, D]`` of the full-attention layers' default RoPE at ``positions`` (``[t]``)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    params = params.get("full_attention", params)
    assert params.get("rope_type", "default") == "default", params
    theta, dim = float(params["rope_theta"]), config.head_dim
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.double()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _unrotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``[H, t, D]`` post-RoPE keys back by their angle: ``k cos - rotate_half(k) sin``."""
    half = keys.shape[-1] // 2
    return keys * cos - torch.cat([-keys[..., half:], keys[..., :half]], dim=-1) * sin


def predictor_rater(predictor, config):
    """``rate(layer, keys [H, t, D], values, positions [t]) -> [H, t]`` float64: a `ScorePredictor`'s predicted log
    scores, computed here from its weights (``layers[i].mean / std / net``) and the documented features."""

    @torch.no_grad()
    def rate(layer, keys, values, positions):
        keys, values = keys.double(), values.double()
        if predictor.features == "rotated-key+value":
            key_part = keys
        else:
            cos, sin = rope_tables(config, positions)
            key_part = _unrotate(keys, cos, sin)
        parts = [key_part] if predictor.features == "key" else [key_part, values]
        features = torch.cat(parts, dim=-1).permute(1, 0, 2).reshape(keys.shape[1], -1)  # [t, H * F]
        module = predictor.layers[layer]
        x = (features - module.mean.double()) / module.std.double()
        if isinstance(module.net, nn.Linear):
            out = x @ module.net.weight.double().T + module.net.bias.double()
        else:
            first, last = module.net[0], module.net[2]
            hidden = x @ first.weight.double().T + first.bias.double()
            hidden = 0.5 * hidden * (1.0 + torch.erf(hidden / math.sqrt(2.0)))  # exact GELU
            out = hidden @ last.weight.double().T + last.bias.double()
        return out.T  # [H, t]

    return rate


def head_rater(head_scores: torch.Tensor):
    """Head scores as a rating: every pair of a KV head gets the head's score."""

    def rate(layer, keys, values, positions):
        return head_scores[layer].double()[:, None].expand(keys.shape[0], keys.shape[1]).clone()

    return rate


class KeyScorer:
    """A layer scorer owned by the tests: a fixed projection of each key, the value's first dim and the position.

    The cache calls it with the keys, values and position ids it holds; the reference calls it (`rater`) with its
    own, so wrong pairs, wrong positions or a wrong padding convention on the library's side change the selection.
    """

    name, level = "test-keys", "pair-uniform"

    def __init__(self, num_layers: int, head_dim: int, seed: int = 3) -> None:
        self.weights = torch.randn(num_layers, head_dim, generator=torch.Generator().manual_seed(seed),
                                   dtype=torch.float64)

    def _rate(self, layer, keys, values, positions):  # [..., t, D], [..., t, D], [..., t]
        return keys.double() @ self.weights[layer] + values.double()[..., 0] + torch.sin(positions.double() * 0.37)

    def score_layer(self, layer_idx, keys, values, positions):  # [B, H, t, D], [B, H, t, D], [B, t]
        return self._rate(layer_idx, keys, values, positions[:, None, :]).float()

    def rater(self):
        return lambda layer, keys, values, positions: self._rate(layer, keys, values, positions[None, :])


# --------------------------------------------------------------------------------------------------------- selections
def check_selection(scores: torch.Tensor, keep: torch.Tensor, ratio: float, level: str, what: str) -> None:
    """Raise unless ``keep`` is a selection at ``level`` of one row's ``scores``.

    Args:
        scores: ``[L, H, t]`` float64: NaN where a pair does not compete (sliding layer, padding, protected prefix),
            -inf where it competes but was evicted before (a re-selection: it counts, it cannot come back).
        keep: ``[L, H, t]`` bool, the cache's selection.
    """
    scores, keep = scores.double(), keep.bool()
    valid = ~torch.isnan(scores)
    eligible = torch.isfinite(scores)
    finite = scores[eligible]
    tol = 1e-4 * (1.0 + (float(finite.abs().max()) if finite.numel() else 0.0))
    assert not bool((keep & ~eligible).any()), f"{what}: keeps a pair that does not compete or was evicted"
    if level == "head":
        heads_valid = valid.any(-1)  # [L, H]
        head_score = scores.nan_to_num(float("-inf")).amax(-1)
        n_heads = int(heads_valid.any(-1).sum()) * scores.shape[1]  # heads of the layers with a selectable pair
        kept_heads = keep.any(-1)
        assert torch.equal(keep, eligible & kept_heads[..., None]), f"{what}: a kept head does not keep all its pairs"
        candidates = heads_valid & torch.isfinite(head_score)
        expected = min(kept_count(ratio, n_heads), int(candidates.sum()))
        assert int(kept_heads.sum()) == expected, f"{what}: kept {int(kept_heads.sum())} heads, expected {expected}"
        _no_better_dropped(head_score[kept_heads], head_score[candidates & ~kept_heads], tol, what)
        return
    if level == "pair":
        groups = [(slice(None),)]
    elif level == "pair-uniform":
        groups = [(layer, head) for layer in range(scores.shape[0]) for head in range(scores.shape[1])
                  if bool(valid[layer, head].any())]
    else:
        raise AssertionError(f"unknown level {level}")
    for group in groups:
        n, usable = int(valid[group].sum()), int(eligible[group].sum())
        expected = min(kept_count(ratio, n), usable)
        got = int(keep[group].sum())
        assert got == expected, f"{what}: kept {got} pairs of {n} (group {group}), expected {expected} at {ratio}"
        _no_better_dropped(scores[group][keep[group]], scores[group][eligible[group] & ~keep[group]], tol, what)


def _no_better_dropped(kept: torch.Tensor, dropped: torch.Tensor, tol: float, what: str) -> None:
    if kept.numel() and dropped.numel():
        assert float(kept.min()) >= float(dropped.max()) - tol, (
            f"{what}: dropped a pair scored {float(dropped.max()):.6g} and kept one scored {float(kept.min()):.6g}")


# ---------------------------------------------------------------------------------------------------- row replays
@dataclasses.dataclass
class RowReference:
    """One cache row replayed alone: the float64 reference's dense cache after the context and the row's tail.

    Attributes:
        ctx: the context row (of the prefill) this row asks about.
        cache: the reference's `DynamicCache`: real tokens only (no padding), positions 0, 1, ...
        n_ctx: real context tokens.
        segments: ``(ids [k], mask [k] bool, tail_hidden at that time)`` of every forward after the context,
            in padded coordinates (the cache's).
        tail_hidden: ``{full layer: [H, tail_real]}`` tail pairs evicted while decoding.
    """

    ctx: int
    cache: DynamicCache
    n_ctx: int
    segments: list = dataclasses.field(default_factory=list)
    tail_hidden: dict = dataclasses.field(default_factory=dict)

    @property
    def tail_real(self) -> int:
        return sum(int(mask.sum()) for _, mask, _ in self.segments)

    @property
    def tail_padded(self) -> int:
        return sum(len(ids) for ids, _, _ in self.segments)

    def real_index(self, offset: int) -> int:
        """The index among the tail's real tokens of the real token at padded tail offset ``offset``."""
        masks = [mask for _, mask, _ in self.segments]
        flat = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)
        return int(flat[:offset].sum())

    def tail_mask(self) -> torch.Tensor:
        masks = [mask for _, mask, _ in self.segments]
        return torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)


def feed(reference, row: RowReference, ids: torch.Tensor, mask: torch.Tensor, ctx_hidden: dict,
         record: bool = True) -> torch.Tensor:
    """Feed ``ids`` (``[k]``, padding where ``mask`` is False) to the row alone; hidden: ``ctx_hidden`` (``{layer: [H,
    n_ctx]}``) and the row's evicted tail pairs. Returns ``[k, V]`` float64 logits (NaN at padding)."""
    mask = mask.bool()
    real = ids[mask]
    logits = torch.full((len(ids), reference.config.vocab_size), float("nan"), dtype=torch.float64)
    before = row.n_ctx + row.tail_real
    if real.numel():
        HIDDEN_PAIRS.update({layer: torch.cat([ctx_hidden[layer], row.tail_hidden[layer]], -1)[None]
                             for layer in ctx_hidden})
        try:
            with torch.no_grad():
                out = reference(input_ids=real[None],
                                attention_mask=torch.ones(1, before + len(real), dtype=torch.long),
                                position_ids=torch.arange(before, before + len(real))[None], past_key_values=row.cache,
                                use_cache=True)
        finally:
            HIDDEN_PAIRS.clear()
        logits[mask] = out.logits[0].double()
    if record:
        row.segments.append((ids.clone(), mask.clone(), {k: v.clone() for k, v in row.tail_hidden.items()}))
        row.tail_hidden = {k: torch.cat([v, torch.zeros(v.shape[0], len(real), dtype=torch.bool)], -1)
                           for k, v in row.tail_hidden.items()}
    return logits


def replay_context(reference, ids: torch.Tensor, mask: torch.Tensor, start: int, base: int,
                   chunks: list[tuple[int, int]], chunk_keep: torch.Tensor | None, rate=None):
    """Replay one context row (padded ``ids``/``mask``, first context position ``start``) chunk by chunk.

    ``chunk_keep``: ``[L, H, S - base]`` the pairs an evicting prefill kept (None: a dense prefill, nothing hidden);
    each chunk is hidden the pairs that earlier chunks evicted. ``rate``: when given, each chunk's selectable pairs are
    rated from the reference's own keys right after the chunk ran.

    Returns ``(DynamicCache, n_ctx, scores [L, H, S - base] float64 NaN where not rated)``.
    """
    config = reference.config
    layers, heads = full_layers(config), config.num_key_value_heads
    seq = len(ids)
    pad = seq - int(mask.sum())
    n_ctx = seq - pad
    cache = DynamicCache()  # full layers only: conftest's reference attention slides the window itself
    hidden = {layer: torch.zeros(heads, n_ctx, dtype=torch.bool) for layer in layers}
    scores = torch.full((config.num_hidden_layers, heads, seq - base), float("nan"), dtype=torch.float64)
    for lo, hi in chunks:
        first = max(lo, pad)
        if first >= hi:
            continue
        HIDDEN_PAIRS.update({layer: hidden[layer][None, :, : first - pad] for layer in layers})
        try:
            with torch.no_grad():
                reference(input_ids=ids[None, first:hi], attention_mask=torch.ones(1, hi - pad, dtype=torch.long),
                          position_ids=torch.arange(first - pad, hi - pad)[None], past_key_values=cache, use_cache=True)
        finally:
            HIDDEN_PAIRS.clear()
        scored = max(first, start)
        if scored >= hi:
            continue
        if rate is not None:
            positions = torch.arange(scored - pad, hi - pad)
            for layer in layers:
                keys = cache.layers[layer].keys[0, :, scored - pad : hi - pad]
                values = cache.layers[layer].values[0, :, scored - pad : hi - pad]
                scores[layer, :, scored - base : hi - base] = rate(layer, keys, values, positions)
        if chunk_keep is not None:
            for layer in layers:
                hidden[layer][:, scored - pad : hi - pad] = ~chunk_keep[layer, :, scored - base : hi - base]
    return cache, n_ctx, scores


def context_hidden(keep: torch.Tensor | None, mask: torch.Tensor, start: int, base: int, layers, heads) -> dict:
    """``{layer: [H, n_ctx]}`` the context pairs of one row that ``keep`` (``[L, H, S - base]``) evicted."""
    seq = len(mask)
    pad = seq - int(mask.sum())
    hidden = {layer: torch.zeros(heads, seq - pad, dtype=torch.bool) for layer in layers}
    if keep is not None:
        for layer in layers:
            hidden[layer][:, start - pad :] = ~keep[layer, :, start - base :]
    return hidden


# ---------------------------------------------------------------------------------------------------------- refusals
def check_refusal(error: BaseException, refusals: list[tuple[type, str]], call: str) -> None:
    """Raise unless ``error`` is one of the library's refusals ``(kind, message pattern)``: an instance of the kind,
    raised by a ``raise`` statement in ``kvzip_cache`` (the instruction the innermost frame stopped at is a raise:
    not an error of torch or transformers, nor a torch error inside library code), with a message matching the
    pattern. (The instruction, not the source line: others may be editing the source while the tests run.)"""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code if tb is not None else None
    instruction = None if code is None else next(
        (i.opname for i in dis.get_instructions(code) if i.offset == tb.tb_lasti), None)
    origin = "?" if code is None else f"{code.co_filename}:{tb.tb_lineno} ({code.co_name}, {instruction})"
    detail = f"{call} raised {type(error).__name__}: {error} (at {origin}); expected one of {refusals}"
    assert code is not None and os.path.abspath(code.co_filename).startswith(_LIBRARY) and \
        instruction == "RAISE_VARARGS", f"not raised by a refusal of the library: {detail}"
    assert any(isinstance(error, kind) and re.search(pattern, str(error), re.S) for kind, pattern in refusals), \
        f"a refusal, but not an expected one: {detail}"


def cache_state(obj, _seen=None):
    """A bit-for-bit description of everything ``obj`` (a `KVzipCache`) holds: tensors as dtype, shape and bytes,
    recursing into the library's and transformers' cache objects; scorers and models by identity."""
    seen = set() if _seen is None else _seen
    if isinstance(obj, torch.Tensor):
        data = obj.detach().cpu().contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
        return ("tensor", str(data.dtype), tuple(data.shape), raw)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.dtype, torch.device)):
        return obj
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(cache_state(item, seen) for item in obj))
    if isinstance(obj, dict):
        return ("dict", tuple((repr(key), cache_state(value, seen)) for key, value in sorted(obj.items(), key=repr)))
    module = type(obj).__module__ or ""
    scorer = hasattr(obj, "score_layer") or hasattr(obj, "score_context")
    if (module.startswith("kvzip_cache") or module.startswith("transformers.cache_utils")) and not scorer \
            and not isinstance(obj, nn.Module):
        if id(obj) in seen:
            return ("seen", type(obj).__name__)
        seen.add(id(obj))
        fields = vars(obj) if hasattr(obj, "__dict__") else {f.name: getattr(obj, f.name)
                                                              for f in dataclasses.fields(obj)}
        return (type(obj).__name__, cache_state(dict(fields), seen))
    return ("object", type(obj).__name__, id(obj))


def truncated(reference, row: RowReference, context_cache: DynamicCache, ctx_hidden: dict, tokens: int) -> RowReference:
    """The row with only the first ``tokens`` (padded) tokens of its tail: replayed again from the context, each
    segment with the hidden set it had when it was fed."""
    new = RowReference(row.ctx, copy.deepcopy(context_cache), row.n_ctx, [],
                       {layer: hidden[:, :0].clone() for layer, hidden in row.tail_hidden.items()})
    left = tokens
    for ids, mask, hidden_then in row.segments:
        if left <= 0:
            break
        ids, mask, left = ids[:left], mask[:left], left - len(ids[:left])
        new.tail_hidden = {layer: hidden.clone() for layer, hidden in hidden_then.items()}
        feed(reference, new, ids, mask, ctx_hidden)
    new.tail_hidden = {layer: hidden[:, : new.tail_real].clone() for layer, hidden in row.tail_hidden.items()}
    return new

"""Float64 references for eviction by any layer scorer, independent of the library's selection and eviction code.

Each replays the model with conftest's reference attention over a dense `DynamicCache`, rates pairs from ITS OWN
cached keys with the rating function under test (``rate(layer, keys, values, positions) -> [B, H, t]``, the layer
scorer's contract), picks the kept pairs with its own top-k (`top_pairs`, not `kvzip_cache.selection`) and hides
the rest from every later token. The library must then keep exactly the same pairs and produce the same logits.

Nothing here calls the library: a score predictor is re-run from its raw weights in float64 (`predictor_rating`),
RoPE is undone with tables computed from the config (`unrotate64`), the top-k is `top_pairs`. Tests in
test_predictor.py check that each of these agrees with the library's own (`rotary_tables`, `predict`,
`select_pairs`), so a bug in either shows as a disagreement instead of on both sides.
"""

from __future__ import annotations

import math

import torch
from transformers import DynamicCache

from conftest import HIDDEN_PAIRS


def full_layers(config) -> list[int]:
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [i for i, kind in enumerate(types) if kind == "full_attention"]


def fp8_round(pairs: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` keys or values as an fp8 store holds them: each row divided by its own ``amax x (1 / 448)``
    scale (the float32 nearest 1/448; a product, correctly rounded on every device), rounded to float8 e4m3fn,
    multiplied back (the format's definition, written here without the library)."""
    inverse = torch.tensor(1 / 448, dtype=torch.float32)
    scale = (pairs.float().abs().amax(dim=-1, keepdim=True) * inverse).clamp(min=torch.finfo(torch.float32).tiny)
    return ((pairs.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(pairs.dtype)


def round_cached(dense: DynamicCache, layers: list[int], span: slice) -> None:
    """Round the pairs of positions ``span`` of the full ``layers`` of a dense cache to fp8 (`fp8_round`), in place."""
    for i in layers:
        layer = dense.layers[i]
        layer.keys[:, :, span] = fp8_round(layer.keys[:, :, span])
        layer.values[:, :, span] = fp8_round(layer.values[:, :, span])


def rope_tables64(config, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``[B, t, R / 2]`` float64, of the full-attention layers' default RoPE at ``positions``
    (``theta_i = position * base^(-2i / R)`` over the ``R`` rotated dims), from the config alone."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params:  # Gemma3: one set of parameters per layer type
        params = dict(params["full_attention"])
    if params.get("rope_type", "default") != "default":
        raise NotImplementedError(f"the test reference implements default RoPE only, not {params['rope_type']!r}")
    base = params.get("rope_theta", getattr(config, "rope_theta", None))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    rotated = int(head_dim * factor)
    exponents = torch.arange(0, rotated, 2, dtype=torch.float64) / rotated
    angles = positions.double()[..., None] * base ** -exponents  # [B, t, R / 2]
    return angles.cos(), angles.sin()


def unrotate64(config, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE keys ``[B, H, t, D]`` float64 from cached (post-RoPE) ones at ``positions`` ``[B, t]``.

    RoPE turns each pair ``(x_i, x_{i + R/2})`` by ``theta_i``: ``y_i = x_i cos - x_{i+R/2} sin``, ``y_{i+R/2} =
    x_{i+R/2} cos + x_i sin``; turning back by ``-theta_i`` gives ``x``. Dims past ``R`` (partial rotary) pass as
    they are.
    """
    cos, sin = rope_tables64(config, positions)
    cos, sin = cos[:, None], sin[:, None]  # over heads
    half = cos.shape[-1]
    keys = keys.double()
    first, second, rest = keys[..., :half], keys[..., half : 2 * half], keys[..., 2 * half :]
    return torch.cat([first * cos + second * sin, second * cos - first * sin, rest], dim=-1)


def predictor_forward64(module, features: torch.Tensor) -> torch.Tensor:
    """A `LayerPredictor` (``linear`` or ``mlp``) run from its raw weights in float64: standardise, then ``W x + b``
    or ``W2 gelu(W1 x + b1) + b2`` with the exact (erf) GELU. ``[..., F]`` -> ``[..., H]``."""
    weights = {name: tensor.double() for name, tensor in module.state_dict().items()}
    x = (features.double() - weights["mean"]) / weights["std"]
    if "net.weight" in weights:
        return x @ weights["net.weight"].T + weights["net.bias"]
    hidden = x @ weights["net.0.weight"].T + weights["net.0.bias"]
    hidden = 0.5 * hidden * (1.0 + torch.erf(hidden / math.sqrt(2.0)))
    return hidden @ weights["net.2.weight"].T + weights["net.2.bias"]


def predictor_rating(predictor, model):
    """The rating a `ScorePredictor` gives, as a ``rate`` function, recomputed in float64 without the library: RoPE
    undone with `unrotate64` (``model``'s config), features ``[pre-RoPE key | value]`` of each KV head side by side,
    then `predictor_forward64` on the layer's weights."""
    if predictor.features != "key+value":
        raise NotImplementedError(f"the test reference implements the key+value features only, not "
                                  f"{predictor.features!r}")
    config = model.config

    def rate(layer, keys, values, positions):
        unrotated = unrotate64(config, keys, positions.clamp(min=0))
        features = torch.cat([unrotated, values.double()], dim=-1).permute(0, 2, 1, 3).flatten(2)  # [B, t, H * 2D]
        return predictor_forward64(predictor.layers[layer], features).transpose(1, 2)  # [B, H, t]

    return rate


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded mask, -1 on padding (the layer scorer's convention)."""
    mask = mask.bool()
    return (mask.long().cumsum(-1) - 1).masked_fill(~mask, -1)


def top_pairs(scores: torch.Tensor, ratio: float, uniform: bool = False) -> torch.Tensor:
    """``[L, B, H, t]`` bool: per row, the ``floor(ratio * n + 0.5)`` best of its ``n`` non-NaN scores (over layers x
    heads x positions), or with ``uniform`` that many of each (layer, head)'s; earlier index first on ties."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for row in range(scores.shape[1]):
        groups = [(slice(None),)] if not uniform else [(layer, head) for layer in range(scores.shape[0])
                                                      for head in range(scores.shape[2])]
        for group in groups:
            view = scores[:, row][group]
            flat = view.flatten()
            valid = ~torch.isnan(flat)
            k = min(int(valid.sum()), math.floor(ratio * int(valid.sum()) + 0.5))
            order = sorted(range(flat.numel()), key=lambda i: (not bool(valid[i]), -float(flat[i]) if valid[i] else 0, i))
            chosen = torch.zeros(flat.numel(), dtype=torch.bool)
            chosen[order[:k]] = True
            keep[:, row][group] = chosen.view(view.shape)
    return keep


def rate_span(rate, dense: DynamicCache, layers: list[int], num_layers: int, span: slice, positions: torch.Tensor,
              selectable: torch.Tensor) -> torch.Tensor:
    """``[L, B, H, t]`` float scores of the reference cache's pairs in ``span`` (NaN where not ``selectable``)."""
    keys0 = dense.layers[layers[0]].keys[:, :, span]
    scores = torch.full((num_layers, keys0.shape[0], keys0.shape[1], keys0.shape[2]), float("nan"))
    for i in layers:
        keys, values = dense.layers[i].keys[:, :, span], dense.layers[i].values[:, :, span]
        scores[i] = rate(i, keys.float(), values.float(), positions).float()
    return scores.masked_fill(~selectable[None, :, None, :], float("nan"))


@torch.no_grad()
def compressed_keep(reference, rate, ids, mask, starts, ratio, uniform=False) -> torch.Tensor:
    """The keep mask ``[L, B, H, S - min(starts)]`` of compressing a prefilled context with ``rate``."""
    config = reference.config
    layers = full_layers(config)
    dense = DynamicCache()  # full layers: sliding windows are the reference attention's business
    positions = positions_of(mask)
    reference(input_ids=ids, attention_mask=mask.long(), position_ids=positions.clamp(min=0), past_key_values=dense,
              use_cache=True)
    base = int(starts.min())
    selectable = (mask.bool() & (torch.arange(ids.shape[1])[None, :] >= starts[:, None]))[:, base:]
    scores = rate_span(rate, dense, layers, config.num_hidden_layers, slice(base, None), positions[:, base:],
                       selectable)
    return top_pairs(scores, ratio, uniform)


def hidden_from_keep(keep: torch.Tensor, mask, starts, layers, total: int) -> dict[int, torch.Tensor]:
    """``{layer: [B, H, total]}`` the context pairs a keep mask evicted (to hide from later tokens)."""
    base = int(starts.min())
    seq = mask.shape[1]
    selectable = (mask.bool() & (torch.arange(seq)[None, :] >= starts[:, None]))[:, base:]
    hidden = {}
    for i in layers:
        evicted = torch.zeros(keep.shape[1], keep.shape[2], total, dtype=torch.bool)
        evicted[:, :, base:seq] = ~keep[i] & selectable[:, None, :]
        hidden[i] = evicted
    return hidden


@torch.no_grad()
def top_among(scores: torch.Tensor, candidates: torch.Tensor, ratio: float) -> torch.Tensor:
    """``[L, B, H, n]`` bool: per row, ``floor(ratio * n + 0.5)`` pairs (``n``: the row's non-NaN scores), the best of
    the ``candidates`` (earlier index first on ties): a budget carried over everything rated so far."""
    keep = torch.zeros_like(candidates)
    for row in range(scores.shape[1]):
        flat, allowed = scores[:, row].flatten(), candidates[:, row].flatten() & ~torch.isnan(scores[:, row].flatten())
        k = math.floor(ratio * int((~torch.isnan(flat)).sum()) + 0.5)
        order = sorted((i for i in range(flat.numel()) if allowed[i]), key=lambda i: (-float(flat[i]), i))
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[order[:k]] = True
        keep[:, row] = chosen.view(keep[:, row].shape)
    return keep


def evicting_prefill(reference, rate, ids, mask, starts, chunk, ratio, question, carry=False, fp8=False):
    """A prefill that, after every chunk, rates the chunk's context pairs, keeps the top ``ratio`` per row and hides
    the rest from all later tokens. Returns ``(keep [L, B, H, S - min(starts)], logits of the question)``.

    ``fp8``: once rated, each chunk's pairs are rounded to fp8 (`fp8_round`), as the store of fp8 kept pairs holds
    them for every later chunk and the question.

    ``carry``: instead, after every chunk the top ``ratio`` of ALL pairs rated so far are kept among those not hidden
    yet (each with the score it got when its chunk was rated); the others are hidden from then on."""
    batch, seq = ids.shape
    config = reference.config
    layers, heads = full_layers(config), config.num_key_value_heads
    full_mask = torch.cat([mask, torch.ones_like(question)], 1)
    positions = positions_of(full_mask)
    in_context = torch.arange(seq)[None, :] >= starts[:, None]
    hidden = {i: torch.zeros(batch, heads, seq, dtype=torch.bool) for i in layers}
    dense = DynamicCache()  # full layers: sliding windows are the reference attention's business
    base = int(starts.min())
    keep = torch.zeros(config.num_hidden_layers, batch, heads, seq - base, dtype=torch.bool)
    rated = torch.full(keep.shape, float("nan"))
    try:
        for lo in range(0, seq, chunk):
            hi = min(lo + chunk, seq)
            HIDDEN_PAIRS.update({i: hidden[i][:, :, :lo] for i in layers})
            reference(input_ids=ids[:, lo:hi], attention_mask=mask[:, :hi], position_ids=positions[:, lo:hi].clamp(min=0),
                      past_key_values=dense, use_cache=True)
            selectable = mask[:, lo:hi].bool() & in_context[:, lo:hi]
            chunk_scores = rate_span(rate, dense, layers, config.num_hidden_layers, slice(lo, hi), positions[:, lo:hi],
                                     selectable)
            if fp8:
                round_cached(dense, layers, slice(lo, hi))
            first = max(lo, base)
            if carry:
                rated[..., first - base : hi - base] = chunk_scores[..., first - lo :]
                held = keep[..., : hi - base].clone()
                held[..., first - base :] = True
                keep[..., : hi - base] = top_among(rated[..., : hi - base], held, ratio)
                for i in layers:
                    hidden[i][:, :, base:hi] = ~keep[i, :, :, : hi - base] & (mask[:, base:hi].bool()
                                                                              & in_context[:, base:hi])[:, None, :]
                continue
            chunk_keep = top_pairs(chunk_scores, ratio)
            for i in layers:
                hidden[i][:, :, lo:hi] = ~chunk_keep[i] & selectable[:, None, :]
            keep[..., first - base : hi - base] = chunk_keep[..., first - lo :]
        HIDDEN_PAIRS.update(hidden)
        out = reference(input_ids=question, attention_mask=full_mask, position_ids=positions[:, seq:],
                        past_key_values=dense, use_cache=True)
    finally:
        HIDDEN_PAIRS.clear()
    return keep, out.logits


@torch.no_grad()
def decode_with_eviction(reference, rate, context_hidden, ids, mask, question, question_mask, generated, ratio,
                         window, uniform=False, given=None):
    """Replay of ``[context; question; generated]`` that evicts the tail as ``evict_while_decoding`` should: when the
    tail reaches ``2 * window`` tokens its oldest multiple of ``window`` is rated, the top ``ratio`` per row kept
    (``uniform``: per (layer, head) of a row, the "pair-uniform" level). ``given``: keep masks ``[L, B, H, count]``,
    one per eviction, used instead of the replay's own top-k (exact ties, such as a repeated token's pairs, are broken
    by rounding noise here and by position in the library); the replay still checks when each eviction happens.

    ``context_hidden``: ``{layer: [B, H, S]}`` the context pairs the compressed cache evicted.
    Returns ``(logits [steps, B, V] of the generated positions, decisions [(start, keep [L, B, H, count])])``.
    """
    config = reference.config
    layers, heads = full_layers(config), config.num_key_value_heads
    batch, ctx_len = ids.shape
    full_ids = torch.cat([ids, question, generated], 1)
    full_mask = torch.cat([mask, question_mask, torch.ones_like(generated)], 1).bool()
    positions = positions_of(full_mask)
    total = full_ids.shape[1]
    hidden = {i: torch.zeros(batch, heads, total, dtype=torch.bool) for i in layers}
    for i in layers:
        hidden[i][:, :, :ctx_len] = context_hidden[i][:, :, :ctx_len]
    dense = DynamicCache()  # full layers: sliding windows are the reference attention's business
    steps = [(ctx_len, ctx_len + question.shape[1])]
    steps += [(end, end + 1) for end in range(ctx_len + question.shape[1], total - 1)]
    decided, decisions, logits = ctx_len, [], []
    try:
        reference(input_ids=ids, attention_mask=full_mask[:, :ctx_len].long(),
                  position_ids=positions[:, :ctx_len].clamp(min=0), past_key_values=dense, use_cache=True)
        for lo, hi in steps:
            tail = lo - decided
            if tail >= 2 * window:
                count = (tail - window) // window * window
                span = slice(decided, decided + count)
                selectable = full_mask[:, span]
                if given is not None:
                    keep = given[len(decisions)]
                else:
                    keep = top_pairs(rate_span(rate, dense, layers, config.num_hidden_layers, span,
                                               positions[:, span], selectable), ratio, uniform)
                for i in layers:
                    hidden[i][:, :, span] = ~keep[i] & selectable[:, None, :]
                decisions.append((decided, keep))
                decided += count
            HIDDEN_PAIRS.update({i: hidden[i][:, :, :hi] for i in layers})
            out = reference(input_ids=full_ids[:, lo:hi], attention_mask=full_mask[:, :hi].long(),
                            position_ids=positions[:, lo:hi].clamp(min=0), past_key_values=dense, use_cache=True)
            logits.append(out.logits[:, -1])
    finally:
        HIDDEN_PAIRS.clear()
    return torch.stack(logits), decisions


@torch.no_grad()
def reference_generate(reference, context_ids, context_mask, hidden, prompt_ids, prompt_mask=None, *, seed=None,
                       num_beams=1, **generate_kwargs):
    """``reference.generate`` over ``[context; prompt]`` with the ``hidden`` context pairs masked from every token
    after the context: the dense answer a compressed cache must give (greedy, beams or sampling).

    The context is prefilled first into a dense `DynamicCache`, every pair visible (as when the cache was filled);
    ``hidden`` (``{layer: [B, H, context_len]}``) then hides the evicted pairs from the prompt and from every
    generated token, through conftest's reference attention. ``num_beams`` > 1 repeats the prefilled rows as
    ``cache.batch_repeat_interleave`` does for the compressed cache. ``seed``: ``torch.manual_seed`` right before
    ``generate``, so that sampling draws the same numbers as a run seeded the same way.
    """
    context_mask = torch.ones_like(context_ids) if context_mask is None else context_mask
    prompt_mask = torch.ones_like(prompt_ids) if prompt_mask is None else prompt_mask
    dense = DynamicCache()  # full layers: a sliding layer's window is left to the reference attention and its mask
    reference(input_ids=context_ids, attention_mask=context_mask.long(),
              position_ids=positions_of(context_mask).clamp(min=0), past_key_values=dense, use_cache=True)
    hidden = {layer: pairs.repeat_interleave(num_beams, 0) if pairs.shape[0] > 1 else pairs
              for layer, pairs in hidden.items()}
    if num_beams > 1:
        dense.batch_repeat_interleave(num_beams)
    ids = torch.cat([context_ids, prompt_ids], 1)
    mask = torch.cat([context_mask, prompt_mask], 1).long()
    HIDDEN_PAIRS.update(hidden)
    try:
        if seed is not None:
            torch.manual_seed(seed)
        return reference.generate(ids, attention_mask=mask, past_key_values=dense, num_beams=num_beams,
                                  **generate_kwargs)
    finally:
        HIDDEN_PAIRS.clear()


def held_bytes(cache) -> int:
    """Bytes of every floating-point tensor storage the cache's layers hold (each storage once, views and spare
    capacity included), found by walking the layers' attributes: what the cache really allocates for keys and
    values, counted without `kv_bytes`."""
    seen, total = set(), 0

    def visit(value):
        nonlocal total
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                storage = value.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif hasattr(value, "__dataclass_fields__"):
            for name in value.__dataclass_fields__:
                visit(getattr(value, name))

    for layer in cache.layers:
        for value in vars(layer).values():
            visit(value)
    return total

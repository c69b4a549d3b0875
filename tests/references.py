"""Float64 references for eviction by any layer scorer, independent of the library's selection and eviction code.

Each replays the model with conftest's reference attention over a dense `DynamicCache`, rates pairs from ITS OWN
cached keys with the rating function under test (``rate(layer, keys, values, positions) -> [B, H, t]``, the layer
scorer's contract), picks the kept pairs with its own top-k (`top_pairs`, not `kvzip_cache.selection`) and hides
the rest from every later token. The library must then keep exactly the same pairs and produce the same logits.
"""

from __future__ import annotations

import math

import torch
from transformers import DynamicCache

from conftest import HIDDEN_PAIRS


def full_layers(config) -> list[int]:
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [i for i, kind in enumerate(types) if kind == "full_attention"]


def predictor_rating(predictor, model):
    """The rating a `ScorePredictor` gives, as a ``rate`` function (RoPE undone with ``model``'s own tables)."""
    from kvzip_cache.scorers.rotary import rotary_tables

    def rate(layer, keys, values, positions):
        cos, sin = rotary_tables(model, positions.clamp(min=0))
        return predictor.predict(layer, keys, values, cos, sin)

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
    dense = DynamicCache(config=config)
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
def evicting_prefill(reference, rate, ids, mask, starts, chunk, ratio, question):
    """A prefill that, after every chunk, rates the chunk's context pairs, keeps the top ``ratio`` per row and hides
    the rest from all later tokens. Returns ``(keep [L, B, H, S - min(starts)], logits of the question)``."""
    batch, seq = ids.shape
    config = reference.config
    layers, heads = full_layers(config), config.num_key_value_heads
    full_mask = torch.cat([mask, torch.ones_like(question)], 1)
    positions = positions_of(full_mask)
    in_context = torch.arange(seq)[None, :] >= starts[:, None]
    hidden = {i: torch.zeros(batch, heads, seq, dtype=torch.bool) for i in layers}
    dense = DynamicCache(config=config)
    base = int(starts.min())
    keep = torch.zeros(config.num_hidden_layers, batch, heads, seq - base, dtype=torch.bool)
    try:
        for lo in range(0, seq, chunk):
            hi = min(lo + chunk, seq)
            HIDDEN_PAIRS.update({i: hidden[i][:, :, :lo] for i in layers})
            reference(input_ids=ids[:, lo:hi], attention_mask=mask[:, :hi], position_ids=positions[:, lo:hi].clamp(min=0),
                      past_key_values=dense, use_cache=True)
            selectable = mask[:, lo:hi].bool() & in_context[:, lo:hi]
            chunk_keep = top_pairs(rate_span(rate, dense, layers, config.num_hidden_layers, slice(lo, hi),
                                             positions[:, lo:hi], selectable), ratio)
            for i in layers:
                hidden[i][:, :, lo:hi] = ~chunk_keep[i] & selectable[:, None, :]
            first = max(lo, base)
            keep[..., first - base : hi - base] = chunk_keep[..., first - lo :]
        HIDDEN_PAIRS.update(hidden)
        out = reference(input_ids=question, attention_mask=full_mask, position_ids=positions[:, seq:],
                        past_key_values=dense, use_cache=True)
    finally:
        HIDDEN_PAIRS.clear()
    return keep, out.logits


@torch.no_grad()
def decode_with_eviction(reference, rate, context_hidden, ids, mask, question, question_mask, generated, ratio,
                         window):
    """Replay of ``[context; question; generated]`` that evicts the tail as ``evict_while_decoding`` should: when the
    tail reaches ``2 * window`` tokens its oldest multiple of ``window`` is rated, the top ``ratio`` per row kept.

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
    dense = DynamicCache(config=config)
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
                keep = top_pairs(rate_span(rate, dense, layers, config.num_hidden_layers, span, positions[:, span],
                                           selectable), ratio)
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

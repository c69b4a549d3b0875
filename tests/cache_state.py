"""A bit-for-bit snapshot of everything a `KVzipCache` holds, for tests that check a refused or failed call changed
nothing: every layer's stored tensors (dense keys and values, the ragged store with its offsets and positions, the
tail's written slots, the sliding windows and their rollback snapshots), lengths and row maps, and the cache's own
record (ids, masks, scores, keep mask, digests, what compressed it, pending inputs).

Tensors are compared by their bytes (so NaN scores compare equal to themselves, and -0.0 differs from 0.0); spare
capacity beyond what a layer has written is not state, but its size shows in `kv_bytes`, which is compared too.
"""

from __future__ import annotations

import copy

import torch


def _bits(tensor: torch.Tensor | None):
    if tensor is None:
        return None
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return str(tensor.dtype), tuple(tensor.shape), flat.view(torch.uint8).numpy().tobytes()


def _layer_state(layer) -> dict:
    state = {"type": type(layer).__name__, "seq_length": int(layer.get_seq_length())}
    for name in ("cumulative_length", "context_length", "tail_length", "src_rows", "share", "is_compileable",
                 "owner", "static_mask_width", "_padded_steps"):
        if hasattr(layer, name):
            state[name] = copy.deepcopy(getattr(layer, name))  # a copy: a list the layer appends to later must not
            # change the snapshot with it
    state["keys"], state["values"] = _bits(layer.keys), _bits(layer.values)
    context = getattr(layer, "context", None)
    if context is not None:
        state["context"] = (_bits(context.keys), _bits(context.values), _bits(context.positions),
                            _bits(context.cu_seqlens), context.offsets, context.num_heads, context.max_seqlen,
                            _bits(context.key_scales), _bits(context.value_scales), str(context.dtype))
    if getattr(layer, "src_index", None) is not None:
        state["src_index"] = _bits(layer.src_index)
    if getattr(layer, "tail_keys", None) is not None and layer.tail_length:
        written = int(layer.tail_length)
        state["tail"] = (_bits(layer.tail_keys[:, :, :written]), _bits(layer.tail_values[:, :, :written]))
    snapshot = getattr(layer, "_snapshot", None)
    if snapshot is not None:  # a sliding layer's window for rollback
        state["snapshot"] = (_bits(snapshot[0]), _bits(snapshot[1]), snapshot[2])
    return state


def cache_state(cache) -> dict:
    """``{name: comparable value}`` of everything the cache holds (see the module docstring)."""
    state = {
        "seq_length": int(cache.get_seq_length()),
        "kv_bytes": cache.kv_bytes(),
        "is_compressed": cache.is_compressed,
        "compressed_with": cache.compressed_with,
        "score_source": cache.score_source,
        "weight_digests": copy.deepcopy(cache.weight_digests),
        "tokenizer_fields": copy.deepcopy(cache.tokenizer_fields),
        "decode_eviction": None if cache.decode_eviction is None else len(cache.decode_eviction.history),
        "scoring_pass": cache._scoring_pass,
        "kv_dtype": str(cache.kv_dtype),
    }
    for name in ("input_ids", "attention_mask", "context_start", "scores", "keep_mask", "pending_query_mask"):
        state[name] = _bits(getattr(cache, name))
    for idx, layer in enumerate(cache.layers):
        state[f"layer {idx}"] = _layer_state(layer)
    return state


def assert_same_state(before: dict, after: dict, ignore: tuple[str, ...] = ()) -> None:
    """Fail naming every part of the cache that differs between two `cache_state` snapshots (but the names in
    ``ignore``, of the cache or of its layers)."""
    changed = []
    for name in sorted((set(before) | set(after)) - set(ignore)):
        old, new = before.get(name), after.get(name)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += [f"{name}.{key}" for key in sorted((set(old) | set(new)) - set(ignore))
                        if old.get(key) != new.get(key)]
        elif old != new:
            changed.append(name)
    assert not changed, f"the cache changed: {', '.join(changed)}"

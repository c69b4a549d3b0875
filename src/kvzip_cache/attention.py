"""The "kvzip" attention implementation: registration, mask function and the entry point.

`import kvzip_cache` calls `register()`, after which ``from_pretrained(..., attn_implementation="kvzip")`` routes
every attention call of Llama, Qwen2, Qwen3, Gemma3, Mistral, Phi3 (and any model that calls its attention through
`AttentionInterface` right after `cache.update()`) here. Nothing in transformers or in the model is patched.

The mask function hands the attention function the plain 2D padding mask (or None): causal structure, sliding
windows and the compressed layout are all resolved here, from what the cache layer returned.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .backends import select_backend
from .views import CompressedScoringKV, RaggedKV, ScoringKV, WindowKV

ATTN_IMPLEMENTATION = "kvzip"


def kvzip_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask builder registered for "kvzip": the 2D padding mask ``[B, kv_length]`` (True = real token), or None.

    ``kv_length`` is the cache's logical length plus the new tokens (sliding layers: their window plus the new
    tokens), so the mask's last column is the last new token, as in transformers' flash-attention mask. A static
    cache (`KVzipCache.make_static`) asks for a fixed width instead (its context's length bucket plus the tail's
    capacity): the mask is padded with False on the right (slots not written yet), so that it keeps one shape from
    step to step and from document to document.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            "the kvzip attention takes a 2D padding mask [batch, seq]; got a mask of shape "
            f"{tuple(attention_mask.shape)}. Pass the 2D attention_mask your tokenizer returns."
        )
    # A static cache's query offset is a device tensor (its length never goes to the host), as for transformers'
    # StaticLayer; only then may the mask be narrower than kv_length: it is padded on the right and cut to kv_length
    # with no branch on its width, which grows every step (past kv_length when eviction while decoding packs the tail,
    # whose own slot mask then replaces the tail's columns): a compiled step would otherwise be recompiled there. A
    # narrower mask otherwise is the caller's error, which the attention function reports.
    static = isinstance(q_offset, torch.Tensor)
    if static:
        # A fresh copy: the cut is a view whose row stride is the growing mask's length plus kv_length, and generate
        # (transformers 5.17) hands the mask to the compiled step as it is; a stride that changes every step made
        # dynamo trace it as an integer input, and CUDA graphs record the step again for every new value (8B shape,
        # H100: 18.8 ms a step instead of ~10 during an 8K-token answer). (.contiguous() would keep the view: a
        # batch of one counts as contiguous whatever its row stride.)
        attention_mask = torch.nn.functional.pad(attention_mask.bool(), (0, kv_length), value=False)[:, :kv_length]
        attention_mask = attention_mask.clone(memory_format=torch.contiguous_format)
    else:
        attention_mask = attention_mask[:, -kv_length:].bool()
    # Compiled code must not read the mask on the host; and a static cache always gets the mask, even one with no
    # padding left: generate builds a compileable cache's masks eagerly, and a mask that turned into None when the
    # answer filled its width would recompile the decode step (it did, 41 s for the 8B shape on an H100).
    if static or torch.compiler.is_compiling() or not bool(attention_mask.all()):
        return attention_mask
    return None


def kvzip_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | RaggedKV | ScoringKV | CompressedScoringKV | WindowKV,
    value: torch.Tensor | RaggedKV | ScoringKV | CompressedScoringKV | WindowKV,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention entry point registered as "kvzip".

    Args:
        module: the model's attention module (gives ``is_causal``, and ``o_proj.weight`` to KVzip+ scoring passes).
        query: ``[B, Hq, q, D]`` post-RoPE queries.
        key: what the cache layer's ``update()`` returned: a dense ``[B, H, k, D]`` tensor, a `RaggedKV`
            (compressed layer), a `WindowKV` (static sliding-window layer) or a `ScoringKV` / `CompressedScoringKV`
            (reconstruction pass over a dense / compressed layer).
        value: the matching values (the same object as ``key`` for a `RaggedKV` or a `ScoringKV`).
        attention_mask: ``[B, k]`` bool padding mask from `kvzip_mask`, or None.
        scaling: the model's softmax scale (Gemma3 uses ``query_pre_attn_scalar ** -0.5``).
        sliding_window: set by transformers on sliding-window layers.

    Returns:
        ``(out [B, q, Hq, D], None)``: attention weights are never materialised.
    """
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if dropout and module.training:
        raise ValueError("the kvzip attention is for inference: call model.eval() (attention dropout is not supported)")
    backend = select_backend(query.device)

    if isinstance(key, torch.Tensor):
        _check_mask_width(attention_mask, key.shape[-2])
        out = backend.dense(query, key, value, scaling, attention_mask, sliding_window, getattr(module, "is_causal", True))
    elif isinstance(key, RaggedKV):
        if key.owner is not None and not torch.compiler.is_compiling() and id(module) != key.owner:
            raise ValueError(
                "this compressed KVzipCache was filled by another model object than the one now generating: its "
                "keys and values would be read with other weights. Generate with the model that prefilled, "
                "compressed or loaded the cache (an identical copy takes it over by cache.compress(copy, ratio) "
                "again, or KVzipCache.load(path, copy)), or prefill a new cache with this one. This step stopped "
                "partway: call cache.rollback() first"
            )
        if attention_mask is not None:
            _check_mask_width(attention_mask, key.length)
        tail_valid = key.tail_mask(attention_mask)
        out = backend.ragged(query, key, scaling, tail_valid)
    elif isinstance(key, WindowKV):  # a static sliding-window layer
        key_valid = key.slot_mask(attention_mask)
        out = backend.dense(query, key.keys, key.values, scaling, key_valid, sliding_window,
                            getattr(module, "is_causal", True), end=key.end)
    elif isinstance(key, (ScoringKV, CompressedScoringKV)):  # a reconstruction pass over a dense / compressed layer
        _check_mask_width(attention_mask, key.width)
        if key.is_plus and key.scores_out is not None:  # KVzip+ weights by ||W_O v||: hand over o_proj's weight
            out = backend.scoring(query, key, scaling, attention_mask, out_weight=_out_weight(module))
        else:
            out = backend.scoring(query, key, scaling, attention_mask)
    else:
        raise TypeError(
            f"the kvzip attention got keys of type {type(key).__name__}; it only works with a KVzipCache. "
            "Pass cache=KVzipCache(model) (past_key_values= before transformers 5.24), or load the model with another "
            "attn_implementation."
        )
    return out, None


def _out_weight(module: torch.nn.Module) -> torch.Tensor:
    """``[hidden, Hq * D]`` weight of the attention module's output projection (KVzip+ scores read it)."""
    o_proj = getattr(module, "o_proj", None)
    weight = getattr(o_proj, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"KVzip+ scores need the attention module's output projection as module.o_proj.weight "
            f"[hidden, heads x head_dim]; {type(module).__name__} has none. Score with target='kvzip' instead."
        )
    # Tensor parallelism: o_proj is split by input column, and this rank's shard holds exactly its query heads.
    return weight.to_local() if hasattr(weight, "to_local") else weight


def _check_mask_width(mask: torch.Tensor | None, width: int) -> None:
    if mask is not None and mask.shape[-1] != width:
        raise ValueError(
            f"attention_mask covers {mask.shape[-1]} positions but the cache holds {width}: the mask must cover the "
            "whole sequence [context; new tokens], as for DynamicCache (pass the full input_ids and attention_mask)."
        )


def register() -> None:
    """Register the "kvzip" attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvzip_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, kvzip_mask)


def uses_kvzip_attention(config) -> bool:
    """Whether a model config (or its text config) is set to the "kvzip" attention implementation."""
    text_config = config.get_text_config(decoder=True)
    return getattr(text_config, "_attn_implementation", None) == ATTN_IMPLEMENTATION

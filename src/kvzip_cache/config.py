"""What the library reads from a model's config, in one place: the text config, layer types, a fingerprint."""

from __future__ import annotations

import hashlib
import json

FULL, SLIDING = "full_attention", "sliding_attention"

# Config fields that decide the cache's shape and what a head computes; weights (fine-tunes) do not change them.
_FINGERPRINT_FIELDS = (
    "model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim",
    "layer_types", "sliding_window", "vocab_size",
)


def text_config(model_or_config):
    """The decoder's text config of a model or config (multimodal configs nest it)."""
    config = getattr(model_or_config, "config", model_or_config)
    if not hasattr(config, "get_text_config"):
        raise TypeError(f"expected a transformers model or config, got {type(model_or_config).__name__}")
    return config.get_text_config(decoder=True)


def config_fields(model_or_config) -> dict:
    """The architecture fields of a model's text config that `config_fingerprint` hashes (JSON-able values)."""
    config = text_config(model_or_config)
    fields = {name: getattr(config, name, None) for name in _FINGERPRINT_FIELDS}
    if fields["num_key_value_heads"] is None:
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    return json.loads(json.dumps(fields, default=str))


def field_differences(expected: dict, actual: dict) -> str:
    """``"name expected vs actual; ..."`` for the `config_fields` that differ (refusal messages name them)."""
    names = list(expected) + [name for name in actual if name not in expected]
    return "; ".join(f"{name} {expected.get(name)!r} vs {actual.get(name)!r}" for name in names
                     if expected.get(name) != actual.get(name))


def config_fingerprint(model_or_config) -> str:
    """Short hash of the architecture fields of a model's text config (same for a model and its fine-tunes)."""
    return hashlib.sha256(json.dumps(config_fields(model_or_config), sort_keys=True).encode()).hexdigest()[:16]


def layer_types(config) -> list[str]:
    """Per-layer attention type of a text config; reject what the ragged cache cannot represent."""
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("KVzipCache supports decoder-only models; encoder-decoder models are not supported")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError(
            f"{config.model_type}: attention logit soft-capping is not supported by the kvzip attention "
            "(supported: Llama 3, Qwen2/2.5, Qwen3, Gemma3, Mistral, Phi3 and similar)"
        )
    if getattr(config, "kv_lora_rank", None) or getattr(config, "use_mla", False):
        raise ValueError(f"{config.model_type}: multi-head latent attention (MLA) is not supported")
    types = getattr(config, "layer_types", None)
    if types is None:
        sliding = getattr(config, "sliding_window", None) is not None
        types = [SLIDING if sliding else FULL] * config.num_hidden_layers
    unsupported = sorted(set(types) - {FULL, SLIDING})
    if unsupported:
        raise ValueError(
            f"{config.model_type}: layer types {unsupported} are not supported by KVzipCache "
            "(supported: full_attention and sliding_attention layers)"
        )
    return list(types)


def full_attention_layers(config) -> list[int]:
    """Indices of the full-attention layers: the only ones KVzip scores and evicts."""
    return [i for i, kind in enumerate(layer_types(config)) if kind == FULL]


def kv_shape(config) -> tuple[int, int]:
    """``(num_kv_heads, head_dim)`` of a text config."""
    num_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return num_heads, head_dim

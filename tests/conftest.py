"""Shared fixtures: tiny random models of every supported architecture and an independent reference attention.

The reference ("kvzip_test_reference") is plain eager attention over a dense DynamicCache, with one extra ability:
a per-(layer, KV head, position) mask of pairs to hide from the query tokens. It shares no code with the library,
so comparing against it tests the library rather than restating it.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU, run the Triton kernels through Triton's interpreter (must be set before they are imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import (
    AttentionInterface,
    DynamicCache,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.masking_utils import AttentionMaskInterface

import kvzip_cache  # noqa: F401  (registers "kvzip")

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _configs():
    return {
        "llama": (LlamaConfig(**COMMON, head_dim=16), LlamaForCausalLM),
        "qwen2": (Qwen2Config(**COMMON), Qwen2ForCausalLM),
        "qwen2-sliding": (  # Qwen's own sliding layers: layers >= max_window_layers use a window
            Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=6, max_window_layers=1),
            Qwen2ForCausalLM,
        ),
        "qwen3": (Qwen3Config(**COMMON, head_dim=16), Qwen3ForCausalLM),
        "gemma3": (
            Gemma3TextConfig(
                **{**COMMON, "num_hidden_layers": 4},
                head_dim=16,
                sliding_window=6,
                layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                query_pre_attn_scalar=24,
            ),
            Gemma3ForCausalLM,
        ),
        "mistral": (MistralConfig(**COMMON, head_dim=16, sliding_window=None), MistralForCausalLM),
        "phi3": (Phi3Config(**COMMON), Phi3ForCausalLM),
    }


ARCHS = list(_configs())


def make_pair(arch: str, seed: int = 0):
    """(kvzip model, reference model) with the same random weights, float32, eval mode, separate configs."""
    config, cls = _configs()[arch]
    torch.manual_seed(seed)
    reference = cls(copy.deepcopy(config)).eval()
    # Random init leaves attention nearly uniform; sharper queries make evictions matter in the comparisons.
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "q_proj" in name or "k_proj" in name or "qkv_proj" in name:
                param.mul_(4.0)
    reference.set_attn_implementation("kvzip_test_reference")
    model = cls(copy.deepcopy(config)).eval()
    model.load_state_dict(reference.state_dict())
    model.set_attn_implementation("kvzip")
    return model, reference


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


# ---------------------------------------------------------------------------------------------- reference attention
HIDDEN_PAIRS: dict[int, torch.Tensor] = {}
"""layer_idx -> [B, H, k] bool, True = hide this cached key from every query (set by `reference_logits`)."""


def reference_mask(batch_size, q_length, kv_length, attention_mask=None, **kwargs):
    """The reference's mask function: only the 2D padding mask ``[B, kv_length]`` (True = real token)."""
    if attention_mask is None:
        return torch.ones(batch_size, kv_length, dtype=torch.bool)
    return attention_mask[:, -kv_length:].bool()


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs):
    """Eager attention in float64 plus the optional per-head hidden pairs.

    The queries are the last ``q`` of the ``k`` keys. A query sees the real (unpadded) keys up to itself; on a
    sliding layer, only the last ``sliding_window`` real tokens up to itself, counted as if its row had no padding
    (what the row would see asked alone).
    """
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1).double()
    value = value.repeat_interleave(groups, dim=1).double()
    logits = torch.matmul(query.double(), key.transpose(-1, -2)) * scaling
    q_len, k_len = query.shape[-2], key.shape[-2]
    real = attention_mask[:, -k_len:]  # [B, k]
    query_slots = torch.arange(k_len - q_len, k_len)
    allowed = (torch.arange(k_len)[None, :] <= query_slots[:, None])[None] & real[:, None, :]  # [B, q, k]
    if sliding_window is not None:
        seen = real.long().cumsum(-1)  # real tokens up to and including each slot
        allowed &= seen[:, None, :] > seen[:, query_slots][:, :, None] - sliding_window
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    hidden = HIDDEN_PAIRS.get(module.layer_idx)
    if hidden is not None:
        hide = torch.zeros(logits.shape[0], hidden.shape[1], logits.shape[-1], dtype=torch.bool)
        hide[..., : hidden.shape[-1]] = hidden
        logits = logits.masked_fill(hide.repeat_interleave(groups, dim=1)[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    out = torch.matmul(probs, value).to(query.dtype)
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register("kvzip_test_reference", reference_attention)
AttentionMaskInterface.register("kvzip_test_reference", reference_mask)


def reference_logits(reference, context_ids, *segments, context_mask=None, hidden=None, fp8=False):
    """Logits of the last segment from a dense DynamicCache: prefill the context, then feed each segment in turn.

    ``segments``: ``[B, n]`` id tensors (or ``(ids, mask)`` pairs) fed after the context, e.g. a question, or
    question, answer and follow-up for multi-turn. ``hidden``: optional {layer_idx: [B, H, k] bool} context pairs
    hidden from every segment's tokens (never from the context's own prefill). ``fp8``: the full layers' context
    pairs are rounded to fp8 (`references.fp8_round`) after the prefill, as a cache of fp8 kept pairs holds them.
    """
    cache = DynamicCache()  # full layers only: a sliding layer's window is the attention's business here
    masks = [torch.ones_like(context_ids) if context_mask is None else context_mask]
    ids = [context_ids]
    for segment in segments:
        seg_ids, seg_mask = segment if isinstance(segment, tuple) else (segment, torch.ones_like(segment))
        ids.append(seg_ids)
        masks.append(seg_mask)
    full_mask = torch.cat(masks, dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    start = 0
    try:
        with torch.no_grad():
            for index, seg_ids in enumerate(ids):
                if index == 1:
                    HIDDEN_PAIRS.update(hidden or {})
                    if fp8:
                        from references import full_layers, round_cached

                        round_cached(cache, full_layers(reference.config), slice(None))
                end = start + seg_ids.shape[1]
                out = reference(input_ids=seg_ids, attention_mask=full_mask[:, :end],
                                position_ids=positions[:, start:end], past_key_values=cache, use_cache=True)
                start = end
    finally:
        HIDDEN_PAIRS.clear()
    return out.logits


class ByteTokenizer:
    """A tokenizer stub without chat template: enough to build reconstruction prompts for tiny models."""

    chat_template = None
    bos_token_id = None

    def encode(self, text, add_special_tokens=False):
        return [3 + (ord(ch) % (VOCAB - 3)) for ch in text]


@pytest.fixture
def byte_tokenizer():
    return ByteTokenizer()

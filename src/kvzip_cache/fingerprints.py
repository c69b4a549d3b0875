"""Cheap fingerprints of what filled a cache besides its architecture (`config.config_fingerprint`): the weights and
the tokenizer. A cache refuses a model or tokenizer whose fingerprint differs from the one it recorded.

- Weights (`weight_digests`): for every parameter, a CRC-32 of 8 evenly spaced elements rounded to bfloat16. Another
  fine-tune of the same architecture changes essentially every weight, so it shows in (nearly) every tensor; the
  same checkpoint moved to another device, or loaded in float32 instead of bfloat16, gives the same digests. It is a
  sample, not a hash of the weights: a model that differs in a few elements only (e.g. a handful of embedding rows)
  can pass. Cost: a few small kernels per parameter and one host transfer per device (milliseconds for 8B).
- Tokenizer (`tokenizer_fields`): vocabulary size, a digest of the special tokens, of the chat template and of the ids
  of a probe text (KVzip's reconstruction prompts among it: exactly what scoring feeds). The class and
  ``name_or_path`` are recorded for messages only, so the same tokenizer loaded from a local folder passes.
- The model object (`attention_module_ids`): ``id()`` of each layer's attention module. A compressed layer's view
  carries it, and the attention refuses to run for another model's module (a second copy of the same checkpoint
  included): a check by identity, free at every decode step, where comparing weights would cost a host sync.
"""

from __future__ import annotations

import hashlib
import json
import zlib

import torch

_SAMPLES = 8  # elements sampled per parameter
# Scoring's prompts (see scoring.py) plus digits, accents, CJK and markup: tokenizers that split these alike
_PROBE = ("\n\nRepeat the previous context exactly.\n\nRepeat the part of the previous context exactly, starting with "
          "0123456789 Zürich, 東京 <b>x</b>\t  done")
_MESSAGE_ONLY = ("class", "name_or_path")  # recorded, shown in refusals, not compared


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def weight_digests(model) -> dict[str, int] | None:
    """``{parameter name: CRC-32 of a bfloat16 sample}``; None for an object without parameters."""
    named = getattr(model, "named_parameters", None)
    if named is None:
        return None
    samples: dict[str, torch.Tensor] = {}
    for name, param in named():
        data = param.detach()
        data = data.to_local() if hasattr(data, "to_local") else data  # tensor parallel: this rank's shard
        if data.is_meta or data.numel() == 0:
            continue  # offloaded to disk (accelerate): nothing to read here
        flat = data.reshape(-1)
        samples[name] = flat[:: max(flat.numel() // _SAMPLES, 1)][:_SAMPLES].to(torch.bfloat16)
    by_device: dict[torch.device, list[str]] = {}
    for name, sample in samples.items():
        by_device.setdefault(sample.device, []).append(name)
    digests = {}
    for names in by_device.values():  # one transfer (and host sync) per device, not per parameter
        host = torch.cat([samples[name] for name in names]).cpu().view(torch.int16)
        for name, part in zip(names, host.split([samples[name].numel() for name in names])):
            digests[name] = zlib.crc32(part.numpy().tobytes())
    return digests


def attention_module_ids(model) -> dict[int, int]:
    """``{layer index: id() of that layer's attention module}`` for the modules transformers builds with an integer
    ``layer_idx`` (``LlamaAttention``, ``Gemma3Attention``, ...) from the decoder's config (a vision tower's are not
    the cache's layers); layers whose module is not found are left out."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "modules"):
        return {}
    decoder = config.get_text_config(decoder=True)
    found: dict[int, int] = {}
    for module in model.modules():
        index = getattr(module, "layer_idx", None)
        own = getattr(module, "config", decoder) is decoder
        if isinstance(index, int) and own and type(module).__name__.endswith("Attention"):
            found.setdefault(index, id(module))
    return found


def weight_differences(expected: dict[str, int], actual: dict[str, int]) -> str | None:
    """None when the digests agree, else a short description (refusal messages quote it)."""
    common = [name for name in expected if name in actual]
    if not common:
        return "no parameter names in common"
    differ = [name for name in common if expected[name] != actual[name]]
    if not differ:
        return None
    return f"sampled weights of {len(differ)} of {len(common)} tensors differ, e.g. {differ[0]}"


def tokenizer_fields(tokenizer) -> dict:
    """What `tokenizer_fingerprint` hashes (plus the class and ``name_or_path``, for messages); JSON-able."""
    try:
        size = len(tokenizer)
    except TypeError:
        size = getattr(tokenizer, "vocab_size", None)
    special = [list(getattr(tokenizer, "all_special_tokens", []) or []),
               list(getattr(tokenizer, "all_special_ids", []) or [])]
    template = getattr(tokenizer, "chat_template", None)
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""),
        "vocab_size": size,
        "special_tokens": _digest(special),
        "chat_template": None if not template else _digest(template),
        "probe_ids": _digest(list(tokenizer.encode(_PROBE, add_special_tokens=False))),
    }


def tokenizer_fingerprint(fields: dict) -> str:
    """Short hash of `tokenizer_fields` without the message-only ones."""
    return _digest({name: value for name, value in fields.items() if name not in _MESSAGE_ONLY})

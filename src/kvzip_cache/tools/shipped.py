"""What the command-line tools share: where their files go, and what they call a model."""

from __future__ import annotations

import argparse
import json
from importlib.resources import files
from pathlib import Path

from ..zoo import PYPI_MODELS


def shipped_folder() -> Path:
    """The folder of the head scores and predictors shipped with the library (``kvzip_cache.scores``)."""
    return Path(str(files("kvzip_cache.scores")))


def check_output_folder(out: Path, update_shipped: bool, parser: argparse.ArgumentParser) -> Path:
    """``out``, unless it is the library's own scores folder and ``--update-shipped`` was not given."""
    if out.resolve() == shipped_folder().resolve() and not update_shipped:
        parser.error(f"--out {out} is the folder of the files shipped with kvzip-cache ({shipped_folder()}): pass "
                     "another folder, or --update-shipped to rewrite the shipped files on purpose")
    return out


def model_label(spec: str) -> tuple[str, str]:
    """``(short name for file names and manifests, the model's origin)`` of a ``--model`` spec: a PyPI short name and
    its Hub id, else the folder's or Hub repo's last part and the spec itself."""
    if spec in PYPI_MODELS:
        return spec, PYPI_MODELS[spec].hub_id
    return Path(spec.rstrip("/")).name or spec, spec


def write_report(path: str | Path | None, data: dict, indent: int = 2) -> None:
    """Write a command's results as JSON to ``path`` (its folder created), if a path was given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=indent) + "\n")

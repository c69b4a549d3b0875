"""The documentation site builds with `mkdocs build --strict`, and its API pages are generated from the docstrings.

Strict mode fails on any warning: a broken link or anchor, a page missing from the nav, a docstring that documents
a parameter the signature does not have. See mkdocs.yml.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra is not installed: pip install -e '.[docs]'")
pytest.importorskip("mkdocs_jupyter", reason="the docs extra is not installed: pip install -e '.[docs]'")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))


def test_site_builds_strict_with_generated_api_pages(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about MkDocs 2.0 is noise here
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}\n{result.stdout}"

    api_page = (site / "api" / "cache" / "index.html").read_text()
    # mkdocstrings renders every member with its full path as the anchor: the page was generated from the code.
    for member in ("KVzipCache", "KVzipCache.compress", "KVzipCache.prefill", "KVzipCache.rollback"):
        assert f'id="kvzip_cache.{member}"' in api_page, f"{member} is missing from the API page"
    assert "Score the context and evict all but" in api_page  # the first line of compress's docstring
    assert (site / "api" / "scoring" / "index.html").read_text().count("score_layer") > 2  # the scorer protocol

    assert (site / "index.html").is_file()
    assert (site / "results" / "smollm2-needle" / "score_vs_ratio.png").is_file()
    # The notebooks are rendered pages, with their saved outputs (mkdocs-jupyter never executes them here).
    for notebook in NOTEBOOKS:
        page = (site / "notebooks" / notebook.stem / "index.html").read_text()
        assert "jp-Notebook" in page and "jp-OutputArea" in page, f"{notebook.name} is not rendered with its outputs"


def test_every_notebook_is_linked_into_the_docs_and_in_the_navigation():
    """docs/notebooks/ links each examples/*.ipynb (mkdocs reads only docs/) and mkdocs.yml lists it under Notebooks."""
    nav = (ROOT / "mkdocs.yml").read_text()
    assert NOTEBOOKS, "no notebooks in examples/"
    for notebook in NOTEBOOKS:
        linked = ROOT / "docs" / "notebooks" / notebook.name
        assert linked.is_symlink() and linked.resolve() == notebook.resolve(), (
            f"link it: ln -s ../../examples/{notebook.name} docs/notebooks/")
        assert f"notebooks/{notebook.name}" in nav, f"{notebook.name} is missing from the Notebooks section of mkdocs.yml"
    extra = sorted(p.name for p in (ROOT / "docs" / "notebooks").iterdir() if not (ROOT / "examples" / p.name).exists())
    assert extra == [], f"docs/notebooks/ links notebooks that examples/ no longer has: {extra}"

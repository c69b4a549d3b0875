"""The example notebooks (examples/*.ipynb) run from top to bottom, and are saved with their outputs.

Each notebook runs in a fresh Jupyter kernel of this interpreter, from examples/, as a reader would run it; its own
asserts check the behaviour it shows. The committed files are only read, never written
(``python examples/run_notebooks.py`` re-executes and saves them).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest

from kvzip_cache.zoo import pypi_model_available

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
# The runner that saves the notebooks executes them here too: one way to run a notebook.
_spec = importlib.util.spec_from_file_location("run_notebooks", EXAMPLES / "run_notebooks.py")
run_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_notebooks)


# The five longest (97, 65, 81, 64 and 58 s on 2 cores) run under -m slow, so that the default run stays well under
# 15 minutes: what they show is tested directly by tests/test_decode_eviction.py, tests/test_shared.py,
# tests/test_eval.py, tests/test_head_scores.py and the left-padded batch tests of tests/test_cache_behaviour.py.
SLOW = {"long_answers", "many_questions", "small_evaluation", "head_level", "batch_of_documents"}
RUNS = [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW else p for p in NOTEBOOKS]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_kernel_runs_this_interpreter():
    manager = run_notebooks.kernel_manager()
    assert manager.kernel_spec.argv[0] == sys.executable


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_saved_with_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.execution_count is not None for cell in code), (
        f"{path.name} is saved without outputs: run python examples/run_notebooks.py {path.name}"
    )
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), "cells were run out of order"
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert not errors, f"{path.name} is saved with an error output"


@pytest.mark.skipif(not pypi_model_available("smollm2-135m"), reason="SmolLM2 is not installed (scripts/setup.sh)")
@pytest.mark.parametrize("path", RUNS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    before = _digest(path)
    try:
        run_notebooks.execute(path, timeout=300)  # one thread per kernel unless OMP_NUM_THREADS is set
    except nbclient.exceptions.CellExecutionError as error:
        traceback = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # the cell's source and traceback, without colours
        pytest.fail(f"{path.name} failed:\n{traceback}", pytrace=False)
    assert _digest(path) == before, f"running {path.name} changed the committed file"

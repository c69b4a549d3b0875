"""Execute the example notebooks and save them with their outputs (so that they render on GitHub).

    python examples/run_notebooks.py                        # every examples/*.ipynb
    python examples/run_notebooks.py quickstart.ipynb       # just one
    python examples/run_notebooks.py --check                # execute, but leave the files unchanged

Each notebook runs from examples/ in a Jupyter kernel of this Python interpreter, with OMP_NUM_THREADS=1 unless it
is set (on a 2-core machine with other work running, torch's thread per core was 10x slower than one thread).
Progress bars written with carriage returns are reduced to their final state before saving, so the saved outputs
stay small.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import nbformat
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parent


def kernel_manager() -> KernelManager:
    """A "python3" kernel running this interpreter (sys.executable), whatever kernels are installed elsewhere."""
    specs = KernelSpecManager(kernel_dirs=[])  # no installed kernels: only ipykernel's own, for sys.executable
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def execute(path: Path, timeout: int = 300) -> nbformat.NotebookNode:
    """Run every cell of the notebook at ``path`` (cwd: its folder) and return the executed notebook.

    Raises nbclient's CellExecutionError, which holds the failing cell's source and traceback.
    """
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, km=kernel_manager(), timeout=timeout,
                            resources={"metadata": {"path": str(path.parent)}})
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # see the module docstring
    client.execute(env=env, cleanup_kc=True)  # cleanup_kc: shut the kernel down (nbclient does not own our km)
    return notebook


def _final_state(text: str) -> str:
    """What a terminal shows for text with carriage returns: each line keeps only its last rewrite."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def clean(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Merge consecutive stream outputs and reduce progress bars to their final state; drop execution timings."""
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        outputs = []
        for output in cell.outputs:
            if output.output_type == "stream" and outputs and outputs[-1].output_type == "stream" \
                    and outputs[-1].name == output.name:
                outputs[-1].text += output.text
            else:
                outputs.append(output)
        for output in outputs:
            if output.output_type == "stream":
                output.text = re.sub(r"\n{3,}", "\n\n", _final_state(output.text))
        cell.outputs = [o for o in outputs if o.output_type != "stream" or o.text.strip()]
    return notebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", help="notebook file names in examples/ (default: all)")
    parser.add_argument("--check", action="store_true", help="execute only; do not write the outputs")
    args = parser.parse_args()
    paths = [EXAMPLES / name for name in args.notebooks] or sorted(EXAMPLES.glob("*.ipynb"))
    for path in paths:
        started = time.perf_counter()
        notebook = execute(path)
        seconds = time.perf_counter() - started
        if not args.check:
            nbformat.write(clean(notebook), path)
        print(f"{path.name}: {seconds:.1f} s{'' if args.check else ', saved'}", flush=True)


if __name__ == "__main__":
    main()

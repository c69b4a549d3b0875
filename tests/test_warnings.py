"""The documented API runs without a deprecation warning on the installed transformers.

transformers 5.24 renamed `past_key_values=` to `cache=` in `generate` and the models' `forward`, and warns
(FutureWarning, from its `deprecate_kwarg` decorator) whenever the old name is passed. pyproject.toml silences that
warning for the rest of the suite (the other tests pass the name every supported release knows); here every warning
is recorded, so a library call that passes the old name, or a documented step that needs it, fails.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

from kvzip_cache import KVzipCache
from kvzip_cache.compat import cache_kwarg

from conftest import ByteTokenizer, make_pair

ROOT = Path(__file__).resolve().parents[1]
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _deprecations(record) -> list[str]:
    return [f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}" for w in record
            if issubclass(w.category, DEPRECATIONS)]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_prefill_compress_generate_warn_nothing(arch):
    model, _ = make_pair(arch)
    keyword = cache_kwarg(model)  # the README's `cache=cache` on transformers >= 5.24, past_key_values= before
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")  # overrides pyproject's filters inside this block
        cache = KVzipCache(model)
        cache.prefill(model, _ids(80, 1), context_start=4, chunk_size=32)
        cache.compress(model, 0.5, tokenizer=ByteTokenizer())
        inputs = cache.inputs_for(_ids(6, 2))
        answer = model.generate(**inputs, **{keyword: cache}, max_new_tokens=4, do_sample=False)
        cache.rollback()
        cache.batch_repeat_interleave(2)  # beams: the documented step before generate(num_beams=n)
        model.generate(**inputs, **{keyword: cache}, num_beams=2, max_new_tokens=3, do_sample=False)
        cache.rollback()
    found = _deprecations(record)
    assert found == [], "\n".join(found)
    assert answer.shape == (1, inputs["input_ids"].shape[1] + 4)

    # The old name still works where transformers accepts it (with its warning): the same answer.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = model.generate(**inputs, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert torch.equal(again, answer)


def test_generate_takes_cache_from_5_24():
    import transformers
    from packaging.version import Version

    model, _ = make_pair("llama")
    new_name = Version(transformers.__version__).release >= (5, 24)
    assert cache_kwarg(model) == ("cache" if new_name else "past_key_values")


def test_docs_and_examples_pass_the_cache_by_the_new_name():
    """Every `generate(...)` in the README, the docs and the examples passes `cache=`; `past_key_values=` appears only
    in the notes for transformers before 5.24."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").glob("*.py")),
             *sorted((ROOT / "examples").glob("*.ipynb"))]
    offenders = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"generate\(.*past_key_values=|^\s*\"?\s*past_key_values=\w+,", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == [], "\n".join(offenders)

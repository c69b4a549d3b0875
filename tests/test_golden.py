"""Moving code changes nothing: keep masks, scores and greedy tokens of every way of scoring and evicting, on every
tiny architecture, are bit-identical to the recording in tests/data/golden.safetensors (see tests/golden_cases.py)."""

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import ARCHS
from golden_cases import GOLDEN, cases, differences, fingerprint


@pytest.fixture(scope="module")
def recorded():
    with safe_open(str(GOLDEN), "pt") as file:
        machine = file.metadata() or {}
    if machine != fingerprint():
        pytest.skip(f"the golden outputs were recorded on {machine or 'an unrecorded machine'}; this is "
                    f"{fingerprint()}: other floating-point bits. Record on this machine before moving code "
                    "(python tests/golden_cases.py --record), then --check after")
    return load_file(str(GOLDEN))


# The default run checks the architectures whose code paths differ most (plain full attention, Gemma3's sliding
# layers with one KV head, Qwen2's own sliding layers); every architecture with -m slow (about 4 minutes more on
# 2 cores: each one replays every scorer and eviction path).
DEFAULT_RUN = ("llama", "gemma3", "qwen2-sliding")


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
@pytest.mark.parametrize("arch", [a if a in DEFAULT_RUN else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS])
def test_outputs_are_bit_identical_to_the_recording(arch, recorded):
    expected = {name: tensor for name, tensor in recorded.items() if name.startswith(f"{arch}.")}
    assert expected, f"nothing recorded for {arch}"
    assert differences(expected, cases(arch)) == []

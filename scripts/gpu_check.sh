#!/usr/bin/env bash
# On a CUDA machine without network: install the package (no deps), run the GPU and kernel tests, then the
# benchmark with the given arguments. Logs and results go to ${OUT:-gpu_out}.
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# The device copy has no .git: `git rev-parse --short HEAD > .commit` here, and send .commit along (it is ignored).
export KVZIP_COMMIT=${KVZIP_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
rm -rf /tmp/site  # a warm machine keeps the last install, and pip --target would not replace it
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . > "$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -p no:cacheprovider -m "gpu or not slow" tests/test_kernels.py tests/test_gpu.py tests/test_multi_gpu.py \
    tests/test_architectures.py 2>&1 | tail -25 | tee "$out/tests.log"
fi
if [ "$#" -gt 0 ]; then
  python3 -m kvzip_cache.bench --out "$out/bench" "$@" 2>&1 | grep -v Warning | tee "$out/bench.log"
fi

#!/usr/bin/env bash
# On the GPU box: install, run the compiled-decoding GPU tests (and the kernel tail tests), then the compiled bench
# with the given arguments (python -m kvzip_cache.bench --compiled ...). Results under ${OUT:-gpu_out}/compiled.
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 KVZIP_COMMIT=${KVZIP_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
rm -rf /tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . > "$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
export PYTHONPATH=/tmp/site
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "static or compile" 2>&1 | grep -v DEBUG | tail -40 | tee "$out/tests_compiled.log"
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py -k "with_tail or scores" 2>&1 | tail -5 | tee -a "$out/tests_compiled.log"
fi
if [ "$#" -gt 0 ]; then
  python3 -m kvzip_cache.bench --compiled --out "$out/compiled" "$@" 2>&1 | grep -v -i warn | tee "$out/compiled.log"
fi

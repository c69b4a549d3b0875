#!/usr/bin/env bash
# On the device machine: this tree's GPU tests, then the same benchmark rows from this tree and from an older one,
# on one GPU in one run (figures compare only within a run). Logs and the reports (one file) go to ${OUT:-gpu_out}.
#
#   git archive REV src pyproject.toml README.md LICENSE MANIFEST.in scores | (mkdir -p .gpu_old && tar -x -C .gpu_old)
#   bash scripts/gpu_compare.sh .gpu_old --contexts 16384 --batches 1 --ratios 0.3 --predictor mlp
#
# The benchmark arguments run per tree as given, in the order old, new, new, old (a process's place in the run
# matters: on 2026-12-06 the first benchmark process of a call decoded KVzip at 44-48 ms/token against 25 for the
# second, with identical Python work per step; ABBA separates such an order effect from the code), then once more
# per tree with --shared 16 (many questions, one context). SKIP_TESTS=1, SKIP_BENCH=1 and SKIP_SHARED=1 leave a part
# out, so the parts can go in separate calls of at most 10 minutes.
set -uo pipefail
old=$1; shift
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
for tree in new old; do
  src=$([ "$tree" = new ] && echo . || echo "$old")
  rm -rf "/tmp/site_$tree"
  python3 -m pip install -q --no-deps --no-build-isolation --target "/tmp/site_$tree" "$src" > "/tmp/install_$tree.log" 2>&1 \
    || { tail -20 "/tmp/install_$tree.log"; exit 1; }
done
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  PYTHONPATH=/tmp/site_new timeout "${TEST_SECONDS:-240}" python3 -m pytest -q -p no:cacheprovider -m "gpu or not slow" \
    tests/test_kernels.py tests/test_gpu.py tests/test_architectures.py 2>&1 | tail -15 | tee "$out/tests.log"
  echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$out/tests.log"
fi
round=0
[ "${SKIP_BENCH:-0}" = 1 ] || for tree in old new new old; do
  round=$((round + 1))
  echo "== $tree (round $round)" >> "$out/bench.log"
  PYTHONPATH=/tmp/site_$tree timeout "${BENCH_SECONDS:-150}" python3 -m kvzip_cache.bench --out "/tmp/bench_${tree}_$round" \
    "$@" 2>&1 | grep -v -i warn | tail -12 | tee -a "$out/bench.log"
done
[ "${SKIP_SHARED:-0}" = 1 ] || for tree in old new; do
  PYTHONPATH=/tmp/site_$tree timeout "${BENCH_SECONDS:-150}" python3 -m kvzip_cache.bench --out "/tmp/shared_$tree" \
    --shared 16 --contexts "${SHARED_CONTEXT:-16384}" 2>&1 | grep -v -i warn | tail -12 | tee "$out/shared_$tree.log"
done
for report in /tmp/bench_*/report.md /tmp/shared_new/shared.md /tmp/shared_old/shared.md; do
  echo "===== $report"; cat "$report" 2>/dev/null
done > "$out/reports.md"  # one file: the device hands back at most 8

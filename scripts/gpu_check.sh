#!/usr/bin/env bash
# On a CUDA machine without network: install the package (no deps), run the GPU and kernel tests, then the
# benchmark with the given arguments. Logs and results go to ${OUT:-gpu_out}. Exits non-zero when a test fails, when
# the kernel or GPU tests did not all run (test_counts.txt has the counts per file), or when the benchmark fails.
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
status=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # The whole log goes to tests.log (its tail to the screen); pytest's own exit status decides, not tail's or tee's.
  python3 -m pytest -q -p no:cacheprovider -m "gpu or not slow" --junitxml="$out/tests.xml" tests/test_kernels.py \
    tests/test_gpu.py tests/test_multi_gpu.py tests/test_architectures.py > "$out/tests.log" 2>&1
  tests_status=$?
  tail -25 "$out/tests.log"
  # Counts per file; the kernel and GPU tests must all have run here (none skipped, none deselected to nothing).
  python3 - "$out/tests.xml" <<'COUNT' | tee "$out/test_counts.txt"
import collections, sys
import xml.etree.ElementTree as ET

counts = collections.defaultdict(collections.Counter)
for case in ET.parse(sys.argv[1]).iter("testcase"):
    name = case.get("classname", "").split(".")[-1] + ".py"
    outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
    counts[name][outcome] += 1
for name in sorted(counts):
    print(f"{name}: " + ", ".join(f"{counts[name][k]} {k}" for k in ("passed", "failure", "error", "skipped")))
required = ("test_kernels.py", "test_gpu.py")
missing = [name for name in required if counts[name]["passed"] == 0 or counts[name]["skipped"]]
if missing:
    print(f"FAIL: {', '.join(missing)} did not run in full on this machine (skipped or absent)")
    sys.exit(1)
COUNT
  counts_status=$?
  if [ "$tests_status" -ne 0 ] || [ "$counts_status" -ne 0 ]; then
    echo "GPU TESTS FAILED (pytest exit $tests_status, counts check exit $counts_status): see $out/tests.log"
    status=1
  fi
fi
if [ "$#" -gt 0 ]; then
  python3 -m kvzip_cache.bench --out "$out/bench" "$@" 2>&1 | grep -v Warning | tee "$out/bench.log"
  bench_status=${PIPESTATUS[0]}
  if [ "$bench_status" -ne 0 ]; then
    echo "BENCHMARK FAILED (exit $bench_status): see $out/bench.log"
    status=1
  fi
fi
exit "$status"

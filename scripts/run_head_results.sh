#!/usr/bin/env bash
# Head-level compression in the evaluation (docs/results/): precomputed head scores from scores/ at the recommended
# ratio 0.6 (and 0.3), against pair-level KVzip and the DuoAttention-style variant. Resumable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
R=docs/results
for task in needle squad; do
  $PY -m kvzip_cache.eval --model smollm2-135m --task $task --num-contexts 3 --max-questions 8 \
      --methods full kvzip kvzip-head kvzip-head-duo --ratios 0.6 0.3 \
      --head-scores scores/smollm2-135m.safetensors --out $R/smollm2-heads-$task
done

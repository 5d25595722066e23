#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with raysft and its test tools.
# torch (needed only by megatron-core in the tests) is pinned first to 2.13.0, whose CPU wheel
# this machine image provides, so that megatron-core does not pull the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
# The trainers' own data loaders for the layout tests (tests/trainers.py): Megatron-Bridge and
# XTuner, without their dependencies (GPU-only libraries their data modules do not use), and the
# datasets 3.x release XTuner's loader was written for, kept apart in .venv/trainers.
# LLaMA-Factory's data code (tokenized_path loading, its collators) with the libraries it imports.
pip install -q --no-deps --target .venv/trainers --upgrade "megatron-bridge==0.3.1" "xtuner==0.2.0" \
  "datasets==3.6.0" "dill==0.3.8" "multiprocess==0.70.16" "llamafactory==0.9.5" "peft==0.22.0" \
  "accelerate==1.16.0" "omegaconf==2.4.0" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import raysft, ray, tokenizers, fastokens, orjson, megatron.core, moto" 2>/dev/null \
  || { echo "setup failed: a dependency did not install" >&2; exit 1; }
[ -d .venv/trainers/megatron/bridge ] && [ -d .venv/trainers/xtuner ] && [ -d .venv/trainers/llamafactory ] \
  || { echo "setup failed: the trainers' loaders did not install" >&2; exit 1; }
echo "set up: . .venv/bin/activate"

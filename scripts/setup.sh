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
python -c "import raysft, ray, tokenizers, megatron.core, moto" 2>/dev/null \
  || { echo "setup failed: a dependency did not install" >&2; exit 1; }
echo "set up: . .venv/bin/activate"

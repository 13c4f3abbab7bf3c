#!/usr/bin/env bash
# Create .venv and install qwen35 into it. `scripts/setup.sh --test` adds what the tests need.
# torch is pinned to the CPU build (2.13.0); an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s\n' "$*"; }
step "creating .venv"
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1 || true
step "installing torch 2.13.0 (CPU)"
pip install --progress-bar on torch==2.13.0
if [[ "${1:-}" == "--test" ]]; then
  step "installing qwen35 with the serve, train and test extras"
  pip install --progress-bar on -e '.[test,serve,train]'
else
  step "installing qwen35 with the serve extra"
  pip install --progress-bar on -e '.[serve]'
fi
step "building the native CPU kernels (once; PyTorch is used where they cannot build)"
python -c "import qwen35.kernels as k; n = k.native(); print('native kernels:', n.isa if n else 'unavailable, using PyTorch')"

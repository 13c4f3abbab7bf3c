#!/usr/bin/env bash
# Create .venv and install qwen35 into it. `scripts/setup.sh --test` adds what the tests need.
# torch is pinned to the CPU build (2.13.0); an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1 || true
pip install -q torch==2.13.0
if [[ "${1:-}" == "--test" ]]; then
  pip install -q -e '.[test,serve,train]'
else
  pip install -q -e '.[serve]'
fi
# build the native CPU kernels now rather than on the first request (PyTorch is used where they cannot build)
python -c "import qwen35.kernels as k; n = k.native(); print('native kernels:', n.isa if n else 'unavailable, using PyTorch')"

#!/usr/bin/env bash
# The whole test suite on the CPU: kernels run under TRITON_INTERPRET=1 (set in tests/conftest.py).
# SGLang needs its own torch, so its tests run in .venv-sglang when that exists.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
.venv/bin/python -m pytest -q tests --ignore=tests/sglang "$@" || status=$?
if [ -x .venv-sglang/bin/python ]; then
  .venv-sglang/bin/python -m pytest -q tests/sglang "$@" || status=$?
fi
exit $status

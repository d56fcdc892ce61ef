#!/usr/bin/env bash
# The sm_90 compile check (issue 16, python -m triton_chunkkv.compile_check) with each Triton
# that scripts/setup.sh installed: .venv (the newest) and .venv-oldest (3.6, the GPU image's).
# Each run compares its variants with benchmarks/compile_reports/sm90-triton-<version>.json.
# Arguments go to every run (--full, --write, -v); JOBS compile processes (default: cores).
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
for venv in .venv .venv-oldest; do
  [ -x "$venv/bin/python" ] || continue
  echo "--- $venv"
  "$venv/bin/python" -m triton_chunkkv.compile_check -j "${JOBS:-$(nproc)}" "$@" || status=1
done
exit $status

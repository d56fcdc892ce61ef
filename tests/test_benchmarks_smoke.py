"""CI smoke run of the benchmark harness: tiny shapes on the CPU, so that the op and
end-to-end benchmarks, the regression check, the goal table and the plots never rot."""

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks/ sits beside the package, outside it

from benchmarks import baseline, compare, e2e, goals, ops, plots  # noqa: E402
from benchmarks.common import load_results  # noqa: E402
from benchmarks.floors import floor_bytes, kept_len  # noqa: E402
from benchmarks.shapes import E2E_PRESETS, LLAMA3_8B, OPS_PRESETS  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ops_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "ops.json"
    ops.run(OPS_PRESETS["smoke"], CPU, path, argv=["--preset", "smoke"])
    return path


def test_ops_rows_are_measured_with_floors(ops_results):
    results = json.loads(ops_results.read_text())
    meta = results["runs"][0]
    assert meta["device_slug"] == "cpu" and meta["ops_path"] == "torch-reference"
    assert meta["command"] == "python -m benchmarks.ops --preset smoke"
    assert {"date", "commit", "timer", "copy_bandwidth_gbps"} <= meta.keys()
    rows = results["rows"]
    assert {row["status"] for row in rows} == {"ok"}, [r for r in rows if r["status"] != "ok"]
    assert {(row["op"], row["impl"]) for row in rows} == {
        ("window_scores", "chunkkv"),
        ("window_scores", "torch-materialized"),
        ("chunk_sum", "chunkkv"),
        ("gather_chunks", "chunkkv"),
        ("compress", "chunkkv"),
        ("compress", "torch-materialized"),
        ("compress_layers", "chunkkv"),
        ("sparse_decode", "chunkkv"),
        ("sparse_decode", "sdpa-full"),
        ("sparse_decode", "sdpa-compacted"),
        ("sparse_decode", "flex-block-mask"),
    }
    assert len({row["id"] for row in rows}) == len(rows)
    bandwidth = meta["copy_bandwidth_gbps"] * 1e9
    for row in rows:
        assert row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["floor_ms"] == pytest.approx(row["floor_bytes"] / bandwidth * 1e3)
        assert row["bandwidth_util"] == pytest.approx(row["floor_ms"] / row["median_ms"])


def test_compress_floor_counts_k_once_and_kept_rows():
    # Llama-3-8B layer, T = 32K, bf16, 10 %: P0 = 32730, n_keep = (3276 - 38) // 10 = 323.
    assert kept_len(32768, 0.1) == 323 * 10 + 38
    q_obs = 32 * 32 * 128 * 2
    k_whole = 8 * 32768 * 128 * 2
    v_read_and_kv_written = 8 * 3 * 3268 * 128 * 2
    chunk_idx = 8 * 323 * 4
    assert floor_bytes("compress", LLAMA3_8B, 1, 32768, "bfloat16", kept=0.1) == (
        q_obs + k_whole + v_read_and_kv_written + chunk_idx
    )
    sparse = floor_bytes("sparse_decode", LLAMA3_8B, 1, 32768, "bfloat16", kept=0.1)
    full = floor_bytes("sdpa_full", LLAMA3_8B, 1, 32768, "bfloat16")
    assert sparse == 2 * 32 * 128 * 2 + 8 * 2 * 3268 * 128 * 2 + chunk_idx
    assert full == 2 * 32 * 128 * 2 + 8 * 2 * 32768 * 128 * 2


def test_compare_passes_against_itself_and_fails_when_slowed(ops_results, tmp_path, capsys):
    assert (
        compare.main([str(ops_results), "--threshold", "0.05", "--baseline", str(ops_results)]) == 0
    )
    slowed = json.loads(ops_results.read_text())
    target = next(
        row for row in slowed["rows"] if row["op"] == "compress" and row["impl"] == "chunkkv"
    )
    target["median_ms"] *= 1.5
    slowed_path = tmp_path / "slowed.json"
    slowed_path.write_text(json.dumps(slowed))
    assert (
        compare.main([str(slowed_path), "--threshold", "0.2", "--baseline", str(ops_results)]) == 1
    )
    assert target["id"] in capsys.readouterr().out
    assert (
        compare.main([str(slowed_path), "--threshold", "0.6", "--baseline", str(ops_results)]) == 0
    )


def test_compare_rules(ops_results):
    base = load_results(ops_results)
    new = copy.deepcopy(base)
    peer = next(row for row in new["rows"] if row["impl"] == "sdpa-full")
    peer["median_ms"] *= 10  # a slower peer is not this package's regression...
    assert compare.compare(new, base, 0.1)["regressions"] == []
    assert len(compare.compare(new, base, 0.1, all_impls=True)["regressions"]) == 1  # unless asked
    ours = [row for row in new["rows"] if row["impl"] == "chunkkv"]
    ours[0].update(status="error", note="RuntimeError: boom")
    ours[1].update(status="skipped", note="time budget of 0 s spent")
    report = compare.compare(new, base, 0.1)
    assert [entry[0] for entry in report["regressions"]] == [ours[0]["id"]]
    assert [entry[0] for entry in report["not_measured"]] == [ours[1]["id"]]


def test_compare_refuses_another_device(ops_results, tmp_path):
    other = json.loads(ops_results.read_text())
    other["runs"][0]["device_slug"] = "NVIDIA_H100_80GB_HBM3"
    other_path = tmp_path / "gpu.json"
    other_path.write_text(json.dumps(other))
    assert (
        compare.main([str(ops_results), "--threshold", "0.1", "--baseline", str(other_path)]) == 2
    )
    assert (
        compare.main(
            [str(ops_results), "--threshold", "0.1", "--baseline", str(tmp_path / "missing.json")]
        )
        == 2
    )


def test_baseline_fold_replaces_measured_rows_only(ops_results, tmp_path):
    out = tmp_path / "cpu.json"
    baseline.main([str(ops_results), "--out", str(out)])
    newer = json.loads(ops_results.read_text())
    newer["runs"][0]["date"] = "later"
    newer["rows"] = newer["rows"][:2]
    newer["rows"][0]["median_ms"] = 123.0
    newer["rows"][1]["status"] = "error"
    newer_path = tmp_path / "newer.json"
    newer_path.write_text(json.dumps(newer))
    baseline.main([str(newer_path), "--out", str(out)])
    folded = load_results(out)
    rows = {row["id"]: row for row in folded["rows"]}
    assert len(rows) == len(load_results(ops_results)["rows"])
    first, second = newer["rows"][0]["id"], newer["rows"][1]["id"]
    assert rows[first]["median_ms"] == 123.0
    assert folded["runs"][rows[first]["run"]]["date"] == "later"
    assert rows[second]["status"] == "ok"  # a failed row leaves the baseline's


def test_time_budget_skips_rows_without_failing_compare(ops_results, tmp_path):
    path = tmp_path / "skipped.json"
    ops.run(OPS_PRESETS["smoke"], CPU, path, selected_ops=["compress"], time_budget=0)
    rows = json.loads(path.read_text())["rows"]
    assert rows and {row["status"] for row in rows} == {"skipped"}
    assert compare.main([str(path), "--threshold", "0.1", "--baseline", str(ops_results)]) == 0


def test_goal_table_and_plots(ops_results, tmp_path):
    table = goals.table(goals.evaluate(load_results(ops_results)["rows"]))
    assert "| compress time / HBM floor | B1 T32K | - | <= 2.0 | missing (not measured) |" in table
    written = plots.make_plots([ops_results], tmp_path)
    assert {path.name for path in written} == {
        "cpu_decode_latency.png",
        "cpu_compress_vs_floor.png",
        "cpu_bandwidth_util.png",
        "cpu_reuse_speedup.png",
    }
    assert all(path.stat().st_size > 10_000 for path in written)


def test_goals_read_gpu_shaped_rows():
    def ops_row(op, impl, median_ms, batch=1, seq_len=32768, kept=0.1, reuse=None, **extra):
        return {
            "id": goals.ops_id(op, impl, batch, seq_len, kept, reuse),
            "status": "ok",
            "median_ms": median_ms,
            **extra,
        }

    rows = [
        ops_row("compress", "chunkkv", 1.0, time_over_floor=1.5),
        ops_row("compress", "torch-materialized", 30.0),
        ops_row("compress_layers", "chunkkv", 8.0, reuse=1),
        ops_row("compress_layers", "chunkkv", 4.0, reuse=4),
    ]
    result = {g.name: g for g in goals.evaluate(rows) if g.shape.startswith("B1 T32K")}
    assert result["compress time / HBM floor"].passed is True
    assert result["compress speed-up vs materializing torch"].measured == 30.0
    assert result["reuse N=4 vs N=1 compress speed-up"].passed is False  # x2 < x3


def test_e2e_smoke(tmp_path, monkeypatch):
    # The adapter's ops run the torch reference on CPU, not the (slow) interpreted kernels.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    path = tmp_path / "e2e.json"
    e2e.run(E2E_PRESETS["smoke"], CPU, path)
    rows = {(row["impl"], row["reuse"]): row for row in json.loads(path.read_text())["rows"]}
    full = rows[("hf-full", None)]
    assert full["status"] == "ok" and full["decode_tokens_per_s"] > 0
    assert full["kv_bytes"] == 2 * 2 * 2 * (160 + 4 - 1) * 16 * 4  # layers, k/v, Hkv, len, D
    if importlib.util.find_spec("triton_chunkkv.integrations.hf") is None:
        pytest.skip("triton_chunkkv.integrations.hf is not written yet")
    for reuse in (1, 2):
        evict, sparse = rows[("chunkkv-evict", reuse)], rows[("chunkkv-sparse", reuse)]
        assert evict["status"] == "ok" and sparse["status"] == "ok", (evict, sparse)
        assert evict["kv_fraction"] < 0.7
    assert plots.make_plots([path], tmp_path)[0].name == "cpu_e2e_tokens_per_s.png"


def test_gpu_suite_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_suite.sh")], check=True)


def test_launch_counts_per_layer(tmp_path):
    """``benchmarks.launches``: one compress layer is four kernel launches (window statistics,
    window scores with the chunk sums, selection, gather), no torch op between them and no
    host sync; a sparse decode step is two (split, merge), a dynamic one four. In a subprocess:
    the count needs the kernels compiled, not interpreted (this process defined them for the
    interpreter)."""
    out = tmp_path / "launches.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    env["TRITON_CHUNKKV_POISON_OUTPUTS"] = "0"  # poisoned outputs would add a fill each
    subprocess.run(
        [sys.executable, "-m", "benchmarks.launches", "--count-only", "--out", str(out)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    rows = {row["case"]: row for row in json.loads(out.read_text())["rows"]}
    for case in ("compress B1", "compress_layers B1 N=1, per layer"):
        assert (rows[case]["triton"], rows[case]["torch"], rows[case]["syncs"]) == (4, 0, 0)
    reused = rows["compress_layers B1 N=4, per layer"]
    assert (reused["triton"], reused["torch"]) == (1.75, 0)  # (4 + 3 gathers) / 4 layers
    for layout in ("dense", "hf"):
        decode = rows[f"sparse_decode B1 {layout}"]
        assert (decode["triton"], decode["torch"], decode["syncs"]) == (2, 0, 0)
    dynamic = rows["dynamic decode step B1 dense"]  # bounds scores, selection, split, merge
    assert (dynamic["triton"], dynamic["torch"], dynamic["syncs"]) == (4, 0, 0)

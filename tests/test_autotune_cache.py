"""The committed autotune cache: its JSON format and the generator's CPU behaviour."""

import json

import torch
import triton

from triton_chunkkv.autotune_cache.__main__ import main, merge_configs
from triton_chunkkv.ops import _runtime


def test_config_json_round_trip():
    """A config written by the generator launches as the same ``triton.Config``."""
    config = triton.Config({"BLOCK_ROWS": 32, "BLOCK_N": 64}, num_warps=8, num_stages=3)
    stored = json.loads(json.dumps(_runtime.config_to_json(config)))
    loaded = triton.Config(
        stored["kwargs"], num_warps=stored["num_warps"], num_stages=stored["num_stages"]
    )
    assert (loaded.kwargs, loaded.num_warps, loaded.num_stages) == (
        config.kwargs,
        config.num_warps,
        config.num_stages,
    )


def test_key_string_names_every_key():
    kernel = _runtime.TUNED_KERNELS["_gather_chunks_kernel"]
    kwargs = {"TOTAL_ROWS_BUCKET": 4096, "HEAD_DIM": 128, "ELEMENT_BYTES": 2, "other": 1}
    assert kernel.key_string(kwargs) == "TOTAL_ROWS_BUCKET=4096,HEAD_DIM=128,ELEMENT_BYTES=2"


def test_merge_keeps_committed_and_adds_tuned():
    old, new = {"num_warps": 4}, {"num_warps": 8}
    committed = {"a": {"K=1": old, "K=2": old}, "b": {"K=1": old}}
    tuned = {"a": {"K=2": new, "K=3": new}, "c": {}}
    assert merge_configs(committed, tuned) == {
        "a": {"K=1": old, "K=2": new, "K=3": new},
        "b": {"K=1": old},
        "c": {},
    }
    assert committed["a"]["K=2"] is old, "the committed dict itself is left alone"


def test_generator_needs_a_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--output", str(tmp_path / "gpu.json")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "gpu.json").exists()

"""``ChunkKVSettings.from_env``: the JSON config, the per-field variables, and bad values."""

import json

import pytest

from triton_chunkkv.integrations.sglang import ChunkKVSettings


def test_defaults_keep_ten_percent():
    settings = ChunkKVSettings.from_env({})
    assert (
        settings.budget,
        settings.ratio,
        settings.chunk_size,
        settings.window,
        settings.reuse_layers,
        settings.share_heads,
        settings.mode,
    ) == (None, 0.1, 10, 32, 1, False, "sparse")


def test_the_mode_comes_from_its_variable_or_the_file(tmp_path):
    assert ChunkKVSettings.from_env({"CHUNKKV_MODE": "dynamic"}).mode == "dynamic"
    config = tmp_path / "chunkkv.json"
    config.write_text(json.dumps({"mode": "dynamic"}))
    assert ChunkKVSettings.from_env({"CHUNKKV_CONFIG": str(config)}).mode == "dynamic"


def test_variables_override_the_json_config(tmp_path):
    config = tmp_path / "chunkkv.json"
    config.write_text(
        json.dumps({"ratio": 0.2, "chunk_size": 8, "share_heads": True, "reuse_layers": 4})
    )
    settings = ChunkKVSettings.from_env(
        {"CHUNKKV_CONFIG": str(config), "CHUNKKV_BUDGET": "512", "CHUNKKV_WINDOW": "16"}
    )
    # The budget variable replaces the file's ratio; the rest of the file stays.
    assert (
        settings.budget,
        settings.ratio,
        settings.chunk_size,
        settings.window,
        settings.reuse_layers,
        settings.share_heads,
    ) == (512, None, 8, 16, 4, True)


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"CHUNKKV_WINDOW": "wide"}, "CHUNKKV_WINDOW"),
        ({"CHUNKKV_SHARE_HEADS": "yes"}, "CHUNKKV_SHARE_HEADS"),
        ({"CHUNKKV_RATIO": "1.5"}, "ratio"),
        ({"CHUNKKV_CHUNK_SIZE": "0"}, "chunk_size"),
        ({"CHUNKKV_REUSE_LAYERS": "0"}, "reuse_layers"),
        ({"CHUNKKV_MODE": "evict"}, "mode must be one of"),
        ({"CHUNKKV_BUDGET": "64", "CHUNKKV_RATIO": "0.1"}, "exactly one of budget and ratio"),
    ],
)
def test_bad_values_name_the_setting(environ, message):
    with pytest.raises(ValueError, match=message):
        ChunkKVSettings.from_env(environ)


def test_unknown_json_keys_are_rejected(tmp_path):
    config = tmp_path / "chunkkv.json"
    config.write_text(json.dumps({"ratio": 0.2, "chunksize": 8}))
    with pytest.raises(ValueError, match="chunksize"):
        ChunkKVSettings.from_env({"CHUNKKV_CONFIG": str(config)})

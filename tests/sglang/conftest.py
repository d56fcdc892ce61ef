"""SGLang backend tests: real SGLang pools, batches and Triton backend, on the CPU.

They need SGLang, which lives in its own venv (``bash scripts/setup.sh --sglang``, then
``.venv-sglang/bin/python -m pytest -q tests/sglang``). Where SGLang is not importable every
test here is reported as skipped. SGLang is imported inside the fixtures only, so collecting
this folder never needs it.
"""

import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# This folder itself is importable as a namespace package named "sglang": only a regular
# package (one with an __init__.py, an origin) is the real thing.
_spec = importlib.util.find_spec("sglang")
SGLANG_MISSING = _spec is None or _spec.origin is None


def pytest_collection_modifyitems(config, items):
    if not SGLANG_MISSING:
        return
    skip = pytest.mark.skip(reason="sglang is not installed (bash scripts/setup.sh --sglang)")
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sglang_runtime():
    """Publishes a dummy SGLang config (what a server publishes at start-up) once."""
    from sglang.srt.runtime_context import get_context, get_parallel

    override = get_context().override_server_args(disable_radix_cache=True)
    override.install()
    get_parallel().override_permanently(tp_rank=0, attn_tp_rank=0, attn_dcp_rank=0)
    yield
    override.restore()
    get_parallel().clear_stamp()


@pytest.fixture
def make_harness(sglang_runtime):
    from sglang_harness import Harness

    return Harness

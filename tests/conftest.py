import os

import pytest
import torch

# Without CUDA the kernels run on CPU tensors through the Triton interpreter; set before any
# kernel is defined. On a GPU machine they compile (the interpreter would run CUDA tests too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs start as NaN / -1 so that a test sees any element a kernel failed to write.
os.environ["TRITON_CHUNKKV_POISON_OUTPUTS"] = "1"


@pytest.fixture(params=("kernels", "reference"))
def path(request, monkeypatch):
    """The kernels (CPU tensors in the interpreter) or the torch reference."""
    from triton_chunkkv.ops._runtime import use_triton

    if request.param == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    elif not use_triton(torch.empty(0)):
        pytest.skip("the kernels on CPU tensors need TRITON_INTERPRET=1")
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Single-threaded torch: small CPU ops on a busy 2-core machine run faster without a second
    thread that mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(items):
    """Tests marked ``gpu`` need a CUDA device: skipped without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)

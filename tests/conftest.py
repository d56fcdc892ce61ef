import os

import pytest
import torch

# Without CUDA the kernels run on CPU tensors through the Triton interpreter; set before any
# kernel is defined. On a GPU machine they compile (the interpreter would run CUDA tests too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs start as NaN / -1 so that a test sees any element a kernel failed to write.
os.environ["TRITON_CHUNKKV_POISON_OUTPUTS"] = "1"


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


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pytest_collection_modifyitems(items):
    """Tests marked ``requires_cuda`` also get the ``gpu`` marker, so ``-m gpu`` selects them."""
    for item in items:
        if any(
            mark.name == "skipif" and mark.kwargs.get("reason") == "needs a CUDA device"
            for mark in item.iter_markers()
        ):
            item.add_marker(pytest.mark.gpu)

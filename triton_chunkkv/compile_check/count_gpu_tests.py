"""A pytest plugin that counts the kernel compiles of the GPU tests on a machine without a GPU.

    python -m pytest -p triton_chunkkv.compile_check.count_gpu_tests -m gpu tests \\
        --ignore=tests/sglang [--count-out counts.json]

CUDA is faked: ``torch.cuda.is_available()`` is True, CUDA tensors are CPU tensors, and every
kernel launch is recorded as a compile job (:mod:`.aot`; autotuned launches record each
config they would benchmark) instead of compiled or run. Comparisons with the reference
(``torch.testing.assert_close``, ``torch.equal``, NaN checks of outputs the kernels never
wrote) pass, so each test runs to its end and records every launch it makes. The count is
the number of distinct compiles a cold Triton cache pays for ``pytest -m gpu``; set
``TRITON_CHUNKKV_ONE_CONFIG=1`` to count the one-config run of ``scripts/gpu_suite.sh``.
Test outcomes mean nothing here (a test using CUDA graphs fails on the CPU).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import types

import pytest
import torch
from torch.overrides import TorchFunctionMode

# Before tests/conftest.py runs: it selects the interpreter when CUDA is unavailable.
os.environ["TRITON_INTERPRET"] = "0"
torch.cuda.is_available = lambda: True
torch.cuda.synchronize = lambda *args, **kwargs: None
torch.cuda.empty_cache = lambda: None
torch.cuda.current_device = lambda: 0
torch.cuda.device_count = lambda: 1
torch.cuda.get_device_name = lambda *args: "NVIDIA H200"
torch.cuda.get_device_properties = lambda *args: types.SimpleNamespace(
    name="NVIDIA H200", multi_processor_count=132
)


def _is_cuda(device) -> bool:
    return (isinstance(device, str) and device.startswith("cuda")) or (
        isinstance(device, torch.device) and device.type == "cuda"
    )


class CudaOnCpu(TorchFunctionMode):
    """CUDA tensors are made on the CPU; checks of kernel outputs pass."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.equal:
            return True
        if func is torch.Tensor.isnan:
            return torch.zeros(args[0].shape, dtype=torch.bool)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


def pytest_addoption(parser):
    parser.addoption("--count-out", default=None, help="write the counted compiles as JSON")


def pytest_configure(config):
    from .aot import LaunchRecorder, recording_launches

    config._chunkkv_recorder = LaunchRecorder()
    stack = contextlib.ExitStack()
    stack.enter_context(recording_launches(config._chunkkv_recorder))
    stack.enter_context(_patched(torch.testing, "assert_close", lambda *args, **kwargs: None))
    config._chunkkv_stack = stack


@contextlib.contextmanager
def _patched(owner, name, value):
    previous = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, previous)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    item.config._chunkkv_recorder.label = item.nodeid
    with CudaOnCpu():
        return (yield)


def pytest_terminal_summary(terminalreporter, config):
    from .__main__ import variant_ids
    from .report import estimated_compile_time

    recorder = config._chunkkv_recorder
    jobs = list(recorder.jobs.values())
    per_kernel = collections.Counter(job.name for job in jobs)
    per_file = collections.Counter(job.labels[0].split("::")[0] for job in jobs if job.labels)
    one_config = os.environ.get("TRITON_CHUNKKV_ONE_CONFIG") == "1"
    terminalreporter.write_line(
        f"compiles counted: {len(jobs)} distinct kernel variants from {recorder.launches} "
        f"launches ({'one config per kernel' if one_config else 'autotuned: every config'})"
    )
    ids = sorted(variant_ids(jobs))
    terminalreporter.write_line(f"  {estimated_compile_time(ids)}")
    for name, count in sorted(per_kernel.items()):
        terminalreporter.write_line(f"  {name}: {count}")
    for name, count in sorted(per_file.items()):
        terminalreporter.write_line(f"  first needed by {name}: {count}")
    path = config.getoption("--count-out")
    if path:
        with open(path, "w") as file:
            json.dump(
                {
                    "compiles": len(jobs),
                    "launches": recorder.launches,
                    "one_config": one_config,
                    "per_kernel": dict(sorted(per_kernel.items())),
                    "variants": ids,
                },
                file,
                indent=1,
            )


def pytest_unconfigure(config):
    stack = getattr(config, "_chunkkv_stack", None)
    if stack is not None:
        stack.close()

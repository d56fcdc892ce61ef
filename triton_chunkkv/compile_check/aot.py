"""Ahead-of-time compilation for a CUDA GPU that this machine does not have.

Two steps, so that the op wrappers run as callers call them and the compiles run in parallel:

1. :func:`recording_launches`: a stand-in Triton driver (target ``sm_90``) is made active and
   every ``JITFunction`` launch (plain, forced or autotuned: the autotuner's benchmark runs
   each of its configs once) is recorded as a :class:`CompileJob` instead of compiled or run.
   The op wrappers get CPU tensors and believe they run the kernels (``use_triton`` is True),
   so the recorded arguments, constexprs and configs are the real ones.
2. :func:`compile_job`, in a worker process: the job's kernel is compiled for that target with
   ``JITFunction.warmup`` (compile, never launch) into Triton's cache (``TRITON_CACHE_DIR``);
   registers and local memory come from the cubin (``cuobjdump -res-usage``, shipped with
   Triton), shared memory from Triton's metadata.

Spills: ptxas puts spilled registers in the thread's stack frame (``STACK`` in
``cuobjdump -res-usage``, "bytes stack frame" in ``ptxas -v``), the local memory that Triton's
own ``n_spills`` reads on a GPU (``CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES / 4``). Every helper of
these kernels is inlined, so a non-empty stack frame means spills.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import importlib
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.runtime import driver as triton_driver
from triton.runtime.jit import JITFunction, MockTensor

# Hopper, as the GPU machine's H200 (and H100) report it: capability 9.0, 32-thread warps.
TARGET = GPUTarget("cuda", 90, 32)
# cudaDevAttrMaxSharedMemoryPerBlockOptin on compute capability 9.0: 227 KB of dynamic shared
# memory per block (CUDA C++ Programming Guide, "Technical Specifications per Compute
# Capability"). Triton refuses to launch a kernel whose metadata.shared exceeds it.
MAX_SHARED_BYTES = 227 * 1024
SM_COUNT = 132  # H200 (and H100 SXM): the split heuristics see the real GPU's SM count


class StandInDriver:
    """The parts of a Triton driver that compiling (not launching) asks for."""

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        # The autotuner benchmarks each config by launching it once: that launch is recorded.
        def bench(fn, *args, quantiles=None, **kwargs):
            fn()
            return [1.0, 1.0, 1.0] if quantiles else 1.0

        return bench

    def map_python_to_cpp_type(self, ty):
        raise NotImplementedError("the stand-in driver compiles, it does not launch")


@contextlib.contextmanager
def stand_in_driver():
    previous = triton_driver._active
    triton_driver.set_active(StandInDriver())
    try:
        yield
    finally:
        triton_driver._active = previous


def check_compiled_mode() -> None:
    """The kernels must be ``JITFunction`` s: Triton picks the interpreter when they are
    defined, so ``TRITON_INTERPRET`` must be unset or 0 before ``triton_chunkkv`` is imported."""
    from triton_chunkkv.ops import _runtime

    for tuned in _runtime.TUNED_KERNELS.values():
        if not isinstance(tuned.kernel, JITFunction):
            raise RuntimeError(
                "the kernels were defined for the Triton interpreter: run with TRITON_INTERPRET=0"
            )


# ---------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------


class PointerStandIn(MockTensor):
    """A tensor argument as Triton specializes it: dtype, and whether its address is 16-byte
    aligned (``tt.divisibility = 16``)."""

    def __init__(self, dtype: torch.dtype, aligned: bool):
        super().__init__(dtype)
        self.aligned = aligned

    def data_ptr(self):
        return 0 if self.aligned else 2

    def __reduce__(self):
        return PointerStandIn, (self.dtype, self.aligned)


def stand_in(value):
    if isinstance(value, torch.Tensor):
        return PointerStandIn(value.dtype, value.data_ptr() % 16 == 0)
    return value


def specialization(param, value) -> str:
    """What Triton's JIT keys a compile on, for one argument: the constexpr's value, or Triton's
    own specialization of a runtime argument (its type; 16-divisibility; an int 1 is a
    constexpr)."""
    if param.is_constexpr:
        return repr(value)
    specialize, align = not param.do_not_specialize, not param.do_not_specialize_on_alignment
    return repr(native_specialize_impl(_backend_type(), value, param.is_const, specialize, align))


@functools.cache
def _backend_type():
    from triton.compiler.compiler import make_backend

    return type(make_backend(TARGET))


@dataclasses.dataclass
class CompileJob:
    """One kernel compile: the kernel's module and name, its launch arguments (tensors as
    :class:`PointerStandIn`), and the keyword arguments (constexprs and config)."""

    module: str
    name: str
    args: tuple
    kwargs: dict
    dtype: str | None = None  # of the op call that launched it
    head_dim: int | None = None
    labels: list = dataclasses.field(default_factory=list)  # the op calls that launch it

    @property
    def key(self) -> tuple:
        fn = self.kernel()
        params = fn.params
        values = dict(zip((p.name for p in params), self.args))
        values.update(self.kwargs)
        by_name = {p.name: p for p in params}
        parts = []
        for name in sorted(values):
            param = by_name.get(name)
            value = values[name]
            parts.append((name, specialization(param, value) if param else repr(value)))
        return (self.name, tuple(parts))

    def kernel(self) -> JITFunction:
        attribute = getattr(importlib.import_module(self.module), self.name)
        return attribute if isinstance(attribute, JITFunction) else attribute.kernel  # TunedKernel


SHORT = {"torch.bfloat16": "bf16", "torch.float16": "fp16"}


class LaunchRecorder:
    """Collects the :class:`CompileJob` of every launch, deduplicated by Triton's key."""

    def __init__(self):
        self.jobs: dict[tuple, CompileJob] = {}
        self.launches = 0
        # What is being launched now: an op call's label, dtype and head dim (without a dtype,
        # each launch's own).
        self.label = ""
        self.dtype = None
        self.head_dim = None

    def record(self, fn: JITFunction, args, kwargs):
        self.launches += 1
        options = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        # Triton's defaults, which the autotuner passes explicitly (Config.all_kwargs) and a
        # plain launch leaves out: the same compile either way.
        for name, default in (("num_warps", 4), ("num_stages", 3), ("num_ctas", 1)):
            options.setdefault(name, default)
        job = CompileJob(
            module=fn.fn.__module__,
            name=fn.fn.__name__,
            args=tuple(stand_in(a) for a in args),
            kwargs={k: stand_in(v) for k, v in options.items()},
        )
        if self.dtype:  # what the op call says
            job.dtype, job.head_dim = self.dtype, self.head_dim
        else:  # the launch's own: a 16-bit pointer makes it a 16-bit variant
            pointers = {str(a.dtype) for a in job.args if isinstance(a, PointerStandIn)}
            job.dtype = next((SHORT[d] for d in sorted(pointers) if d in SHORT), "fp32")
            job.head_dim = job.kwargs.get("HEAD_DIM")
        job = self.jobs.setdefault(job.key, job)
        if self.label and self.label not in job.labels:
            job.labels.append(self.label)


def _gpu_stand_ins(driver) -> list:
    """The patches under which the op wrappers take CPU tensors for GPU tensors:
    ``driver`` is Triton's active driver, ``use_triton`` is True, the SM count is the H200's,
    no committed config is read and no autotune result reaches Triton's on-disk cache."""
    import triton_chunkkv.ops  # noqa: F401  (every kernel module, imported)
    from triton_chunkkv.ops import _runtime

    check_compiled_mode()
    patches = [
        driver,
        # Committed configs would bypass the autotuner: record every config instead.
        mock.patch.object(_runtime, "committed_configs", lambda name: {}),
        mock.patch.object(_runtime, "gpu_name", lambda: "stand-in"),
        mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}),
    ]
    for tuned in _runtime.TUNED_KERNELS.values():
        for autotuner in tuned.autotuners():
            # Recorded timings must never reach Triton's on-disk autotune cache.
            patches.append(mock.patch.object(autotuner, "cache_results", False))
            patches.append(mock.patch.object(autotuner, "cache", {}))
    # Every module that imported the dispatch helpers by name gets the stand-ins.
    stand_ins = {
        "use_triton": (_runtime.use_triton, lambda tensor: True),
        "multiprocessor_count": (_runtime.multiprocessor_count, lambda device: SM_COUNT),
    }
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("triton_chunkkv"):
            for name, (original, replacement) in stand_ins.items():
                if getattr(module, name, None) is original:
                    patches.append(mock.patch.object(module, name, replacement))
    return patches


@contextlib.contextmanager
def _patched(patches):
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


@contextlib.contextmanager
def recording_launches(recorder: LaunchRecorder):
    """Within: every kernel launch is recorded by ``recorder``, nothing is compiled or run.

    The op wrappers take CPU tensors for GPU tensors (``use_triton`` is True, the SM count is
    the H200's); kernel outputs stay uninitialized.
    """

    def run(self, *args, grid, warmup, **kwargs):
        recorder.record(self, args, kwargs)

    patches = _gpu_stand_ins(stand_in_driver())
    patches.append(mock.patch.object(JITFunction, "run", run))
    with _patched(patches):
        yield recorder


class NullLaunchDriver(StandInDriver):
    """A stand-in driver under which Triton's whole host-side launch path runs (argument
    binding and specialization, the compiled-kernel cache lookup, the grid, the launcher call)
    and only the launcher itself (the C function that packs the arguments and calls
    ``cuLaunchKernelEx``) is a no-op. Kernels are compiled for :data:`TARGET` on first use."""

    class utils:  # noqa: N801 - Triton reads driver.active.utils.<function>
        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": MAX_SHARED_BYTES, "multiprocessor_count": SM_COUNT}

        @staticmethod
        def load_binary(name, kernel, shared, device):
            return 1, 1, 0, 0, 1024  # module, function, registers, spills, max threads

        @staticmethod
        def unload_module(module):
            pass

    def launcher_cls(self, src, metadata):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def null_launches():
    """Within: the op wrappers run as on a GPU (CPU tensors stand for GPU tensors) through
    Triton's full host-side launch path, with the final driver call a no-op
    (:class:`NullLaunchDriver`): what a GPU host pays per call, less the driver's own launch
    cost. Each kernel variant compiles for sm_90 on its first launch (ptxas; seconds)."""

    @contextlib.contextmanager
    def driver():
        previous = triton_driver._active
        triton_driver.set_active(NullLaunchDriver())
        try:
            yield
        finally:
            triton_driver._active = previous

    with _patched(_gpu_stand_ins(driver())):
        yield


# ---------------------------------------------------------------------------------------------
# Compiling (in worker processes)
# ---------------------------------------------------------------------------------------------


RESOURCE_PATTERN = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def cubin_resources(cubin: bytes) -> dict:
    """``{"REG", "STACK", "SHARED", "LOCAL"}`` of the one function in ``cubin``."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run(
            [str(cuobjdump), "-res-usage", file.name], check=True, capture_output=True, text=True
        ).stdout
    found = {name: int(value) for name, value in RESOURCE_PATTERN.findall(text)}
    if "REG" not in found:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource usage:\n{text}")
    return found


def dot_instructions(ptx: str) -> str:
    """Which tensor-core instruction the kernel's dots became."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return "-"


_worker_ready = False


def _prepare_worker():
    global _worker_ready
    if not _worker_ready:
        _die_with_parent()
        check_compiled_mode()
        triton_driver.set_active(StandInDriver())
        _worker_ready = True


def _die_with_parent():
    """A compile worker must not outlive a parent killed by a timeout (it would go on taking
    the cores of the next stage): Linux sends it SIGKILL when the parent dies."""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): unlike wall time, it does
    not grow when other jobs share the cores."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def compile_job(job: CompileJob) -> dict:
    """Compile ``job`` for :data:`TARGET`; its resources (``compile_s``: CPU seconds), or the
    compile error."""
    _prepare_worker()
    start = cpu_seconds()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Triton 3.9's notice about TRITON_DEFAULT_FP_FUSION
            compiled = job.kernel().warmup(*job.args, grid=(1,), **job.kwargs)
        seconds = cpu_seconds() - start
        resources = cubin_resources(compiled.asm["cubin"])
    except Exception as error:  # noqa: BLE001 - a failed compile is a result to report
        lines = str(error).strip().splitlines() or [""]
        return {
            "error": f"{type(error).__name__}: {lines[0]}"[:500],
            "compile_s": cpu_seconds() - start,
        }
    return {
        "registers": resources["REG"],
        "spill_bytes": resources["STACK"] + resources["LOCAL"],
        "shared_bytes": compiled.metadata.shared,
        "dot": dot_instructions(compiled.asm["ptx"]),
        "compile_s": seconds,
    }

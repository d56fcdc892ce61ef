"""Where an op runs (Triton kernel or torch reference) and how its kernels are tuned.

* CUDA tensors run the Triton kernels; CPU tensors run them when ``TRITON_INTERPRET=1`` and
  the torch reference otherwise.
* :func:`tuned` wraps ``triton.autotune``. Under the interpreter the autotuner cannot run
  ("0 active drivers"), so a fixed config is launched instead. On a GPU the configs committed
  in ``triton_chunkkv/autotune_cache/<gpu>.json`` are used first, so a warm start never
  re-tunes; shapes missing from that file are tuned, and ``python -m
  triton_chunkkv.autotune_cache`` writes the tuned configs back.
* The Triton interpreter is not thread-safe (it patches ``triton.language`` for the length of a
  launch), so interpreted launches take turns (:func:`launch_lock`); compiled launches and the
  torch reference need no lock.
* ``TRITON_CHUNKKV_ONE_CONFIG=1`` launches each kernel's first config without tuning (one
  compile per kernel variant: the GPU tests), and :meth:`TunedKernel.forcing` one given config.
* Every op is also a registered PyTorch operator (``torch.ops.triton_chunkkv.<op>``,
  :mod:`.library`). An op's unchecked dispatcher calls that operator when something traces or
  records it (:func:`call_directly` is False) and its implementation directly otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import re
import threading
from pathlib import Path

import torch
import triton

CACHE_DIR = Path(__file__).resolve().parent.parent / "autotune_cache"

TUNED_KERNELS: dict[str, TunedKernel] = {}

# Held for the length of one interpreted launch: two threads interpreting kernels at once fail
# with InterpreterErrors.
INTERPRETER_LOCK = threading.Lock()


# os.environ's own mapping of encoded names to encoded values (POSIX): ``os.environ.get`` costs
# about 1 us a read (key encoding, the Mapping machinery, value decoding), and an op call reads
# a few flags per launch. setenv, monkeypatch.setenv and del all update this mapping.
_ENVIRON_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None


def environment_value(name: bytes) -> bytes | None:
    """The environment variable ``name`` (encoded), as ``os.environ`` holds it now."""
    if _ENVIRON_DATA is not None:
        return _ENVIRON_DATA.get(name)
    value = os.environ.get(name.decode())
    return None if value is None else value.encode()


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """The environment variables ``values`` set inside the block; afterwards each is what it
    was before, or unset again."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def interpreting() -> bool:
    return environment_value(b"TRITON_INTERPRET") not in (None, b"", b"0")


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host ints (``triton.cdiv`` is a constexpr function: about 3 us a
    host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= ``n`` (1 for ``n <= 1``), for host ints."""
    return 1 << max(int(n) - 1, 0).bit_length()


def launch_lock():
    """The context one kernel launch runs in: :data:`INTERPRETER_LOCK` under the interpreter,
    nothing otherwise."""
    return INTERPRETER_LOCK if interpreting() else contextlib.nullcontext()


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether a kernel upcasts its ``tl.dot`` operands (the ``DOT_IN_FP32`` constexpr): the
    interpreter's ``tl.dot`` returns garbage on bf16 operands."""
    return interpreting() and dtype == torch.bfloat16


# torch's Python dispatch-mode stack (FakeTensorMode, make_fx's proxy mode, functionalization):
# private, so an op takes its registered operator whenever the stack cannot be read.
_dispatch_mode_depth = getattr(torch._C, "_len_torch_dispatch_stack", None)


def call_directly(*tensors) -> bool:
    """Whether an op may call its implementation directly rather than its registered operator
    (:mod:`.library`): True in plain eager mode, where the operator would only add the
    dispatcher's cost (2 to 5 us a call, ``docs/DESIGN.md``); False while ``torch.compile`` /
    ``torch.export`` traces, under a dispatch mode (fake tensors, ``make_fx``), while the
    profiler records (so traces name the op), or when a tensor argument is a subclass.

    Both routes run the same implementation: the answer changes how an op is seen, never what
    it computes."""
    if torch.compiler.is_compiling() or torch.autograd._profiler_enabled():
        return False
    if _dispatch_mode_depth is None or _dispatch_mode_depth():
        return False
    for tensor in tensors:
        if tensor is not None and type(tensor) is not torch.Tensor:
            return False
    return True


def use_triton(tensor: torch.Tensor) -> bool:
    """True when ``tensor``'s op should run the Triton kernel rather than the reference."""
    if tensor.is_cuda:
        return True
    if tensor.device.type == "cpu" and interpreting():
        fix_old_interpreter()
        return True
    return False


def triton_version() -> tuple[int, int]:
    return tuple(int(part) for part in triton.__version__.split(".")[:2])


@functools.cache
def fix_old_interpreter() -> None:
    """Triton before 3.8 interprets a scalar used as an index (a runtime ``range`` bound) with
    ``int(array)`` on a 1-element array, which numpy >= 2.4 refuses; 3.8 squeezes the array
    first. Older interpreters get 3.8's conversion, so CPU runs work with any numpy."""
    if triton_version() >= (3, 8):
        return
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_with_squeezed_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_tensor_with_squeezed_index


def empty_output(shape, dtype, device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs. With ``TRITON_CHUNKKV_POISON_OUTPUTS=1`` (the tests
    set it) the buffer starts as NaN (floats) or -1 (ints), so an unwritten element shows."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if environment_value(b"TRITON_CHUNKKV_POISON_OUTPUTS") == b"1":
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def bucket(n: int) -> int:
    """Power-of-two bucket used in autotune keys, so that every length does not re-tune."""
    return next_power_of_2(n)


def multiprocessor_count(device: torch.device) -> int:
    """The GPU's SM count; 1 on CPU, where the interpreter runs programs one after another."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_multiprocessor_count(index)


@functools.cache
def _cuda_multiprocessor_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def gpu_name() -> str:
    """The current CUDA device's name as the committed autotune files are named."""
    return _gpu_name(torch.cuda.current_device())


@functools.cache
def _gpu_name(index: int) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(index)).strip("_")


@functools.cache
def committed_configs(device_name: str) -> dict:
    path = CACHE_DIR / f"{device_name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def config_to_json(config: triton.Config) -> dict:
    return {
        "kwargs": dict(config.kwargs),
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
    }


class TunedKernel:
    """A ``@triton.jit`` kernel launched with a committed, autotuned or fixed config.

    ``key`` names keyword arguments of the launch (pass them by keyword, already bucketed).
    """

    def __init__(self, kernel, configs, key, interpret_config: triton.Config, float32_configs=None):
        self.kernel = kernel
        self.name = kernel.fn.__name__
        self.key = list(key)
        self.configs = list(configs)
        # float32 inputs (ELEMENT_BYTES=4) tune over their own list: the 16-bit blocks spill.
        self.float32_configs = list(float32_configs) if float32_configs else None
        self.interpret_config = interpret_config
        self.forced_config = None
        options = (
            {"cache_results": True}
            if "cache_results" in inspect.signature(triton.autotune).parameters
            else {}
        )
        self.autotuned = triton.autotune(configs=self.configs, key=self.key, **options)(kernel)
        self.autotuned_float32 = (
            triton.autotune(configs=self.float32_configs, key=self.key, **options)(kernel)
            if self.float32_configs
            else None
        )
        TUNED_KERNELS[self.name] = self

    def autotuners(self) -> list:
        return [tuner for tuner in (self.autotuned, self.autotuned_float32) if tuner is not None]

    def configs_for(self, kwargs) -> list[triton.Config]:
        """The configs a launch with these keyword arguments tunes over."""
        if self.float32_configs and kwargs.get("ELEMENT_BYTES") == 4:
            return self.float32_configs
        return self.configs

    @contextlib.contextmanager
    def forcing(self, config: triton.Config):
        """Within: every launch of this kernel uses ``config`` (under the interpreter too)."""
        self.forced_config = config
        try:
            yield
        finally:
            self.forced_config = None

    def key_string(self, kwargs) -> str:
        return ",".join(f"{name}={kwargs[name]}" for name in self.key)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.forced_config is not None:
                return self._launch_with(self.forced_config, grid, args, kwargs)
            if interpreting():
                with INTERPRETER_LOCK:
                    return self._launch_with(self.interpret_config, grid, args, kwargs)
            if environment_value(b"TRITON_CHUNKKV_ONE_CONFIG") == b"1":
                return self._launch_with(self.configs_for(kwargs)[0], grid, args, kwargs)
            committed = committed_configs(gpu_name()).get(self.name, {})
            config = committed.get(self.key_string(kwargs))
            if config is not None:
                return self._launch_with(
                    triton.Config(
                        config["kwargs"],
                        num_warps=config["num_warps"],
                        num_stages=config["num_stages"],
                    ),
                    grid,
                    args,
                    kwargs,
                )
            float32 = self.autotuned_float32 is not None and kwargs.get("ELEMENT_BYTES") == 4
            return (self.autotuned_float32 if float32 else self.autotuned)[grid](*args, **kwargs)

        return launch

    def _launch_with(self, config: triton.Config, grid, args, kwargs):
        return self.kernel[grid](
            *args,
            **kwargs,
            **config.kwargs,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )

    def tuned_configs(self) -> dict:
        """``{key string: config}`` for every shape the autotuner has tuned in this process."""
        out = {}
        for autotuner in self.autotuners():
            for key_values, config in autotuner.cache.items():
                named = dict(zip(self.key, key_values))
                out[self.key_string(named)] = config_to_json(config)
        return out


def tuned(configs, key, interpret_config: triton.Config, float32_configs=None):
    """Decorator form of :class:`TunedKernel`, applied on top of ``@triton.jit``."""
    return lambda kernel: TunedKernel(kernel, configs, key, interpret_config, float32_configs)

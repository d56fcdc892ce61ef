"""Kernel launches, host syncs and host time per call on the kernel path, without a GPU.

    python -m benchmarks.launches [--calls 200] [--repeats 5] [--out launches.json]

What a GPU host pays for one ``compress`` layer (alone, and per layer of an 8-layer
``compress_layers`` with index reuse N = 1 and N = 4) and for one ``sparse_decode`` call, at the
Llama-3-8B shape (Hq 32, Hkv 8, D 128, bfloat16; c 10, w 32, 10 % kept, B 1), measured on the
CPU:

* **Launches.** The op wrappers run with CPU tensors standing for GPU tensors
  (:func:`triton_chunkkv.compile_check.aot.recording_launches`: ``use_triton`` is True, the
  H200's SM count, every Triton launch recorded instead of run, one config per kernel as
  ``TRITON_CHUNKKV_ONE_CONFIG=1`` gives). Triton launches are counted exactly; the torch ops
  between them are read from the profiler (``torch.profiler``, CPU activity) and counted as
  the device kernels they would launch on CUDA: every op but views, allocations and other
  metadata-only ops (:data:`NO_DEVICE_WORK`), a composite op by its children, plus one for the
  ops that launch a kernel of their own beside their children (``sort``, ``topk``). Host syncs:
  ``aten::_local_scalar_dense`` (``.item()``, ``int(tensor)``, ``bool(tensor)``).
* **Host time.** The same wrappers under
  :func:`~triton_chunkkv.compile_check.aot.null_launches`: Triton's whole host-side launch path
  runs (binding and specializing the arguments, the compiled-kernel lookup, the grid), the
  kernels compiled for sm_90 once during the warm-up, and only the driver's launch call is a
  no-op. Torch ops run on CPU tensors; their shapes are small (T 1024; the host work of the
  wrappers does not depend on T, only the CPU compute inside a torch op does, which a GPU runs
  asynchronously), so their time is the dispatcher's, close to what a CUDA op costs the host
  before its launch. Not included: the driver's own ``cuLaunchKernelEx`` per launch (a few us
  each on a GPU host, counted above) and CUDA's part of each torch op.

Host time is CPU time (``time.process_time``: one torch thread, so the process's CPU time is
the calling thread's), not wall time, so that other jobs on a shared machine do not inflate it:
the fastest of ``--repeats`` runs of ``--calls`` calls, in microseconds per call (per layer for
``compress_layers``). The warm-up call compiles every kernel variant it launches for sm_90.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

import torch

from triton_chunkkv import ops
from triton_chunkkv.ops import reference

from .shapes import CHUNK_SIZE, LLAMA3_8B, WINDOW

# Profiler events that launch no device kernel on CUDA (allocations, views, metadata).
NO_DEVICE_WORK = {
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::new_empty",
    "aten::new_empty_strided",
    "aten::view",
    "aten::_unsafe_view",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::expand",
    "aten::expand_as",
    "aten::as_strided",
    "aten::slice",
    "aten::select",
    "aten::narrow",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::permute",
    "aten::transpose",
    "aten::t",
    "aten::alias",
    "aten::detach",
    "aten::lift_fresh",
    "aten::unbind",
    "aten::split",
    "aten::set_",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::contiguous",
    "aten::to",
    "aten::_to_copy",
    "aten::clone",
    "aten::result_type",
    "aten::is_nonzero",
    "aten::item",
    "aten::resize_",
}
# Ops that launch a kernel of their own beside what their children launch (CUDA's sort fills
# its outputs, then sorts).
OWN_KERNEL = {"aten::sort", "aten::topk"}
SYNCS = {"aten::_local_scalar_dense"}
LAYERS = 8
KEPT = 0.1


def device_launches(event) -> Counter:
    """``{op name: device kernels}`` launched by one profiler event and its children."""
    children = Counter()
    for child in event.cpu_children:
        children += device_launches(child)
    name = event.name
    if name.startswith("triton_chunkkv::") or name in NO_DEVICE_WORK or name in SYNCS:
        return children
    if not children:
        return Counter({name: 1})
    if name in OWN_KERNEL:
        children[name] += 1
    return children


def syncs(event) -> int:
    return int(event.name in SYNCS) + sum(syncs(child) for child in event.cpu_children)


def inputs(batch: int, seq_len: int, layers: int = 1, reuse: int = 1):
    """Window queries, keys and values per layer (bfloat16, uninitialized: nothing reads them
    on the stand-in paths)."""
    m = LLAMA3_8B

    def empty(*shape):
        return torch.empty(shape, dtype=torch.bfloat16)

    return [
        (
            empty(batch, m.num_q_heads, WINDOW, m.head_dim) if layer % reuse == 0 else None,
            empty(batch, m.num_kv_heads, seq_len, m.head_dim),
            empty(batch, m.num_kv_heads, seq_len, m.head_dim),
        )
        for layer in range(layers)
    ]


def decode_inputs(batch: int, seq_len: int, layout: str):
    m = LLAMA3_8B
    p0 = reference.tail_start(seq_len, CHUNK_SIZE, WINDOW)
    n_keep = reference.num_kept_chunks(
        seq_len, reference.resolve_budget(seq_len, ratio=KEPT), CHUNK_SIZE, WINDOW
    )
    q = torch.empty(batch, m.num_q_heads, m.head_dim, dtype=torch.bfloat16)
    k = torch.empty(batch, m.num_kv_heads, seq_len + 64, m.head_dim, dtype=torch.bfloat16)
    chunk_idx = torch.arange(n_keep, dtype=torch.int32).expand(batch, m.num_kv_heads, n_keep)
    seq_lens = torch.full((batch,), seq_len, dtype=torch.int32)
    options = dict(validate=False)
    tail_start = p0
    if layout == "hf":  # what the HF adapter passes: per-row tails, offsets and counts
        tail_start = torch.full((batch,), p0, dtype=torch.int32)
        options.update(
            row_offset=torch.zeros(batch, dtype=torch.int32),
            chunk_counts=torch.full((batch,), n_keep, dtype=torch.int32),
        )
    args = (q, k, k, chunk_idx.contiguous(), CHUNK_SIZE, tail_start, seq_lens)
    return args, options


def cases(seq_len: int):
    """``(name, calls it stands for, fn)``; ``fn()`` runs the case once."""
    options = dict(ratio=KEPT, chunk_size=CHUNK_SIZE, window=WINDOW)
    out = []
    ((q_obs, k, v),) = inputs(1, seq_len)
    out.append(("compress B1", 1, lambda: ops.compress(q_obs, k, v, **options)))
    for reuse in (1, 4):
        layers = inputs(1, seq_len, LAYERS, reuse)
        out.append(
            (
                f"compress_layers B1 N={reuse}, per layer",
                LAYERS,
                lambda layers=layers, reuse=reuse: ops.compress_layers(
                    layers, reuse_layers=reuse, **options
                ),
            )
        )
    for layout in ("dense", "hf"):
        args, decode_options = decode_inputs(1, seq_len, layout)
        out.append(
            (
                f"sparse_decode B1 {layout}",
                1,
                lambda args=args, decode_options=decode_options: ops.sparse_decode(
                    *args, **decode_options
                ),
            )
        )
    out.append(("dynamic decode step B1 dense", 1, dynamic_step(seq_len)))
    return out


def dynamic_step(seq_len: int):
    """One decode step of dynamic mode on one layer: every whole chunk scored by its key
    bounds, the best ``n_keep`` selected, then read in place."""
    (q, k, v, kept, _, tail_start, seq_lens), options = decode_inputs(1, seq_len, "dense")
    n_chunks, n_keep = tail_start // CHUNK_SIZE, kept.shape[2]
    kmin = torch.empty(1, k.shape[1], n_chunks, k.shape[3], dtype=k.dtype)

    def step():
        chunk_idx = ops.select_decode_chunks(q, kmin, kmin, n_keep, validate=False)
        return ops.sparse_decode(q, k, v, chunk_idx, CHUNK_SIZE, tail_start, seq_lens, **options)

    return step


def count(seq_len: int) -> dict:
    """``{case: {"triton": n, "torch": n, "torch_ops": {...}, "syncs": n}}`` per call."""
    from triton_chunkkv.compile_check.aot import LaunchRecorder, recording_launches

    results = {}
    for name, calls, fn in cases(seq_len):
        recorder = LaunchRecorder()
        with recording_launches(recorder), torch.inference_mode():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                fn()
        roots = [event for event in prof.events() if event.cpu_parent is None]
        torch_ops = sum((device_launches(event) for event in roots), Counter())
        results[name] = {
            "triton": recorder.launches / calls,
            "torch": sum(torch_ops.values()) / calls,
            "torch_ops": {op: n / calls for op, n in sorted(torch_ops.items())},
            "syncs": sum(syncs(event) for event in roots) / calls,
        }
    return results


def host_us(seq_len: int, calls: int, repeats: int) -> dict:
    """``{case: microseconds per call}`` (per layer for ``compress_layers``)."""
    from triton_chunkkv.compile_check.aot import null_launches

    results = {}
    with null_launches(), torch.inference_mode():
        for name, per, fn in cases(seq_len):
            fn()  # compiles (once per kernel variant) and warms every cache
            best = float("inf")
            for _ in range(repeats):
                start = time.process_time()
                for _ in range(calls):
                    fn()
                best = min(best, (time.process_time() - start) / calls)
            results[name] = best / per * 1e6
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--count-len", type=int, default=32768, help="T of the launch count")
    parser.add_argument("--time-len", type=int, default=1024, help="T of the host timing")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--count-only", action="store_true", help="count launches only (nothing is compiled)"
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("run with TRITON_INTERPRET unset: the kernels must be compiled kernels")
    os.environ["TRITON_CHUNKKV_ONE_CONFIG"] = "1"
    os.environ["TRITON_CHUNKKV_POISON_OUTPUTS"] = "0"  # the tests' NaN fill: one launch each
    torch.set_num_threads(1)
    counts = count(args.count_len)
    times = {} if args.count_only else host_us(args.time_len, args.calls, args.repeats)
    print(
        f"per call (per layer for compress_layers); launches at T {args.count_len}, "
        f"host time at T {args.time_len}, Llama-3-8B shape, bf16, 10 % kept"
    )
    print(f"{'case':<36} {'triton':>7} {'torch':>6} {'syncs':>6} {'host us':>8}  torch ops")
    for name in counts:
        c = counts[name]
        torch_ops = ", ".join(f"{op[6:]} {n:g}" for op, n in c["torch_ops"].items())
        host = f"{times[name]:>8.1f}" if name in times else f"{'-':>8}"
        print(f"{name:<36} {c['triton']:>7g} {c['torch']:>6g} {c['syncs']:>6g} {host}  {torch_ops}")
    if args.out:
        from .common import run_meta

        meta = run_meta(
            torch.device("cpu"),
            "benchmarks.launches",
            argv or [],
            "time.process_time (CPU time), fastest of --repeats runs of --calls calls",
        )
        rows = [{"case": name, **counts[name], "host_us": times.get(name)} for name in counts]
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

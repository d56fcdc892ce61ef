"""Precompile what the one-command GPU run launches, in parallel, into Triton's cache.

    python -m benchmarks.precompile [--preset gpu|smoke] [-j 16] [--count] [--limit N]

The stages after it (the config check, the goal-row op sweep, the end-to-end run) each run in
one process, where every compile (and every autotune config) would be paid one after another.
Here their launches are recorded without a GPU (:mod:`triton_chunkkv.compile_check.aot`: the
stages' own code runs on CPU tensors that are never read, so the recorded arguments, and thus
Triton's specializations, are the stages' own) and compiled for sm_90 by ``-j`` processes into
``TRITON_CACHE_DIR``; the stages then find them there. The GPU tests are not recorded here:
they run under pytest-xdist, whose workers compile in parallel themselves.

``smoke`` (CI, on the CPU) records the smoke presets' launches and compiles ``--limit`` of
them, so the path stays exercised.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def record_config_check(preset: str) -> None:
    from triton_chunkkv.ops import _runtime

    from . import config_check

    shape = config_check.PRESETS[preset]
    inputs = {}
    for name, dtype, config in config_check.cases(shape):
        if dtype not in inputs:
            inputs[dtype] = config_check.Inputs(shape, dtype, torch.device("cpu"))
        with (
            _runtime.TUNED_KERNELS[name].forcing(config),
            _runtime.environment({"TRITON_CHUNKKV_ONE_CONFIG": "1"}),
        ):
            inputs[dtype].run(config_check.OP_OF_KERNEL[name])


def record_ops(preset_name: str, cases=None) -> None:
    """Every row of ``benchmarks.ops --preset preset_name`` (or ``cases`` at its dtype) that runs
    this package's kernels, inputs made by ``torch.empty`` (a 128K-token batch of 32 costs no
    memory)."""
    from triton_chunkkv import ops as chunkkv_ops

    from . import ops
    from .shapes import OPS_PRESETS

    preset = OPS_PRESETS[preset_name]
    bench = ops.Bench(preset, torch.device("cpu"))
    bench.impl, bench.decode_options = chunkkv_ops, {"validate": False}
    bench.randn = lambda *shape: torch.empty(shape, dtype=bench.dtype)
    if cases is None:
        cases = ops.cases(preset, torch.device("cuda"), ops.OPS)
    for case in cases:
        if case.impl == "chunkkv":
            fn, sets = bench.setup(case)
            fn(sets[0])


def e2e_cases(preset_name: str):
    """What the HF adapter launches in ``benchmarks.e2e --preset preset_name``, as op rows of
    the same shapes: compress at each prompt length and batch, its gather (evict) and sparse
    decode (sparse mode, one compressed set per batch: the int-tail layout)."""
    from . import ops
    from .shapes import E2E_PRESETS, Model

    preset = E2E_PRESETS[preset_name]
    config = preset.config
    model = Model(
        preset.model,
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config.get("head_dim", config["hidden_size"] // config["num_attention_heads"]),
    )
    for seq_len in preset.prompt_lens:
        for batch in preset.batches:
            for op in ("compress", "sparse_decode"):
                yield ops.Case(op, "chunkkv", model, batch, seq_len, kept=preset.ratio)


PRESETS = {
    # stage presets: (config check, ops sweep, end to end)
    "gpu": ("gpu", "goals", "goals"),
    "smoke": ("smoke", "smoke", "smoke"),
}


def record(preset: str):
    from triton_chunkkv.compile_check.__main__ import sorted_jobs
    from triton_chunkkv.compile_check.aot import LaunchRecorder, recording_launches

    checks, sweep, e2e = PRESETS[preset]
    recorder = LaunchRecorder()
    with recording_launches(recorder):
        for label, step in (
            ("config check", lambda: record_config_check(checks)),
            ("ops sweep", lambda: record_ops(sweep)),
            ("end to end", lambda: record_ops(sweep, list(e2e_cases(e2e)))),
        ):
            before = len(recorder.jobs)
            recorder.label = label
            start = time.perf_counter()
            step()
            print(
                f"{label}: {len(recorder.jobs) - before} new variants recorded in "
                f"{time.perf_counter() - start:.1f} s",
                flush=True,
            )
    return sorted_jobs(recorder.jobs.values())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count())
    parser.add_argument("--count", action="store_true", help="record only, compile nothing")
    parser.add_argument("--limit", type=int, default=None, help="compile at most this many")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("precompiling needs compiled kernels: run with TRITON_INTERPRET=0")

    from triton_chunkkv.compile_check.__main__ import compile_all, variant_ids
    from triton_chunkkv.compile_check.report import estimated_compile_time, violations

    start = time.perf_counter()
    jobs = record(args.preset)
    estimate = estimated_compile_time(variant_ids(jobs))
    print(f"{len(jobs)} variants to compile for sm_90; {estimate}", flush=True)
    if args.count:
        return 0
    jobs = jobs[: args.limit] if args.limit is not None else jobs
    entries = compile_all(jobs, args.jobs, {}, verbose=False)
    failed = [entry for entry in entries if violations(entry)]
    print(
        f"precompiled {len(entries)} variants with {args.jobs} processes in "
        f"{time.perf_counter() - start:.0f} s ({sum(e['compile_s'] for e in entries):.0f} s "
        f"of compile) into {os.environ.get('TRITON_CACHE_DIR', '~/.triton/cache')}; "
        f"{len(failed)} failed the compile check"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

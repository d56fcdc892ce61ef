"""Op benchmarks: every ChunkKV op beside its torch peers, with the byte floor of each row.

    python -m benchmarks.ops --preset gpu --out ops.json [--time-budget 450] [--ops compress]

The sweep (``benchmarks.shapes``): Llama-3-8B and Qwen2-7B attention shapes, contexts T,
batches B, kept fractions, c = 10, w = 32, and ``compress_layers`` with index reuse N. Each row
is timed over several input sets (rotated, so a call does not find the previous call's inputs
in cache) and reports ``floor_ms`` (the bytes of :mod:`benchmarks.floors` at the copy
bandwidth measured at the start of the run), ``time_over_floor`` and ``bandwidth_util`` (floor
time / time). Rows run goal shapes first; once ``--time-budget`` seconds have passed the
remaining rows are recorded as skipped, so a device call never runs past its limit. A row that
runs out of memory or fails is recorded (``oom`` / ``error``) and the sweep goes on.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch

from triton_chunkkv import ops
from triton_chunkkv.ops import reference

from . import peers
from .common import (
    ResultsWriter,
    argv_or_sys,
    copy_bandwidth,
    error_note,
    free_memory,
    is_out_of_memory,
    pick_device,
    row_id,
    run_meta,
    sweep_arguments,
    time_ms,
    timer_description,
)
from .floors import floor_bytes, kept_chunks, kept_len
from .shapes import CHUNK_SIZE, OPS_PRESETS, WINDOW, Model, OpsPreset

OPS = (
    "window_scores",
    "chunk_sum",
    "gather_chunks",
    "compress",
    "compress_layers",
    "sparse_decode",
)
MAX_INPUT_SETS = 4


@dataclass(frozen=True)
class Case:
    op: str
    impl: str  # "chunkkv" (this package) or a peer's name
    model: Model
    batch: int
    seq_len: int
    kept: float | None = None
    reuse: int | None = None


class Bench:
    """Inputs and callables of the cases of one run, on one device."""

    def __init__(self, preset: OpsPreset, device: torch.device):
        self.preset = preset
        self.device = device
        self.dtype = getattr(torch, preset.dtype)
        # CUDA runs the Triton kernels; CPU the torch reference (interpreted kernels are not a
        # speed measurement, so TRITON_INTERPRET is ignored here).
        self.impl = ops if device.type == "cuda" else reference
        self.path = "triton" if device.type == "cuda" else "torch-reference"
        # Rows time the public ops as callers call them; decode loops call sparse_decode with
        # validation off (validation reads chunk_idx back to the host).
        self.decode_options = {"validate": False} if self.impl is ops else {}

    # --- inputs ---------------------------------------------------------------------------

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(shape, device=self.device, dtype=self.dtype)

    def input_sets(self, make, set_bytes: int) -> list:
        """As many input sets as fill ``max_sets_bytes`` (1 to 4)."""
        count = max(1, min(MAX_INPUT_SETS, math.ceil(self.preset.max_sets_bytes / set_bytes)))
        return [make() for _ in range(count)]

    def prompt(self, case: Case) -> list:
        m, B, T = case.model, case.batch, case.seq_len
        elt = self.dtype.itemsize
        set_bytes = B * (m.num_q_heads * WINDOW + 2 * m.num_kv_heads * T) * m.head_dim * elt
        return self.input_sets(
            lambda: (
                self.randn(B, m.num_q_heads, WINDOW, m.head_dim),
                self.randn(B, m.num_kv_heads, T, m.head_dim),
                self.randn(B, m.num_kv_heads, T, m.head_dim),
            ),
            set_bytes,
        )

    def chunk_idx(self, case: Case) -> torch.Tensor:
        """A random selection of ``n_keep`` chunks per head, sorted (what step 6 returns)."""
        n = reference.tail_start(case.seq_len, CHUNK_SIZE, WINDOW) // CHUNK_SIZE
        scores = torch.rand(case.batch, case.model.num_kv_heads, n, device=self.device)
        n_keep = kept_chunks(case.seq_len, case.kept)
        return scores.topk(n_keep, dim=-1).indices.sort(dim=-1).values.to(torch.int32)

    # --- one callable per (op, impl) ------------------------------------------------------

    def setup(self, case: Case):
        """``(fn, input_sets)``: ``fn(inputs)`` runs the case once."""
        return getattr(self, f"setup_{case.op}")(case)

    def setup_window_scores(self, case):
        sets = [(q_obs, k) for q_obs, k, _ in self.prompt(case)]
        if case.impl == "torch-materialized":
            return (lambda s: peers.materialized_window_scores(*s)), sets
        return (lambda s: self.impl.window_scores(*s)), sets

    def setup_chunk_sum(self, case):
        m, B, T = case.model, case.batch, case.seq_len
        sets = self.input_sets(
            lambda: (torch.rand(B, m.num_kv_heads, T, device=self.device),),
            B * m.num_kv_heads * T * 4,
        )
        impl = reference if case.impl == "torch-reference" else self.impl
        return (lambda s: impl.chunk_sum(s[0], CHUNK_SIZE, WINDOW)), sets

    def setup_gather_chunks(self, case):
        chunk_idx = self.chunk_idx(case)
        p0 = reference.tail_start(case.seq_len, CHUNK_SIZE, WINDOW)
        sets = [(k, v) for _, k, v in self.prompt(case)]
        impl = reference if case.impl == "torch-reference" else self.impl
        return (lambda s: impl.gather_chunks(*s, chunk_idx, CHUNK_SIZE, p0)), sets

    def setup_compress(self, case):
        sets = self.prompt(case)
        if case.impl == "torch-materialized":
            n_keep = kept_chunks(case.seq_len, case.kept)
            return (lambda s: peers.materialized_compress(*s, n_keep, CHUNK_SIZE, WINDOW)), sets
        options = dict(ratio=case.kept, chunk_size=CHUNK_SIZE, window=WINDOW)
        return (lambda s: self.impl.compress(*s, **options)), sets

    def setup_compress_layers(self, case):
        m, B, T = case.model, case.batch, case.seq_len
        layers = [
            (
                self.randn(B, m.num_q_heads, WINDOW, m.head_dim)
                if layer % case.reuse == 0
                else None,  # a reused layer's window queries are never computed
                self.randn(B, m.num_kv_heads, T, m.head_dim),
                self.randn(B, m.num_kv_heads, T, m.head_dim),
            )
            for layer in range(self.preset.reuse_layers)
        ]
        options = dict(
            reuse_layers=case.reuse, ratio=case.kept, chunk_size=CHUNK_SIZE, window=WINDOW
        )
        return (lambda s: self.impl.compress_layers(s, **options)), [layers]

    def setup_sparse_decode(self, case):
        m, B, T = case.model, case.batch, case.seq_len
        chunk_idx = None if case.kept is None else self.chunk_idx(case)
        p0 = reference.tail_start(T, CHUNK_SIZE, WINDOW)
        seq_lens = torch.full((B,), T, dtype=torch.int32, device=self.device)
        elt = self.dtype.itemsize

        def make():
            q = self.randn(B, m.num_q_heads, m.head_dim)
            k, v = (
                self.randn(B, m.num_kv_heads, T, m.head_dim),
                self.randn(B, m.num_kv_heads, T, m.head_dim),
            )
            if case.impl == "sdpa-compacted":  # the cache of SPEC step 7, gathered untimed
                return (q, *reference.gather_chunks(k, v, chunk_idx, CHUNK_SIZE, p0))
            return q, k, v

        sets = self.input_sets(make, B * 2 * m.num_kv_heads * T * m.head_dim * elt)
        if case.impl in ("sdpa-full", "sdpa-compacted"):
            return (lambda s: peers.sdpa_decode(*s)), sets
        if case.impl == "flex-block-mask":
            run = peers.flex_sparse_decode(*sets[0], chunk_idx, CHUNK_SIZE, p0, seq_lens)
            return (lambda s: run(*s)), sets
        return (
            lambda s: self.impl.sparse_decode(
                *s, chunk_idx, CHUNK_SIZE, p0, seq_lens, **self.decode_options
            )
        ), sets


def cases(preset: OpsPreset, device: torch.device, selected_ops) -> list[Case]:
    """The sweep, goal shapes first. Torch-reference peers of chunk_sum and gather_chunks run
    only on CUDA: on CPU the op itself is the reference."""
    on_cuda = device.type == "cuda"
    out = []
    for model in preset.models:
        for seq_len in preset.seq_lens:
            for batch in preset.batches:
                shape = dict(model=model, batch=batch, seq_len=seq_len)
                out += [
                    Case("window_scores", "chunkkv", **shape),
                    Case("window_scores", "torch-materialized", **shape),
                    Case("chunk_sum", "chunkkv", **shape),
                ]
                if on_cuda:
                    out.append(Case("chunk_sum", "torch-reference", **shape))
                out.append(Case("sparse_decode", "sdpa-full", **shape))
                for kept in preset.kept:
                    out += [
                        Case("gather_chunks", "chunkkv", **shape, kept=kept),
                        Case("compress", "chunkkv", **shape, kept=kept),
                        Case("compress", "torch-materialized", **shape, kept=kept),
                        Case("sparse_decode", "chunkkv", **shape, kept=kept),
                        Case("sparse_decode", "sdpa-compacted", **shape, kept=kept),
                    ]
                    if on_cuda:
                        out.append(Case("gather_chunks", "torch-reference", **shape, kept=kept))
                    if (model.name, batch, seq_len) in preset.flex and kept == preset.kept[0]:
                        out.append(Case("sparse_decode", "flex-block-mask", **shape, kept=kept))
                for kept in preset.reuse_kept:
                    out += [
                        Case("compress_layers", "chunkkv", **shape, kept=kept, reuse=reuse)
                        for reuse in preset.reuse
                    ]
    out = [case for case in out if case.op in selected_ops]
    if preset.goal_rows_only:
        from .goals import needed_ids

        needed = needed_ids()
        out = [case for case in out if describe(case, preset, "")["id"] in needed]
    goals = list(preset.goal_shapes)

    def priority(case):
        shape = (case.model.name, case.batch, case.seq_len)
        return goals.index(shape) if shape in goals else len(goals)

    return sorted(out, key=priority)  # stable: the sweep order within a priority


def describe(case: Case, preset: OpsPreset, path: str) -> dict:
    m = case.model
    return {
        "id": row_id(
            suite="ops",
            op=case.op,
            impl=case.impl,
            model=m.name,
            B=case.batch,
            T=case.seq_len,
            dtype=preset.dtype,
            kept=case.kept,
            reuse=case.reuse,
        ),
        "suite": "ops",
        "op": case.op,
        "impl": case.impl,
        "path": path if case.impl == "chunkkv" else "torch",
        "model": m.name,
        "B": case.batch,
        "T": case.seq_len,
        "Hq": m.num_q_heads,
        "Hkv": m.num_kv_heads,
        "D": m.head_dim,
        "dtype": preset.dtype,
        "chunk_size": CHUNK_SIZE,
        "window": WINDOW,
        "kept": case.kept,
        "kept_len": None if case.kept is None else kept_len(case.seq_len, case.kept),
        "reuse": case.reuse,
        "layers": preset.reuse_layers if case.op == "compress_layers" else None,
    }


def measure(bench: Bench, case: Case, bandwidth: float) -> dict:
    preset = bench.preset
    floor_op = "sdpa_full" if case.impl == "sdpa-full" else case.op
    floor = floor_bytes(
        floor_op,
        case.model,
        case.batch,
        case.seq_len,
        preset.dtype,
        kept=case.kept,
        reuse=case.reuse,
        layers=preset.reuse_layers,
    )
    fn, sets = bench.setup(case)
    with torch.inference_mode():
        timing = time_ms(
            fn, sets, bench.device, min_reps=preset.min_reps, min_time_s=preset.min_time_s
        )
    floor_ms = floor / bandwidth * 1e3
    return {
        "status": "ok",
        "input_sets": len(sets),
        **timing,
        "floor_bytes": floor,
        "floor_ms": floor_ms,
        "time_over_floor": timing["median_ms"] / floor_ms,
        "bandwidth_util": floor_ms / timing["median_ms"],
    }


def format_row(row: dict) -> str:
    shape = f"{row['model']} B{row['B']} T{row['T']}"
    if row["kept"] is not None:
        shape += f" kept{row['kept']:.0%}"
    if row["reuse"] is not None:
        shape += f" N{row['reuse']}"
    head = f"{row['op']:<16}{row['impl']:<20}{shape:<36}"
    if row["status"] != "ok":
        return f"{head}{row['status']}: {row.get('note', '')}"
    return (
        f"{head}{row['median_ms']:10.3f} ms  floor {row['floor_ms']:9.3f} ms "
        f"({row['floor_bytes'] / 2**20:9.1f} MiB)  x{row['time_over_floor']:7.2f}  "
        f"util {row['bandwidth_util']:6.1%}"
    )


def run(
    preset: OpsPreset, device: torch.device, out, selected_ops=OPS, time_budget=None, argv=()
) -> dict:
    bench = Bench(preset, device)
    bandwidth = copy_bandwidth(
        device, preset.copy_bytes, min_reps=preset.min_reps, min_time_s=preset.min_time_s
    )
    meta = run_meta(
        device,
        "benchmarks.ops",
        argv,
        timer_description(device),
        suite="ops",
        preset=preset.name,
        ops_path=bench.path,
        copy_bandwidth_gbps=bandwidth / 1e9,
        copy_bandwidth_method=f"tensor.copy_ of {preset.copy_bytes >> 20} MiB, "
        "read + write bytes / median time",
    )
    writer = ResultsWriter(out, meta)
    print(f"# {meta['device']} | {meta['date']} | commit {meta['commit']} | {meta['command']}")
    print(
        f"# ops path: {bench.path}; copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
        f"timer: {meta['timer']}"
    )
    start = time.perf_counter()
    for case in cases(preset, device, selected_ops):
        row = describe(case, preset, bench.path)
        if time_budget is not None and time.perf_counter() - start > time_budget:
            row.update(status="skipped", note=f"time budget of {time_budget:.0f} s spent")
        else:
            try:
                row.update(measure(bench, case, bandwidth))
            except Exception as error:  # noqa: BLE001 - a failed row must not end the sweep
                row.update(
                    status="oom" if is_out_of_memory(error) else "error", note=error_note(error)
                )
            free_memory(device)
        print(format_row(writer.add(row)), flush=True)
    writer.finish(device, start)
    return writer.data


def main(argv=None) -> None:
    argv = argv_or_sys(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sweep_arguments(parser, OPS_PRESETS, "sweep")
    parser.add_argument(
        "--ops", default=",".join(OPS), help="comma-separated subset of " + ", ".join(OPS)
    )
    parser.add_argument(
        "--tuned-out",
        default=None,
        help="write the configs the autotuner chose in this run (autotune_cache/<gpu>.json form)",
    )
    args = parser.parse_args(argv)
    device = pick_device(args.device, args.cpu_threads)
    preset = OPS_PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]
    selected = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = sorted(set(selected) - set(OPS))
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {', '.join(OPS)}")
    try:
        run(preset, device, args.out, selected, args.time_budget, argv)
    finally:
        if args.tuned_out:  # also after a run cut short: what was tuned stays tuned
            from triton_chunkkv.autotune_cache.__main__ import write_tuned_configs

            write_tuned_configs(args.tuned_out)


if __name__ == "__main__":
    main()

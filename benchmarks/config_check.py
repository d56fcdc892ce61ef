"""Every autotune config of every kernel, checked against the torch reference at one shape.

    python -m benchmarks.config_check --out configs.json [--preset gpu|smoke]

The test suite launches one config per kernel (``TRITON_CHUNKKV_ONE_CONFIG=1``) and the
autotuner only ever launches the fastest, so a config that computes a wrong result could hide
until it wins on some shape. Here each config of each tuned kernel (``TunedKernel.forcing``;
the other kernels of the op run their first config) runs its op once per dtype at one shape
(left-padded keys, GQA, the HF cache layout: the superset code paths) and is compared with
:mod:`triton_chunkkv.ops.reference`; on CUDA its time (``triton.testing.do_bench``) is
recorded too, a first look at the tuning space. Rows are written one by one. Exit status 1
if any config mismatches or fails.

The ``smoke`` preset runs the same loop on the CPU through the Triton interpreter at a tiny
shape (CI), where the forced configs run as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import triton

from triton_chunkkv import ops
from triton_chunkkv.ops import _runtime, reference

from .common import (
    ResultsWriter,
    argv_or_sys,
    error_note,
    pick_device,
    row_id,
    run_meta,
    synchronize,
)

# (rtol, atol) per dtype of the inputs; as the kernel tests'.
TOLERANCES = {
    "window_scores": {
        torch.float32: (1e-5, 1e-6),
        torch.float16: (1e-3, 1e-5),
        torch.bfloat16: (1e-3, 1e-5),
    },
    "chunk_sum": {torch.float32: (1e-5, 1e-6)},
    "gather_chunks": {torch.float32: (0, 0), torch.float16: (0, 0), torch.bfloat16: (0, 0)},
    "sparse_decode": {
        torch.float32: (1e-4, 1e-5),
        torch.float16: (2e-3, 2e-3),
        torch.bfloat16: (1e-2, 1e-2),
    },
}
OP_OF_KERNEL = {
    "_window_stats_kernel": "window_scores",
    "_window_scores_kernel": "window_scores",
    "_chunk_sum_kernel": "chunk_sum",
    "_gather_chunks_kernel": "gather_chunks",
    "_sparse_decode_split_kernel": "sparse_decode",
}


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    num_kv_heads: int
    group: int
    seq_len: int  # prompt length (not a multiple of 16)
    head_dim: int
    dtypes: tuple[str, ...]


PRESETS = {
    "gpu": Shape(3, 4, 4, 3001, 128, ("bfloat16", "float16", "float32")),
    "smoke": Shape(2, 1, 2, 70, 16, ("bfloat16", "float32")),
}
CHUNK_SIZE = 10
WINDOW = 8


def config_text(config: triton.Config) -> str:
    kwargs = " ".join(f"{k}={v}" for k, v in sorted(config.kwargs.items()))
    return f"{kwargs} w{config.num_warps} s{config.num_stages}"


def kernel_configs(kernel: _runtime.TunedKernel, dtype: torch.dtype) -> list[triton.Config]:
    if dtype == torch.float32 and kernel.float32_configs:
        return kernel.float32_configs
    return kernel.configs


class Inputs:
    """One shape's inputs on ``device`` and the reference results (computed once)."""

    def __init__(self, shape: Shape, dtype: torch.dtype, device: torch.device):
        B, Hkv, g, T, D = (
            shape.batch,
            shape.num_kv_heads,
            shape.group,
            shape.seq_len,
            shape.head_dim,
        )
        generator = torch.Generator().manual_seed(0)

        def randn(*size):
            return torch.randn(size, generator=generator).to(dtype)

        self.q_obs, self.k, self.v = (
            randn(B, Hkv * g, WINDOW, D),
            randn(B, Hkv, T, D),
            randn(B, Hkv, T, D),
        )
        pads = [0] + [T // (3 + row) for row in range(1, B)]  # left padding of each row
        self.key_mask = torch.arange(T)[None, :] >= torch.tensor(pads)[:, None]
        self.scores = torch.rand(B, Hkv, T, generator=generator)
        tail = reference.tail_start(T, CHUNK_SIZE, WINDOW)
        n_keep = max(1, (tail // CHUNK_SIZE) // 4)
        self.chunk_idx = (
            torch.stack(
                [
                    torch.randperm(tail // CHUNK_SIZE, generator=generator)[:n_keep].sort().values
                    for _ in range(B * Hkv)
                ]
            )
            .view(B, Hkv, n_keep)
            .to(torch.int32)
        )
        self.tail = tail
        # sparse decode, HF layout: row b's cache starts at row_offset[b], keeps its own count
        # of chunks and decodes a few tokens past its prompt.
        s_max = T + 8
        self.decode = dict(
            q=randn(B, Hkv * g, D),
            k_cache=randn(B, Hkv, s_max, D),
            v_cache=randn(B, Hkv, s_max, D),
            chunk_idx=self.chunk_idx,
            chunk_size=CHUNK_SIZE,
            tail_start=torch.full((B,), tail, dtype=torch.int32),
            seq_lens=torch.tensor([T + 1 + row for row in range(B)], dtype=torch.int32),
            row_offset=torch.tensor([row % 2 for row in range(B)], dtype=torch.int32),
            chunk_counts=torch.tensor([n_keep - row % 2 for row in range(B)], dtype=torch.int32),
        )
        scores = reference.window_scores(self.q_obs, self.k, key_mask=self.key_mask)
        self.expected = {
            "window_scores": (scores, reference.chunk_sum(scores, CHUNK_SIZE, WINDOW) / CHUNK_SIZE),
            "chunk_sum": reference.chunk_sum(self.scores, CHUNK_SIZE, WINDOW),
            "gather_chunks": reference.gather_chunks(
                self.k, self.v, self.chunk_idx, CHUNK_SIZE, tail
            ),
            "sparse_decode": reference.sparse_decode(**self.decode),
        }
        self.device = device
        on = {
            name: value.to(device) if torch.is_tensor(value) else value
            for name, value in self.decode.items()
        }
        self.on_device = dict(
            q_obs=self.q_obs.to(device),
            k=self.k.to(device),
            v=self.v.to(device),
            key_mask=self.key_mask.to(device),
            scores=self.scores.to(device),
            chunk_idx=self.chunk_idx.to(device),
            decode=on,
        )

    def run(self, op: str):
        d = self.on_device
        if op == "window_scores":  # both pass-2 variants: token scores, fused chunk sums
            chunk_scores = ops.window_chunk_scores(
                d["q_obs"], d["k"], CHUNK_SIZE, key_mask=d["key_mask"]
            )
            scores = ops.window_scores(d["q_obs"], d["k"], key_mask=d["key_mask"])
            return scores, chunk_scores / CHUNK_SIZE  # per token: the scores' tolerance
        if op == "chunk_sum":
            return ops.chunk_sum(d["scores"], CHUNK_SIZE, WINDOW)
        if op == "gather_chunks":
            return ops.gather_chunks(d["k"], d["v"], d["chunk_idx"], CHUNK_SIZE, self.tail)
        return ops.sparse_decode(**d["decode"], validate=False)


def compare(op: str, got, expected, dtype) -> float:
    """Largest error beyond the tolerance (0.0 when within), NaN counts as a mismatch."""
    rtol, atol = TOLERANCES[op][dtype if op != "chunk_sum" else torch.float32]
    worst = 0.0
    for out, ref in zip(
        got if isinstance(got, tuple) else (got,),
        expected if isinstance(expected, tuple) else (expected,),
    ):
        out, ref = out.cpu().float(), ref.float()
        excess = (out - ref).abs() - (atol + rtol * ref.abs())
        if out.isnan().any():
            return float("inf")
        worst = max(worst, float(excess.max().clamp(min=0.0)) if excess.numel() else 0.0)
    return worst


def cases(shape: Shape):
    """``(kernel name, dtype, config)`` in a stable order."""
    for dtype_name in shape.dtypes:
        dtype = getattr(torch, dtype_name)
        for name in OP_OF_KERNEL:
            if name == "_chunk_sum_kernel" and dtype != torch.float32:
                continue  # its input is float32 token scores whatever the model's dtype
            for config in kernel_configs(_runtime.TUNED_KERNELS[name], dtype):
                yield name, dtype, config


def run(shape: Shape, device: torch.device, out, preset_name: str, argv=()) -> int:
    meta = run_meta(
        device,
        "benchmarks.config_check",
        argv,
        "triton.testing.do_bench (median)" if device.type == "cuda" else "none (CPU)",
        suite="configs",
        preset=preset_name,
        shape=dataclasses.asdict(shape),
    )
    writer = ResultsWriter(out, meta)
    print(f"# {meta['device']} | {meta['date']} | commit {meta['commit']} | {meta['command']}")
    run_start = time.perf_counter()
    inputs = {}
    failures = 0
    # Kernels not being checked run their first config: no autotuning here.
    with _runtime.environment({"TRITON_CHUNKKV_ONE_CONFIG": "1"}):
        for name, dtype, config in cases(shape):
            op = OP_OF_KERNEL[name]
            if dtype not in inputs:
                inputs[dtype] = Inputs(shape, dtype, device)
            data = inputs[dtype]
            row = {
                "id": row_id(
                    suite="configs",
                    kernel=name,
                    dtype=str(dtype)[6:],
                    config=config_text(config).replace(" ", ","),
                ),
                "suite": "configs",
                "kernel": name,
                "op": op,
                "dtype": str(dtype)[6:],
                "config": config_text(config),
            }
            start = time.perf_counter()
            try:
                with _runtime.TUNED_KERNELS[name].forcing(config):
                    got = data.run(op)
                    synchronize(device)
                    error = compare(op, got, data.expected[op], dtype)
                    row.update(status="ok" if error == 0.0 else "mismatch", excess_error=error)
                    if device.type == "cuda":
                        row["median_ms"] = triton.testing.do_bench(
                            lambda data=data, op=op: data.run(op), warmup=5, rep=20
                        )
            except Exception as exc:  # noqa: BLE001 - one failing config must not end the run
                row.update(status="error", note=error_note(exc))
            row["seconds"] = round(time.perf_counter() - start, 3)
            failures += row["status"] != "ok"
            writer.add(row)
            timing = f"{row['median_ms']:.4f} ms" if "median_ms" in row else ""
            print(
                f"{name:<30}{row['dtype']:<10}{row['config']:<36}{row['status']:<9}{timing}",
                flush=True,
            )
    writer.finish(device, run_start)
    print(f"{failures} of {len(writer.data['rows'])} configs failed")
    return 1 if failures else 0


def main(argv=None) -> int:
    argv = argv_or_sys(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="gpu on CUDA, smoke otherwise"
    )
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    preset = args.preset or ("gpu" if device.type == "cuda" else "smoke")
    if device.type == "cpu" and not _runtime.interpreting():
        # Triton picks the interpreter when the kernels are defined, at import.
        parser.error("on the CPU the kernels run in the Triton interpreter: set TRITON_INTERPRET=1")
    return run(PRESETS[preset], device, args.out, preset, argv)


if __name__ == "__main__":
    raise SystemExit(main())

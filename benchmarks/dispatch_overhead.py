"""Host time per call of the ops' three routes on the CPU (``docs/DESIGN.md``, "Where an op
runs"): the implementation called directly (what the unchecked dispatchers did before the ops
were registered), the unchecked dispatcher (``_sparse_decode``, ...: the implementation
directly in plain eager mode), and the registered operator ``torch.ops.triton_chunkkv.<op>``
(what compiled code calls). Also the bare cost of the two ways ``torch.library`` registers an
operator, on a function that does nothing, with ``sparse_decode``'s 13 arguments.

    python -m benchmarks.dispatch_overhead            # torch reference on the CPU
    TRITON_INTERPRET=1 python -m benchmarks.dispatch_overhead --calls 200

The fastest of ``--repeats`` runs of ``--calls`` calls each, in microseconds; tiny shapes, so the
numbers are host time (the reference's own work included, the same in every column).
"""

from __future__ import annotations

import argparse
import time

import torch

from triton_chunkkv import ops
from triton_chunkkv.ops import _runtime, library, reference
from triton_chunkkv.ops.kernels import chunk_sum, decode_select, gather, select_chunks
from triton_chunkkv.ops.kernels import sparse_decode as sparse
from triton_chunkkv.ops.kernels import window_scores as scores


def per_call_us(fns, args, calls: int, repeats: int) -> list[float]:
    """Microseconds per call of each of ``fns`` (``args[i]`` for ``fns[i]``): the fastest of
    ``repeats`` runs, the functions taking turns so that a busy machine slows each alike."""
    for fn, fn_args in zip(fns, args):
        for _ in range(max(calls // 10, 1)):
            fn(*fn_args)
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, (fn, fn_args) in enumerate(zip(fns, args)):
            start = time.perf_counter()
            for _ in range(calls):
                fn(*fn_args)
            best[i] = min(best[i], (time.perf_counter() - start) / calls * 1e6)
    return best


def cases():
    """``(op, implementation, dispatcher, operator, dispatcher args, operator args)``."""
    B, Hkv, g, T, D, c, w = 1, 1, 1, 24, 16, 4, 4
    q_obs = torch.randn(B, Hkv * g, w, D)
    k, v = torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    p0 = reference.tail_start(T, c, w)
    idx = torch.tensor([[[0, 2]]], dtype=torch.int32)
    q = torch.randn(B, Hkv * g, D)
    seq_lens = torch.tensor([T], dtype=torch.int32)
    kmin, kmax = ops.chunk_bounds(k, c, p0 // c)
    decode = (q, k, v, idx, c, p0, seq_lens, None, None, None, None, None)
    decode_op = (q, k, v, idx, c, p0, None, seq_lens, None, None, None, None, None)
    ops_ = library.OPERATORS
    return [
        ("window_scores", scores.window_scores_impl, scores._window_scores,
         ops_["window_scores"], (q_obs, k, None, None, 1), None),
        ("chunk_sum", chunk_sum.chunk_sum_impl, chunk_sum._chunk_sum, ops_["chunk_sum"],
         (torch.rand(B, Hkv, T), c, w), None),
        ("select_chunks", select_chunks.select_chunks_impl, select_chunks._select_chunks,
         ops_["select_chunks"], (torch.rand(B, Hkv, 5), 2, False), None),
        ("gather_chunks", gather.gather_chunks_impl, gather._gather_chunks,
         ops_["gather_chunks"], (k, v, idx, c, p0), None),
        ("sparse_decode", sparse.sparse_decode_impl, sparse._sparse_decode,
         ops_["sparse_decode"], decode, decode_op),
        ("decode_chunk_scores", decode_select.decode_chunk_scores_impl,
         decode_select._decode_chunk_scores, ops_["decode_chunk_scores"],
         (q, kmin, kmax, None), None),
        ("chunk_bounds", decode_select.chunk_bounds_impl, decode_select._chunk_bounds,
         ops_["chunk_bounds"], (k, c, p0 // c), None),
    ]  # fmt: skip


def bare_registrations():
    """A do-nothing op with ``sparse_decode``'s schema, registered both ways."""
    schema = str(library.SPARSE_DECODE._schema).split("::", 1)[1]
    arguments = schema[schema.index("(") + 1 : schema.rindex(") ->")]

    def nothing(q, *rest):
        return q.new_empty(q.shape)

    lib = torch.library.Library("chunkkv_overhead", "DEF")
    lib.define(f"nothing({arguments}) -> Tensor")
    lib.impl("nothing", nothing, "CompositeExplicitAutograd")

    def nothing_typed(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        chunk_idx: torch.Tensor,
        chunk_size: int,
        tail_start: int,
        tail_starts: torch.Tensor | None,
        seq_lens: torch.Tensor,
        scaling: float | None,
        num_splits: int | None,
        slot_map: torch.Tensor | None,
        row_offset: torch.Tensor | None,
        chunk_counts: torch.Tensor | None,
    ) -> torch.Tensor:
        return q.new_empty(q.shape)

    custom = torch.library.custom_op("chunkkv_overhead::nothing_custom", mutates_args=())(
        nothing_typed
    )
    return lib, nothing, torch.ops.chunkkv_overhead.nothing.default, custom


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    path = "kernels (interpreter)" if _runtime.use_triton(torch.empty(0)) else "reference"
    print(f"us per call, CPU, {path}, torch {torch.__version__}")
    print(f"{'op':<20} {'impl':>9} {'dispatcher':>11} {'operator':>9} {'operator - impl':>16}")
    for name, impl, dispatcher, operator, call_args, op_args in cases():
        times = per_call_us(
            [impl, dispatcher, operator],
            [call_args, call_args, op_args or call_args],
            args.calls,
            args.repeats,
        )
        print(
            f"{name:<20} {times[0]:>9.1f} {times[1]:>11.1f} {times[2]:>9.1f} "
            f"{times[2] - times[0]:>16.1f}"
        )
    lib, nothing, defined, custom = bare_registrations()
    q = torch.randn(1, 1, 16)
    bare = (q, q, q, q, 4, 0, None, q, None, None, None, None, None)

    def checked_nothing(*bare_args):  # what a dispatcher adds in eager mode
        if _runtime.call_directly(*bare_args[:4], bare_args[6], bare_args[7], *bare_args[10:]):
            return nothing(*bare_args)
        return defined(*bare_args)

    rows = [
        ("plain function", nothing),
        ("call_directly + function", checked_nothing),
        ("Library.define + impl", defined),
        ("torch.library.custom_op", custom),
    ]
    times = per_call_us([fn for _, fn in rows], [bare] * len(rows), args.calls * 5, args.repeats)
    print("do-nothing op, sparse_decode's 13 arguments:")
    for (label, _), us in zip(rows, times):
        print(f"  {label:<26} {us:>6.1f}")
    del lib


if __name__ == "__main__":
    main()

"""The bytes each op must move (SPEC.md), whatever the implementation: the memory floor.

A row's floor time is these bytes at the copy bandwidth measured in the same run; ``time /
floor`` says how far an implementation is from memory-bound perfection. What counts:

* every input element the result depends on is read once (``k`` entirely for the scores,
  ``v`` only at the kept rows: the other rows never reach the output);
* every output element is written once;
* nothing else: the ``[B, Hq, w, T]`` window logits and the token scores inside
  ``compress`` can stay on chip, so a materializing implementation pays for them above the
  floor.

``python -m benchmarks.floors`` prints the floors of the GPU sweep (docs/PERF_NOTES.md).
"""

from __future__ import annotations

import argparse
import math

import torch

from triton_chunkkv.ops import reference

from .shapes import CHUNK_SIZE, OPS_PRESETS, WINDOW, Model

FLOAT32_BYTES = 4
INDEX_BYTES = 4  # int32 chunk_idx


def dtype_bytes(dtype: str) -> int:
    return torch.empty(0, dtype=getattr(torch, dtype)).element_size()


def kept_chunks(seq_len: int, kept: float) -> int:
    """``n_keep`` of SPEC step 5 for ``ratio = kept`` (every chunk when nothing is dropped)."""
    n_keep = reference.num_kept_chunks(
        seq_len, reference.resolve_budget(seq_len, ratio=kept), CHUNK_SIZE, WINDOW
    )
    if n_keep is None:
        return reference.tail_start(seq_len, CHUNK_SIZE, WINDOW) // CHUNK_SIZE
    return n_keep


def kept_len(seq_len: int, kept: float) -> int:
    """Rows per KV head after compression: kept chunks plus the dense tail."""
    return (
        kept_chunks(seq_len, kept) * CHUNK_SIZE
        + seq_len
        - reference.tail_start(seq_len, CHUNK_SIZE, WINDOW)
    )


def floor_bytes(
    op: str,
    model: Model,
    batch: int,
    seq_len: int,
    dtype: str,
    kept: float | None = None,
    reuse: int | None = None,
    layers: int | None = None,
) -> int:
    """Bytes ``op`` must move. ``op`` names a computation, so a peer row of the same op (same
    output) has the same floor; ``sdpa_full`` is decode attention over the whole cache."""
    elt = dtype_bytes(dtype)
    heads_rows = batch * model.num_kv_heads  # one row = one token of one KV head
    row = model.head_dim * elt
    q_obs = batch * model.num_q_heads * WINDOW * model.head_dim * elt
    q_decode = batch * model.num_q_heads * model.head_dim * elt  # one query, one output
    p0 = reference.tail_start(seq_len, CHUNK_SIZE, WINDOW)
    if op == "window_scores":
        return q_obs + heads_rows * (seq_len * row + seq_len * FLOAT32_BYTES)
    if op == "chunk_sum":
        return heads_rows * (p0 + p0 // CHUNK_SIZE) * FLOAT32_BYTES
    if op == "sdpa_full":
        return 2 * q_decode + heads_rows * 2 * seq_len * row
    kept_rows = kept_len(seq_len, kept)
    index = heads_rows * kept_chunks(seq_len, kept) * INDEX_BYTES
    gather = heads_rows * 4 * kept_rows * row + index  # read and write kept rows of k and v
    # k read whole for the scores, v only at the kept rows, both written compacted.
    compress = q_obs + heads_rows * (seq_len + 3 * kept_rows) * row + index
    if op == "gather_chunks":
        return gather
    if op == "compress":
        return compress
    if op == "compress_layers":
        leaders = math.ceil(layers / reuse)
        return leaders * compress + (layers - leaders) * gather
    if op == "sparse_decode":
        return 2 * q_decode + heads_rows * 2 * kept_rows * row + index
    raise ValueError(f"no floor for op {op!r}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpu", choices=sorted(OPS_PRESETS))
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    preset = OPS_PRESETS[args.preset]
    print("| model | B | T | kept | op | floor MiB |\n| --- | --- | --- | --- | --- | --- |")
    for model in preset.models:
        for seq_len in preset.seq_lens:
            rows = [("window_scores", None), ("chunk_sum", None), ("sdpa_full", None)]
            rows += [
                (op, kept)
                for kept in preset.kept
                for op in ("gather_chunks", "compress", "sparse_decode")
            ]
            for op, kept in rows:
                mib = floor_bytes(op, model, args.batch, seq_len, preset.dtype, kept) / 2**20
                kept_text = "-" if kept is None else f"{kept:.0%}"
                print(
                    f"| {model.name} | {args.batch} | {seq_len} | {kept_text} | {op} | {mib:.2f} |"
                )


if __name__ == "__main__":
    main()

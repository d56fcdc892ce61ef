"""SPEC step 7: one pass writing the chosen chunks and the dense tail into fresh tensors.

A program copies a block of ``BLOCK_ROWS`` output rows of one ``(b, h)`` for both ``k`` and
``v``. Output row ``r`` reads source position ``chunk_idx[r // c] * c + r % c`` while
``r < n_keep * c``, and ``tail_start + r - n_keep * c`` after that, so any chunk size works
(10 is not a power of two) and a block may straddle two chunks or the start of the tail.
Each kept byte is read once and written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .._checks import check_bool, check_int, check_key_value, check_same, check_tensor
from .._runtime import bucket, call_directly, cdiv, empty_output, next_power_of_2, tuned, use_triton

INDEX_DTYPES = (torch.int32, torch.int64)


def check_chunk_idx(chunk_idx, batch, num_kv_heads, num_chunks, data=True) -> None:
    """``chunk_idx``'s type and shape; with ``data``, also its values (two host syncs)."""
    check_tensor("chunk_idx", chunk_idx, 3, dtypes=INDEX_DTYPES)
    if tuple(chunk_idx.shape[:2]) != (batch, num_kv_heads):
        raise ValueError(
            f"chunk_idx must have shape [{batch}, {num_kv_heads}, n_keep], got "
            f"{tuple(chunk_idx.shape)}"
        )
    if data and chunk_idx.numel():
        low, high = int(chunk_idx.min()), int(chunk_idx.max())
        if low < 0 or high >= num_chunks:
            raise ValueError(
                f"chunk_idx must lie in [0, {num_chunks}) (the chunks before "
                f"tail_start), got values in [{low}, {high}]"
            )


def gather_chunks(k, v, chunk_idx, chunk_size, tail_start, *, validate=True):
    """``(k_out, v_out)``, each ``[B, Hkv, n_keep * c + T - tail_start, D]`` contiguous:
    chunk ``chunk_idx[..., 0]``, ..., then ``[tail_start, T)``, in that order.

    Every argument's type, shape, dtype and device is checked (no host sync); ``validate``
    also checks that the indices lie in ``[0, tail_start // chunk_size)``, which reads them on
    the host. ``validate=False`` skips that data check only, so the call can be compiled with
    ``torch.compile(fullgraph=True)`` or captured in a CUDA graph; a bad index then reads
    wrong or out-of-bounds memory.
    """
    check_bool("validate", validate)
    check_key_value("k", k, "v", v, 4)
    check_tensor("chunk_idx", chunk_idx, 3, dtypes=INDEX_DTYPES)
    check_same("device", k=k, v=v, chunk_idx=chunk_idx)
    check_int("chunk_size", chunk_size, minimum=1)
    check_int("tail_start", tail_start, minimum=0)
    B, Hkv, T, D = k.shape
    if tail_start > T:
        raise ValueError(f"tail_start must be <= the sequence length {T}, got {tail_start}")
    check_chunk_idx(chunk_idx, B, Hkv, tail_start // chunk_size, data=validate)
    return _gather_chunks(k, v, chunk_idx, chunk_size, tail_start)


def _gather_chunks(k, v, chunk_idx, chunk_size, tail_start):
    """Unchecked dispatch: the operator ``triton_chunkkv::gather_chunks`` (:mod:`..library`),
    or its implementation directly in plain eager mode."""
    if call_directly(k, v, chunk_idx):
        return gather_chunks_impl(k, v, chunk_idx, chunk_size, tail_start)
    return torch.ops.triton_chunkkv.gather_chunks.default(k, v, chunk_idx, chunk_size, tail_start)


def gather_chunks_impl(k, v, chunk_idx, chunk_size, tail_start):
    """The operator's implementation: the Triton kernel or the reference."""
    if not use_triton(k):
        k_out, v_out = reference.gather_chunks(k, v, chunk_idx, chunk_size, tail_start)
        return k_out.contiguous(), v_out.contiguous()
    B, Hkv, T, D = k.shape
    n_keep = chunk_idx.shape[2]
    out_len = n_keep * chunk_size + T - tail_start
    k_out = empty_output((B, Hkv, out_len, D), k.dtype, k.device)
    v_out = empty_output((B, Hkv, out_len, D), v.dtype, v.device)
    if k_out.numel() == 0:
        return k_out, v_out
    # One flat grid axis: neither B * Hkv nor the row blocks can hit CUDA's 65535 limit of
    # the other axes.
    _gather_chunks_kernel[lambda meta: (B * Hkv * cdiv(out_len, meta["BLOCK_ROWS"]),)](
        k,
        v,
        chunk_idx,
        k_out,
        v_out,
        Hkv,
        out_len,
        n_keep * chunk_size,
        chunk_size,
        tail_start,
        *k.stride(),
        *v.stride(),
        *chunk_idx.stride(),
        TOTAL_ROWS_BUCKET=bucket(B * Hkv * out_len),
        ELEMENT_BYTES=k.element_size(),
        HEAD_DIM=D,
        BLOCK_D=next_power_of_2(D),
    )
    return k_out, v_out


@tuned(
    configs=[
        triton.Config({"BLOCK_ROWS": rows}, num_warps=warps, num_stages=1)
        for rows, warps in [(8, 2), (16, 4), (32, 4), (32, 8), (64, 8)]
    ],
    key=["TOTAL_ROWS_BUCKET", "HEAD_DIM", "ELEMENT_BYTES"],
    # Large blocks keep the interpreter's program count (and the test time) low.
    interpret_config=triton.Config({"BLOCK_ROWS": 64}),
)
@triton.jit
def _gather_chunks_kernel(
    k_ptr,
    v_ptr,
    chunk_idx_ptr,
    k_out_ptr,
    v_out_ptr,
    num_kv_heads,
    out_len,
    chunk_rows,
    chunk_size,
    tail_start,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_cb,
    stride_ch,
    stride_ck,
    TOTAL_ROWS_BUCKET,
    ELEMENT_BYTES,  # autotune keys only
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    """Rows ``[r0, r0 + BLOCK_ROWS)`` of ``k_out[b, h]`` and ``v_out[b, h]``; ``chunk_rows``
    is ``n_keep * c``, the output rows that come from chunks rather than the tail."""
    row_blocks = tl.cdiv(out_len, BLOCK_ROWS)
    bh = tl.program_id(0) // row_blocks
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    rows = (tl.program_id(0) % row_blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < out_len
    from_chunk = rows < chunk_rows

    chunk = tl.load(
        chunk_idx_ptr
        + b.to(tl.int64) * stride_cb
        + h.to(tl.int64) * stride_ch
        + (rows // chunk_size) * stride_ck,
        mask=from_chunk,
        other=0,
    )
    positions = tl.where(
        from_chunk,
        chunk.to(tl.int64) * chunk_size + rows % chunk_size,
        tail_start + (rows - chunk_rows),
    ).to(tl.int64)

    mask = row_ok[:, None]
    if HEAD_DIM != BLOCK_D:
        mask = mask & (cols < HEAD_DIM)[None, :]
    # Outputs are fresh contiguous [B, Hkv, out_len, D] tensors.
    out_offsets = (bh.to(tl.int64) * out_len + rows)[:, None] * HEAD_DIM + cols[None, :]

    k_src = (
        k_ptr
        + b.to(tl.int64) * stride_kb
        + h.to(tl.int64) * stride_kh
        + positions[:, None] * stride_kt
        + cols[None, :] * stride_kd
    )
    tl.store(k_out_ptr + out_offsets, tl.load(k_src, mask=mask), mask=mask)
    v_src = (
        v_ptr
        + b.to(tl.int64) * stride_vb
        + h.to(tl.int64) * stride_vh
        + positions[:, None] * stride_vt
        + cols[None, :] * stride_vd
    )
    tl.store(v_out_ptr + out_offsets, tl.load(v_src, mask=mask), mask=mask)

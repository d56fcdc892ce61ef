"""SPEC steps 3-4: per-chunk sums of the token scores, up to the dense tail."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .._checks import check_chunking, check_tensor
from .._runtime import bucket, call_directly, cdiv, empty_output, next_power_of_2, tuned, use_triton

# Chunk positions are read in tiles of at most this many columns (a chunk of 10 reads 16).
MAX_CHUNK_BLOCK = 64


def chunk_sum(scores, chunk_size, window) -> torch.Tensor:
    """float32 ``[B, Hkv, n]``: ``scores [B, Hkv, T]`` summed over chunks ``[j*c, (j+1)*c)``
    for ``j < n = P0 / c`` (SPEC step 3 fixes ``P0``)."""
    check_tensor("scores", scores, 3)
    check_chunking(chunk_size, window, scores.shape[2])
    return _chunk_sum(scores, chunk_size, window)


def _chunk_sum(scores, chunk_size, window) -> torch.Tensor:
    """Unchecked dispatch: the operator ``triton_chunkkv::chunk_sum`` (:mod:`..library`), or
    its implementation directly in plain eager mode."""
    if call_directly(scores):
        return chunk_sum_impl(scores, chunk_size, window)
    return torch.ops.triton_chunkkv.chunk_sum.default(scores, chunk_size, window)


def chunk_sum_impl(scores, chunk_size, window) -> torch.Tensor:
    """The operator's implementation: the Triton kernel or the reference."""
    if not use_triton(scores):
        # Contiguous, as the operator's fake says (one-token chunks of strided scores are not).
        return reference.chunk_sum(scores, chunk_size, window).contiguous()
    B, H, T = scores.shape
    num_chunks = reference.tail_start(T, chunk_size, window) // chunk_size
    out = empty_output((B, H, num_chunks), torch.float32, scores.device)
    if num_chunks == 0 or B * H == 0:
        return out
    _chunk_sum_kernel[lambda meta: (B * H, cdiv(num_chunks, meta["BLOCK_CHUNKS"]))](
        scores,
        out,
        *scores.stride(),
        H,
        num_chunks,
        chunk_size,
        CHUNKS_BUCKET=bucket(num_chunks),
        CHUNK_BLOCK=min(next_power_of_2(chunk_size), MAX_CHUNK_BLOCK),
    )
    return out


@tuned(
    # At chunk sizes above 32 (CHUNK_BLOCK 64), 128 and more chunks on 4 warps spill for sm_90:
    # (256, 4) and (512, 8) 0.7-1 KB per thread with triton 3.9, (128, 4) and (256, 8) 56 B with
    # triton 3.6 (benchmarks/compile_reports). The op reads 4 bytes a token: small blocks cost
    # nothing.
    configs=[
        triton.Config({"BLOCK_CHUNKS": block}, num_warps=warps)
        for block, warps in [(32, 1), (64, 2), (64, 4), (128, 8)]
    ],
    key=["CHUNKS_BUCKET", "CHUNK_BLOCK"],
    interpret_config=triton.Config({"BLOCK_CHUNKS": 32}),
)
@triton.jit
def _chunk_sum_kernel(
    scores_ptr,
    out_ptr,
    stride_b,
    stride_h,
    stride_t,
    num_heads,
    num_chunks,
    chunk_size,
    CHUNKS_BUCKET,  # autotune key only
    CHUNK_BLOCK: tl.constexpr,
    BLOCK_CHUNKS: tl.constexpr,
):
    """``out[b, h, j] = sum of scores[b, h, j*c : (j+1)*c]`` for ``BLOCK_CHUNKS`` chunks ``j``,
    reading each chunk as ``CHUNK_BLOCK``-wide column tiles."""
    bh = tl.program_id(0)
    chunks = tl.program_id(1) * BLOCK_CHUNKS + tl.arange(0, BLOCK_CHUNKS)
    chunk_ok = chunks < num_chunks
    row_ptr = (
        scores_ptr
        + (bh // num_heads).to(tl.int64) * stride_b
        + (bh % num_heads).to(tl.int64) * stride_h
    )
    total = tl.zeros([BLOCK_CHUNKS], tl.float32)
    for offset in range(0, chunk_size, CHUNK_BLOCK):
        cols = offset + tl.arange(0, CHUNK_BLOCK)
        positions = chunks[:, None] * chunk_size + cols[None, :]
        tile = tl.load(
            row_ptr + positions * stride_t,
            mask=chunk_ok[:, None] & (cols < chunk_size)[None, :],
            other=0.0,
        )
        total += tl.sum(tile.to(tl.float32), axis=1)
    tl.store(out_ptr + bh.to(tl.int64) * num_chunks + chunks, total, mask=chunk_ok)

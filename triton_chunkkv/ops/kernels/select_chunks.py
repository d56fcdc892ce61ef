"""SPEC steps 4-6: the top-scoring chunks, ties to the lower index, sorted ascending.

One launch, no sort: one program per ``(b, h)`` row (per ``b`` with ``share_heads``, which
first adds the heads' scores in head order, as ``reference.sum_in_order`` does) finds the
``n_keep``-th largest score by a 32-step bitwise search on order-preserving integer keys, then
keeps every chunk above it and, of the chunks equal to it, the lowest-indexed ones still
needed, writing their indices in ascending order (a prefix sum gives each its output slot).

The keys order the scores as ``torch.sort(descending=True, stable=True)`` does, which is what
the reference runs: every NaN ties with every other NaN above ``+inf``, ``-0.0`` ties with
``0.0``, and equal scores go to the lower index. Scores are compared in float32 (16-bit inputs
are widened exactly, as the reference's ``.float()`` widens them).

CPU tensors without the interpreter run the reference (two stable sorts).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .._checks import check_bool, check_int, check_tensor
from .._runtime import (
    call_directly,
    empty_output,
    interpreting,
    launch_lock,
    next_power_of_2,
    use_triton,
)

# A row up to this many chunks is held in registers (n <= 8192: T up to ~82K tokens at c 10);
# longer rows are walked in tiles of it, each search step re-reading them from L1/L2.
MAX_BLOCK = 8192
# The interpreter pays per operation, not per element.
INTERPRET_MAX_BLOCK = 1024


def select_chunks(chunk_scores, n_keep, *, share_heads=False) -> torch.Tensor:
    """int32 ``[B, Hkv, n_keep]`` from ``chunk_scores [B, Hkv, n]``; with ``share_heads`` the
    scores are summed over heads first and every head keeps the same chunks."""
    check_tensor("chunk_scores", chunk_scores, 3)
    check_int("n_keep", n_keep, minimum=0)
    check_bool("share_heads", share_heads)
    if n_keep > chunk_scores.shape[2]:
        raise ValueError(f"n_keep must be <= the {chunk_scores.shape[2]} chunks, got {n_keep}")
    return _select_chunks(chunk_scores, n_keep, share_heads)


def _select_chunks(chunk_scores, n_keep, share_heads) -> torch.Tensor:
    """Unchecked dispatch: the operator ``triton_chunkkv::select_chunks`` (:mod:`..library`), or
    its implementation directly in plain eager mode."""
    if call_directly(chunk_scores):
        return select_chunks_impl(chunk_scores, n_keep, share_heads)
    return torch.ops.triton_chunkkv.select_chunks.default(chunk_scores, n_keep, share_heads)


def select_chunks_impl(chunk_scores, n_keep, share_heads) -> torch.Tensor:
    """The operator's implementation: the selection kernel, or the reference's stable sorts."""
    if not use_triton(chunk_scores):
        return reference.select_chunks(chunk_scores, n_keep, share_heads=share_heads).contiguous()
    B, H, n = chunk_scores.shape
    out = empty_output((B, H, n_keep), torch.int32, chunk_scores.device)
    if out.numel() == 0:
        return out
    max_block = INTERPRET_MAX_BLOCK if interpreting() else MAX_BLOCK
    block = min(max(next_power_of_2(n), 16), max_block)
    with launch_lock():  # a plain @triton.jit kernel: the tuned ones take the lock themselves
        _select_chunks_kernel[(B if share_heads else B * H,)](
            chunk_scores,
            out,
            *chunk_scores.stride(),
            H,
            n,
            n_keep,
            SHARE_HEADS=share_heads,
            SINGLE_TILE=n <= block,
            BLOCK=block,
            num_warps=8 if block >= 4096 else 4,
        )
    return out


@triton.jit
def _order_keys(row_ptr, offs, n, stride_h, stride_n, num_heads, SHARE_HEADS: tl.constexpr):
    """int32 keys of the scores ``offs`` of one row whose signed order is the scores' order
    with ties as the reference's sort sees them; positions past ``n`` get the lowest key,
    below every score's (so they are never chosen: ``n_keep <= n``)."""
    ok = offs < n
    x = tl.load(row_ptr + offs * stride_n, mask=ok, other=0.0).to(tl.float32)
    if SHARE_HEADS:  # heads added one after another, as reference.sum_in_order adds them
        for head in range(1, num_heads):
            x += tl.load(row_ptr + head * stride_h + offs * stride_n, mask=ok, other=0.0).to(
                tl.float32
            )
    bits = x.to(tl.int32, bitcast=True)
    # Negative floats: flip the magnitude bits, so that a larger magnitude is a smaller key.
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = tl.where(bits == -2147483648, 0, key)  # -0.0 ties with 0.0
    key = tl.where(x != x, 2147483647, key)  # every NaN ties with every NaN, above +inf
    return tl.where(ok, key, -2147483648)


@triton.jit
def _select_chunks_kernel(
    scores_ptr,
    out_ptr,
    stride_b,
    stride_h,
    stride_n,
    num_heads,
    n,
    n_keep,
    SHARE_HEADS: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``out[b, h]``: the ``n_keep`` chunks of the highest keys, ties to the lower index, in
    ascending order (every head of ``b`` with ``SHARE_HEADS``)."""
    row = tl.program_id(0)
    if SHARE_HEADS:
        b = row
        row_ptr = scores_ptr + b.to(tl.int64) * stride_b
    else:
        b = row // num_heads
        row_ptr = scores_ptr + b.to(tl.int64) * stride_b + (row % num_heads).to(tl.int64) * stride_h
    offs = tl.arange(0, BLOCK)
    if SINGLE_TILE:
        keys = _order_keys(row_ptr, offs, n, stride_h, stride_n, num_heads, SHARE_HEADS)

    # The n_keep-th largest key: the largest threshold with count(key >= threshold) >= n_keep,
    # built bit by bit from the top, in the unsigned order of key ^ (1 << 31) (which is the
    # keys' signed order): threshold starts at the lowest key, -2^31.
    threshold = tl.full([], -2147483648, tl.int32)
    for step in range(0, 32):
        candidate = threshold ^ (tl.full([], 1, tl.int32) << (31 - step))
        if SINGLE_TILE:
            count = tl.sum((keys >= candidate).to(tl.int32), axis=0)
        else:
            count = 0
            for start in range(0, n, BLOCK):
                tile = _order_keys(
                    row_ptr, start + offs, n, stride_h, stride_n, num_heads, SHARE_HEADS
                )
                count += tl.sum((tile >= candidate).to(tl.int32), axis=0)
        threshold = tl.where(count >= n_keep, candidate, threshold)

    # Keep every key above the threshold, and the lowest-indexed keys equal to it up to n_keep.
    if SINGLE_TILE:
        above = tl.sum((keys > threshold).to(tl.int32), axis=0)
    else:
        above = 0
        for start in range(0, n, BLOCK):
            tile = _order_keys(row_ptr, start + offs, n, stride_h, stride_n, num_heads, SHARE_HEADS)
            above += tl.sum((tile > threshold).to(tl.int32), axis=0)
    ties_wanted = n_keep - above
    ties_before = 0  # ties in earlier tiles
    kept_before = 0  # kept chunks in earlier tiles
    for start in range(0, n, BLOCK):
        if SINGLE_TILE:
            tile = keys
        else:
            tile = _order_keys(row_ptr, start + offs, n, stride_h, stride_n, num_heads, SHARE_HEADS)
        tie = (tile == threshold).to(tl.int32)
        tie_rank = ties_before + tl.cumsum(tie, axis=0) - tie
        kept = ((tile > threshold) | ((tie == 1) & (tie_rank < ties_wanted))).to(tl.int32)
        slot = kept_before + tl.cumsum(kept, axis=0) - kept
        chunk = start + offs
        if SHARE_HEADS:
            for head in range(0, num_heads):
                out_row = out_ptr + ((b * num_heads + head).to(tl.int64)) * n_keep
                tl.store(out_row + slot, chunk, mask=kept == 1)
        else:
            tl.store(out_ptr + row.to(tl.int64) * n_keep + slot, chunk, mask=kept == 1)
        ties_before += tl.sum(tie, axis=0)
        kept_before += tl.sum(kept, axis=0)

"""Decode-time, query-aware chunk selection (beyond SPEC): Quest-style bounds per chunk.

At compression, every whole chunk of the prompt gets per-dimension key bounds ``kmin``/``kmax``
(:func:`chunk_bounds`). At each decode step, the query bounds the logit of any key in chunk
``j`` from above: ``max over k in j of <q, k> <= <max(q, 0), kmax_j> + <min(q, 0), kmin_j>``
(each dimension takes whichever bound its sign prefers). A KV head's chunk score is the largest
bound over its GQA group's query heads (:func:`decode_chunk_scores`, one Triton launch: two
``tl.dot`` per block of chunks), and the top chunks go straight to ``ops.sparse_decode``
(:func:`select_decode_chunks`): no gather, and no host sync, so a step can be captured in a
CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .._checks import check_dim, check_gqa, check_int, check_same, check_tensor
from .._runtime import (
    bucket,
    call_directly,
    cdiv,
    dot_in_fp32,
    empty_output,
    next_power_of_2,
    tuned,
    use_triton,
)
from .select_chunks import _select_chunks

# tl.dot needs M >= 16: the g query heads of a KV head are padded up to it.
MIN_DOT_ROWS = 16


def chunk_bounds(k, chunk_size: int, num_chunks: int):
    """``(kmin, kmax)``, each ``[B, Hkv, num_chunks, D]`` in ``k``'s dtype: the per-dimension
    minimum and maximum of ``k [B, Hkv, T, D]`` over each chunk ``[j*c, (j+1)*c)``."""
    check_tensor("k", k, 4)
    check_int("chunk_size", chunk_size, minimum=1)
    check_int("num_chunks", num_chunks, minimum=0)
    if num_chunks * chunk_size > k.shape[2]:
        raise ValueError(
            f"num_chunks * chunk_size = {num_chunks * chunk_size} exceeds the {k.shape[2]} keys"
        )
    return _chunk_bounds(k, chunk_size, num_chunks)


def _chunk_bounds(k, chunk_size: int, num_chunks: int):
    """Unchecked dispatch: the operator ``triton_chunkkv::chunk_bounds`` (:mod:`..library`), or
    its implementation directly in plain eager mode."""
    if call_directly(k):
        return chunk_bounds_impl(k, chunk_size, num_chunks)
    return torch.ops.triton_chunkkv.chunk_bounds.default(k, chunk_size, num_chunks)


def chunk_bounds_impl(k, chunk_size: int, num_chunks: int):
    """The operator's implementation: torch's min and max on every device (two reductions over
    the chunked keys, no kernel of its own)."""
    kmin, kmax = reference.chunk_bounds(k, chunk_size, num_chunks)
    return kmin.contiguous(), kmax.contiguous()


def decode_chunk_scores(q, kmin, kmax, *, chunk_counts=None, validate=True) -> torch.Tensor:
    """float32 ``[B, Hkv, n]``: for each chunk, the largest upper bound on ``<q_h, k>`` over
    its keys ``k`` and the query heads ``h`` of the KV head's GQA group. ``q [B, Hq, D]``,
    ``kmin``/``kmax [B, Hkv, n, D]`` (:func:`chunk_bounds`); with ``chunk_counts [B]`` (int32),
    chunks ``j >= chunk_counts[b]`` score ``-inf``. ``validate=False`` skips the checks."""
    if validate:
        check_scores_inputs(q, kmin, kmax, chunk_counts)
    return _decode_chunk_scores(q, kmin, kmax, chunk_counts)


def select_decode_chunks(
    q, kmin, kmax, n_keep: int, *, keep_counts=None, chunk_counts=None, validate=True
) -> torch.Tensor:
    """int32 ``[B, Hkv, n_keep]``, ascending: each KV head's ``n_keep`` best chunks by
    :func:`decode_chunk_scores` (ties: the lower index). With ``keep_counts [B]`` row ``b``
    keeps only its best ``keep_counts[b]`` (its first entries, then ``n`` as filler): pass the
    same tensor to ``sparse_decode(chunk_counts=...)``."""
    if validate:
        check_scores_inputs(q, kmin, kmax, chunk_counts)
        check_int("n_keep", n_keep, minimum=0)
        if n_keep > kmin.shape[2]:
            raise ValueError(f"n_keep must be <= the {kmin.shape[2]} chunks, got {n_keep}")
        if keep_counts is not None:
            check_tensor("keep_counts", keep_counts, 1, dtypes=(torch.int32,))
            check_dim("keep_counts", keep_counts.shape[0], q.shape[0], "length")
    scores = _decode_chunk_scores(q, kmin, kmax, chunk_counts)
    return _top_chunks(scores, n_keep, keep_counts)


def check_scores_inputs(q, kmin, kmax, chunk_counts) -> None:
    check_tensor("q", q, 3)
    check_tensor("kmin", kmin, 4)
    check_tensor("kmax", kmax, 4)
    check_same("dtype", q=q, kmin=kmin, kmax=kmax)
    check_same("device", q=q, kmin=kmin, kmax=kmax, chunk_counts=chunk_counts)
    if tuple(kmax.shape) != tuple(kmin.shape):
        raise ValueError(
            f"kmax must have kmin's shape {tuple(kmin.shape)}, got {tuple(kmax.shape)}"
        )
    check_dim("kmin", kmin.shape[0], q.shape[0], "batch size")
    check_dim("kmin", kmin.shape[3], q.shape[2], "head dim")
    check_gqa("q", q.shape[1], kmin.shape[1])
    if chunk_counts is not None:
        check_tensor("chunk_counts", chunk_counts, 1, dtypes=(torch.int32,))
        check_dim("chunk_counts", chunk_counts.shape[0], q.shape[0], "length")


def _top_chunks(scores, n_keep: int, keep_counts) -> torch.Tensor:
    """The best ``n_keep`` chunks per head, ascending; rows past their ``keep_counts`` entry
    get ``n`` (never read: ``sparse_decode`` stops at ``chunk_counts``)."""
    if keep_counts is None:
        return _select_chunks(scores, n_keep, False)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n_keep]
    rank = torch.arange(n_keep, device=scores.device)
    unused = rank >= keep_counts.long()[:, None, None]
    order = order.masked_fill(unused, scores.shape[-1])
    return order.sort(dim=-1).values.to(torch.int32)


def _decode_chunk_scores(q, kmin, kmax, chunk_counts) -> torch.Tensor:
    """Unchecked dispatch: the operator ``triton_chunkkv::decode_chunk_scores``
    (:mod:`..library`), or its implementation directly in plain eager mode."""
    if call_directly(q, kmin, kmax, chunk_counts):
        return decode_chunk_scores_impl(q, kmin, kmax, chunk_counts)
    return torch.ops.triton_chunkkv.decode_chunk_scores.default(q, kmin, kmax, chunk_counts)


def decode_chunk_scores_impl(q, kmin, kmax, chunk_counts) -> torch.Tensor:
    """The operator's implementation: the Triton kernel or the reference."""
    if not use_triton(q):
        return reference.decode_chunk_scores(q, kmin, kmax, chunk_counts=chunk_counts).contiguous()
    B, Hq, D = q.shape
    _, Hkv, n, _ = kmin.shape
    out = empty_output((B, Hkv, n), torch.float32, q.device)
    if out.numel() == 0:
        return out
    group = Hq // Hkv
    _decode_chunk_scores_kernel[lambda meta: (B * Hkv, cdiv(n, meta["BLOCK_N"]))](
        q,
        kmin,
        kmax,
        chunk_counts,
        out,
        Hkv,
        n,
        *q.stride(),
        *kmin.stride(),
        *kmax.stride(),
        CHUNKS_BUCKET=bucket(n),
        ELEMENT_BYTES=q.element_size(),
        GROUP=group,
        HEAD_DIM=D,
        HAS_CHUNK_COUNTS=chunk_counts is not None,
        DOT_IN_FP32=dot_in_fp32(q.dtype),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_G=max(next_power_of_2(group), MIN_DOT_ROWS),
        BLOCK_D=max(next_power_of_2(D), 16),
    )
    return out


@tuned(
    configs=[
        triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_n, warps, stages in [(16, 2, 2), (32, 4, 2), (64, 4, 3), (128, 8, 3)]
    ],
    # float32 bounds of 128 chunks at head dim 256 need 288 KB of shared memory (sm_90 allows
    # 227 KB): benchmarks/compile_reports
    float32_configs=[
        triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=2)
        for block_n, warps in [(16, 2), (32, 4), (64, 4)]
    ],
    key=["CHUNKS_BUCKET", "GROUP", "HEAD_DIM", "ELEMENT_BYTES"],
    interpret_config=triton.Config({"BLOCK_N": 64}),
)
@triton.jit
def _decode_chunk_scores_kernel(
    q_ptr,
    kmin_ptr,
    kmax_ptr,
    chunk_counts_ptr,
    out_ptr,
    num_kv_heads,
    num_chunks,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_lb,
    stride_lh,
    stride_ln,
    stride_ld,
    stride_ub,
    stride_uh,
    stride_un,
    stride_ud,
    CHUNKS_BUCKET,  # autotune keys only
    ELEMENT_BYTES,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_CHUNK_COUNTS: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``out[b, h, j]`` for ``BLOCK_N`` chunks ``j``: the group's largest
    ``<max(q, 0), kmax_j> + <min(q, 0), kmin_j>``."""
    bh = tl.program_id(0)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    chunks = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    heads = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        q_ptr
        + b.to(tl.int64) * stride_qb
        + (h * GROUP + heads)[:, None] * stride_qh
        + dims[None, :] * stride_qd,
        mask=(heads < GROUP)[:, None] & dim_ok[None, :],
        other=0.0,
    )
    valid = chunks < num_chunks
    if HAS_CHUNK_COUNTS:
        valid = valid & (chunks < tl.load(chunk_counts_ptr + b))
    tile_mask = valid[:, None] & dim_ok[None, :]
    kmin = tl.load(
        kmin_ptr
        + b.to(tl.int64) * stride_lb
        + h.to(tl.int64) * stride_lh
        + chunks[:, None].to(tl.int64) * stride_ln
        + dims[None, :] * stride_ld,
        mask=tile_mask,
        other=0.0,
    )
    kmax = tl.load(
        kmax_ptr
        + b.to(tl.int64) * stride_ub
        + h.to(tl.int64) * stride_uh
        + chunks[:, None].to(tl.int64) * stride_un
        + dims[None, :] * stride_ud,
        mask=tile_mask,
        other=0.0,
    )
    if DOT_IN_FP32:
        q, kmin, kmax = q.to(tl.float32), kmin.to(tl.float32), kmax.to(tl.float32)
    # Each dimension takes the bound its query's sign prefers. (Triton 3.6's maximum of two bf16
    # tensors is float32: cast back so that tl.dot gets operands of one dtype.)
    zero = tl.zeros_like(q)
    q_positive = tl.maximum(q, zero).to(kmax.dtype)
    q_negative = tl.minimum(q, zero).to(kmin.dtype)
    bound = tl.dot(q_positive, tl.trans(kmax), input_precision=DOT_PRECISION)
    bound += tl.dot(q_negative, tl.trans(kmin), input_precision=DOT_PRECISION)
    bound = tl.where((heads < GROUP)[:, None], bound, float("-inf"))
    score = tl.where(valid, tl.max(bound, axis=0), float("-inf"))
    tl.store(out_ptr + bh.to(tl.int64) * num_chunks + chunks, score, mask=chunks < num_chunks)

"""SPEC steps 1-2: window-attention token scores, fused (the window logits never reach memory).

The ``g`` query heads of a KV head times its ``w`` window queries are stacked as the ``g * w``
rows of one matrix, the M dimension of ``tl.dot``, so a KV head's keys serve its whole GQA
group at once. Two passes over the keys:

1. :func:`_window_stats_kernel`: online-softmax row max ``m`` and row sum ``l`` (float32, base-2
   exponent) of every query row. The keys are split across programs so that a long prompt with
   few heads still fills the GPU; :func:`merge_row_stats` merges the per-split statistics.
2. :func:`_window_scores_kernel`: one program per key block recomputes the logits of every
   query row, turns them into probabilities ``exp2(logit - m) / l``, sums them over the rows and
   writes ``s[b, h, t]`` once.

Pooling (``pool_kernel > 1``) averages neighbouring tokens across key blocks, so it runs in
torch on the ``[B, Hkv, T]`` scores.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import reference
from .._checks import (
    check_dim,
    check_gqa,
    check_nonempty,
    check_pool_kernel,
    check_same,
    check_scaling,
    check_tensor,
)
from .._runtime import (
    bucket,
    call_directly,
    dot_in_fp32,
    empty_output,
    multiprocessor_count,
    tuned,
    use_triton,
)

# Pass 1 wants a few programs per SM; each split then covers at least this many keys, because a
# split adds g * w statistics to merge.
PROGRAMS_PER_SM = 4
MIN_KEYS_PER_SPLIT = 256

CONFIGS = [
    triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
    for block_m, block_n, warps, stages in [
        (16, 64, 4, 3),
        (32, 64, 4, 3),
        (64, 32, 4, 4),
        (64, 64, 4, 3),
        (64, 128, 8, 3),
        (128, 64, 8, 3),
        (128, 128, 8, 2),
    ]
]
# float32 dots run on FMA units (IEEE, no tensor cores): every 16-bit config above spills 3-15 KB
# per thread there and takes 4-24 s to compile for sm_90 (benchmarks/compile_reports); these
# small blocks compile in ~1 s, and only the pass-2 kernel spills, < 400 B at D <= 128.
FLOAT32_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": block_n}, num_warps=8, num_stages=2)
    for block_n in (32, 64)
]
LARGEST_BLOCK_M = max(config.kwargs["BLOCK_M"] for config in CONFIGS)
# The interpreter pays per operation, not per element: large blocks keep the tests fast.
INTERPRET_CONFIG = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128})


def check_window_inputs(q_obs, k, key_mask, scaling) -> None:
    check_tensor("q_obs", q_obs, 4)
    check_tensor("k", k, 4)
    if key_mask is not None:
        check_tensor("key_mask", key_mask, 2, dtypes=(torch.bool,))
    check_same("device", q_obs=q_obs, k=k, key_mask=key_mask)
    check_same("dtype", q_obs=q_obs, k=k)
    check_nonempty("k", k, {1: "key/value heads", 3: "head dim"})
    B, Hkv, T, D = k.shape
    check_dim("q_obs", q_obs.shape[0], B, "batch size")
    check_dim("q_obs", q_obs.shape[3], D, "head dim")
    check_gqa("q_obs", q_obs.shape[1], Hkv)
    if not 1 <= q_obs.shape[2] <= T:
        raise ValueError(
            f"q_obs holds a window of {q_obs.shape[2]} queries, expected 1..{T} "
            "(the window cannot exceed the sequence length)"
        )
    if key_mask is not None and tuple(key_mask.shape) != (B, T):
        raise ValueError(f"key_mask must have shape {(B, T)}, got {tuple(key_mask.shape)}")
    check_scaling(scaling)


def window_scores(q_obs, k, *, key_mask=None, scaling=None, pool_kernel=1) -> torch.Tensor:
    """float32 ``[B, Hkv, T]`` token scores of SPEC steps 1-2.

    ``q_obs [B, Hq, w, D]`` are the last ``w`` prompt queries, ``k [B, Hkv, T, D]`` the keys,
    ``key_mask [B, T]`` (bool, False = padding) optional.
    """
    check_window_inputs(q_obs, k, key_mask, scaling)
    check_pool_kernel(pool_kernel)
    return _window_scores(q_obs, k, key_mask, scaling, pool_kernel)


def _window_scores(q_obs, k, key_mask, scaling, pool_kernel) -> torch.Tensor:
    """Unchecked dispatch: the operator ``triton_chunkkv::window_scores`` (:mod:`..library`),
    or its implementation directly in plain eager mode."""
    if call_directly(q_obs, k, key_mask):
        return window_scores_impl(q_obs, k, key_mask, scaling, pool_kernel)
    return torch.ops.triton_chunkkv.window_scores.default(q_obs, k, key_mask, scaling, pool_kernel)


def window_scores_impl(q_obs, k, key_mask, scaling, pool_kernel) -> torch.Tensor:
    """The operator's implementation: the Triton kernel or the reference."""
    if not use_triton(k):
        return reference.window_scores(
            q_obs, k, key_mask=key_mask, scaling=scaling, pool_kernel=pool_kernel
        ).contiguous()
    return reference.pool_scores(window_scores_triton(q_obs, k, key_mask, scaling), pool_kernel)


def key_splits(seq_len: int, programs: int, device: torch.device) -> int:
    """How many pass-1 programs split the keys of each row block, when ``programs`` (row blocks
    over all batch rows and KV heads) would run unsplit.

    Any value >= 1 is correct (a split left without a key block stores ``m = -inf, l = 0``).
    """
    wanted = triton.cdiv(PROGRAMS_PER_SM * multiprocessor_count(device), programs)
    return max(1, min(wanted, triton.cdiv(seq_len, MIN_KEYS_PER_SPLIT)))


def merge_row_stats(row_max, row_sum, has_key=None):
    """``(m, 1 / l)`` of each query row from per-split ``row_max``/``row_sum [BH, S, rows]``.

    A row that sees no key (``has_key [BH, rows]`` False: all its keys are padding) gets
    ``m = 0`` and ``1 / l = 0``, so that pass 2 gives it zero probabilities, as
    ``reference.window_probs`` does. That is an explicit mask, not a test on the statistics:
    every other row keeps what ``torch.softmax`` gives, NaN when a visible logit is NaN or
    +inf or when every visible logit is -inf (then ``m = -inf`` and the sum is NaN).
    """
    m = row_max.amax(dim=1)
    total = (row_sum * torch.exp2(row_max - m[:, None])).sum(dim=1)
    inv_l = total.reciprocal()
    if has_key is None:
        return m, inv_l
    return m.masked_fill(~has_key, 0.0), inv_l.masked_fill(~has_key, 0.0)


def rows_with_a_key(key_mask, num_kv_heads, group, window):
    """bool ``[B * Hkv, g * w]``: whether query row ``r`` (window query ``r % w``, at position
    ``T - w + r % w``) sees an unpadded key at or before its position; ``None`` without a
    ``key_mask`` (key 0 is then visible to every row)."""
    if key_mask is None:
        return None
    B, T = key_mask.shape
    seen = key_mask.cumsum(dim=1)[:, T - window :] > 0
    rows = seen[:, None, None, :].expand(B, num_kv_heads, group, window)
    return rows.reshape(B * num_kv_heads, group * window)


def window_scores_triton(q_obs, k, key_mask, scaling) -> torch.Tensor:
    """Steps 1-2 without pooling: the two kernels and the merge between them."""
    B, Hq, window, D = q_obs.shape
    _, Hkv, T, _ = k.shape
    group = Hq // Hkv
    num_rows = group * window
    scores = empty_output((B, Hkv, T), torch.float32, k.device)
    if B == 0:
        return scores
    scaling = D**-0.5 if scaling is None else float(scaling)
    has_key_mask = key_mask is not None
    key_mask_arg = key_mask.view(torch.uint8) if has_key_mask else k  # k: unread placeholder
    key_mask_strides = key_mask.stride() if has_key_mask else (0, 0)
    shared = dict(
        num_kv_heads=Hkv,
        seq_len=T,
        window=window,
        num_rows=num_rows,
        group=group,
        qk_scale=scaling * math.log2(math.e),
        ROWS_BUCKET=bucket(num_rows),
        ELEMENT_BYTES=k.element_size(),
        HEAD_DIM=D,
        HEAD_DIM_PAD=max(16, triton.next_power_of_2(D)),
        HAS_KEY_MASK=has_key_mask,
        # The interpreter's tl.dot returns garbage on bf16 operands.
        DOT_IN_FP32=dot_in_fp32(k.dtype),
        # float32 inputs get exact float32 products, not TF32 (which only float32 operands use).
        DOT_PRECISION="ieee" if k.dtype == torch.float32 else "tf32",
    )
    tensors_and_strides = (q_obs, k, key_mask_arg, *q_obs.stride(), *k.stride(), *key_mask_strides)

    splits = key_splits(T, B * Hkv * triton.cdiv(num_rows, LARGEST_BLOCK_M), k.device)
    row_max = empty_output((B * Hkv, splits, num_rows), torch.float32, k.device)
    row_sum = empty_output((B * Hkv, splits, num_rows), torch.float32, k.device)
    # Row blocks vary fastest: the programs reading the same keys run side by side (L2 reuse).
    _window_stats_kernel[lambda meta: (triton.cdiv(num_rows, meta["BLOCK_M"]), splits, B * Hkv)](
        *tensors_and_strides,
        row_max,
        row_sum,
        splits,
        KEYS_PER_SPLIT_BUCKET=bucket(triton.cdiv(T, splits)),
        **shared,
    )

    m, inv_l = merge_row_stats(row_max, row_sum, rows_with_a_key(key_mask, Hkv, group, window))
    _window_scores_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * Hkv)](
        *tensors_and_strides, m, inv_l, scores, T_BUCKET=bucket(T), **shared
    )
    return scores


@triton.jit
def _load_query_rows(
    q_group_ptr,
    offs_m,
    offs_d,
    num_rows,
    window,
    stride_qh,
    stride_qi,
    stride_qd,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """Rows ``offs_m`` of the stacked ``[g * w, D]`` queries: row ``r`` is window query
    ``r % w`` of the group's query head ``r // w``. Rows past ``g * w`` read zeros."""
    ptrs = (
        q_group_ptr
        + (offs_m // window)[:, None] * stride_qh
        + (offs_m % window)[:, None] * stride_qi
        + offs_d[None, :] * stride_qd
    )
    mask = (offs_m < num_rows)[:, None]
    if HEAD_DIM != HEAD_DIM_PAD:
        mask = mask & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(ptrs, mask=mask, other=0.0)
    if DOT_IN_FP32:
        q = q.to(tl.float32)
    return q


@triton.jit
def _load_key_block(
    k_ptrs,
    key_mask_ptr,
    offs_n,
    offs_d,
    seq_len,
    stride_mask_t,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """Keys ``offs_n`` (zeros past ``T``) and whether each is a real, unpadded key."""
    in_range = offs_n < seq_len
    mask = in_range[:, None]
    if HEAD_DIM != HEAD_DIM_PAD:
        mask = mask & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(k_ptrs, mask=mask, other=0.0)
    if DOT_IN_FP32:
        k = k.to(tl.float32)
    key_ok = in_range
    if HAS_KEY_MASK:
        key_ok = key_ok & (
            tl.load(key_mask_ptr + offs_n * stride_mask_t, mask=in_range, other=0) != 0
        )
    return k, key_ok


@triton.jit
def _masked_logits(q, k, key_ok, offs_n, query_pos, qk_scale, DOT_PRECISION: tl.constexpr):
    """``scaling * <q, k> * log2(e)`` (float32), ``-inf`` where SPEC step 1 hides the key:
    padding, or after the query's own position (causal inside the window)."""
    logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    visible = key_ok[None, :] & (offs_n[None, :] <= query_pos[:, None])
    return tl.where(visible, logits, float("-inf"))


@tuned(
    configs=CONFIGS,
    float32_configs=FLOAT32_CONFIGS,
    interpret_config=INTERPRET_CONFIG,
    key=["ROWS_BUCKET", "KEYS_PER_SPLIT_BUCKET", "HEAD_DIM", "ELEMENT_BYTES"],
)
@triton.jit
def _window_stats_kernel(
    q_ptr,
    k_ptr,
    key_mask_ptr,
    stride_qb,
    stride_qh,
    stride_qi,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_mask_b,
    stride_mask_t,
    row_max_ptr,
    row_sum_ptr,
    num_splits,
    num_kv_heads,
    seq_len,
    window,
    num_rows,
    group,
    qk_scale,
    ROWS_BUCKET,
    KEYS_PER_SPLIT_BUCKET,
    ELEMENT_BYTES,  # autotune keys only
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Pass 1: ``row_max``/``row_sum [B * Hkv, splits, g * w]``, the online-softmax statistics of
    one row block over the key blocks of one split."""
    row_block = tl.program_id(0)
    split = tl.program_id(1)
    bh = tl.program_id(2)
    batch = (bh // num_kv_heads).to(tl.int64)
    kv_head = (bh % num_kv_heads).to(tl.int64)

    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q = _load_query_rows(
        q_ptr + batch * stride_qb + kv_head * group * stride_qh,
        offs_m,
        offs_d,
        num_rows,
        window,
        stride_qh,
        stride_qi,
        stride_qd,
        HEAD_DIM,
        HEAD_DIM_PAD,
        DOT_IN_FP32,
    )
    query_pos = seq_len - window + offs_m % window

    blocks_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    key_start = split * blocks_per_split * BLOCK_N
    key_end = tl.minimum(key_start + blocks_per_split * BLOCK_N, seq_len)
    offs_block = tl.arange(0, BLOCK_N)
    k_ptrs = (
        k_ptr
        + batch * stride_kb
        + kv_head * stride_kh
        + key_start.to(tl.int64) * stride_kt
        + offs_block[:, None] * stride_kt
        + offs_d[None, :] * stride_kd
    )
    key_mask_row = key_mask_ptr + batch * stride_mask_b

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(key_start, key_end, BLOCK_N):
        offs_n = start_n + offs_block
        k, key_ok = _load_key_block(
            k_ptrs,
            key_mask_row,
            offs_n,
            offs_d,
            seq_len,
            stride_mask_t,
            HEAD_DIM,
            HEAD_DIM_PAD,
            HAS_KEY_MASK,
            DOT_IN_FP32,
        )
        logits = _masked_logits(q, k, key_ok, offs_n, query_pos, qk_scale, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        # A row that has seen no visible key yet keeps m = -inf; shift it by 0 instead of
        # -inf so that exp2 gives 0, not NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - shift) + tl.sum(tl.exp2(logits - shift[:, None]), axis=1)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kt

    out = (bh * num_splits + split) * num_rows + offs_m
    tl.store(row_max_ptr + out, m_i, mask=offs_m < num_rows)
    tl.store(row_sum_ptr + out, l_i, mask=offs_m < num_rows)


@tuned(
    configs=CONFIGS,
    float32_configs=FLOAT32_CONFIGS,
    interpret_config=INTERPRET_CONFIG,
    key=["ROWS_BUCKET", "T_BUCKET", "HEAD_DIM", "ELEMENT_BYTES"],
)
@triton.jit
def _window_scores_kernel(
    q_ptr,
    k_ptr,
    key_mask_ptr,
    stride_qb,
    stride_qh,
    stride_qi,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_mask_b,
    stride_mask_t,
    m_ptr,
    inv_l_ptr,
    scores_ptr,
    num_kv_heads,
    seq_len,
    window,
    num_rows,
    group,
    qk_scale,
    ROWS_BUCKET,
    T_BUCKET,
    ELEMENT_BYTES,  # autotune keys only
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Pass 2: ``scores [B, Hkv, T]`` of one key block, summed over all ``g * w`` query rows
    (``m``, ``inv_l [B * Hkv, g * w]`` from the merged pass 1)."""
    key_block = tl.program_id(0)
    bh = tl.program_id(1)
    batch = (bh // num_kv_heads).to(tl.int64)
    kv_head = (bh % num_kv_heads).to(tl.int64)

    offs_n = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    k_ptrs = (
        k_ptr
        + batch * stride_kb
        + kv_head * stride_kh
        + (key_block * BLOCK_N).to(tl.int64) * stride_kt
        + tl.arange(0, BLOCK_N)[:, None] * stride_kt
        + offs_d[None, :] * stride_kd
    )
    k, key_ok = _load_key_block(
        k_ptrs,
        key_mask_ptr + batch * stride_mask_b,
        offs_n,
        offs_d,
        seq_len,
        stride_mask_t,
        HEAD_DIM,
        HEAD_DIM_PAD,
        HAS_KEY_MASK,
        DOT_IN_FP32,
    )
    q_group_ptr = q_ptr + batch * stride_qb + kv_head * group * stride_qh
    stats_row = bh.to(tl.int64) * num_rows

    total = tl.zeros([BLOCK_N], tl.float32)
    for row_start in range(0, num_rows, BLOCK_M):
        offs_m = row_start + tl.arange(0, BLOCK_M)
        q = _load_query_rows(
            q_group_ptr,
            offs_m,
            offs_d,
            num_rows,
            window,
            stride_qh,
            stride_qi,
            stride_qd,
            HEAD_DIM,
            HEAD_DIM_PAD,
            DOT_IN_FP32,
        )
        row_ok = offs_m < num_rows
        # Rows past g * w see no key (position -1) and get inv_l = 0: they add exact zeros,
        # even where an inf key meets their zero query (0 * inf is NaN).
        m = tl.load(m_ptr + stats_row + offs_m, mask=row_ok, other=0.0)
        inv_l = tl.load(inv_l_ptr + stats_row + offs_m, mask=row_ok, other=0.0)
        query_pos = tl.where(row_ok, seq_len - window + offs_m % window, -1)
        logits = _masked_logits(q, k, key_ok, offs_n, query_pos, qk_scale, DOT_PRECISION)
        total += tl.sum(tl.exp2(logits - m[:, None]) * inv_l[:, None], axis=0)

    tl.store(scores_ptr + bh.to(tl.int64) * seq_len + offs_n, total / group, mask=offs_n < seq_len)

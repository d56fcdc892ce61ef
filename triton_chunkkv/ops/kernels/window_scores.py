"""SPEC steps 1-2 (and, fused, step 4): window-attention token scores (the window logits never
reach memory) and their chunk sums.

The ``g`` query heads of a KV head times its ``w`` window queries are stacked as the ``g * w``
rows of one matrix, the M dimension of ``tl.dot``, so a KV head's keys serve its whole GQA
group at once. Two passes over the keys, two launches and no torch op in between:

1. :func:`_window_stats_kernel`: online-softmax row max ``m`` and row sum ``l`` (float32, base-2
   exponent) of every query row over one split of the keys (splits let a long prompt with few
   heads fill the GPU), and with a key mask the split's first unpadded key.
2. :func:`_window_scores_kernel`, one program per split of pass 1: merges the statistics of
   every split, recomputes the logits of its keys, turns them into probabilities
   ``exp2(logit - m) / l``, sums them over the rows and writes ``s[b, h, t]`` once; with a chunk
   size (:func:`window_chunk_scores`, what ChunkKV runs) it then sums its own chunks (split
   boundaries are multiples of ``c``). It runs mirrored to pass 1, each program walking its keys
   backwards, so that it reads first the keys pass 1 read last, the ones still in L2.

Pooling (``pool_kernel > 1``) averages neighbouring tokens across key blocks, so it runs in
torch on the ``[B, Hkv, T]`` scores (and the chunk sums then in their own kernel).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import reference
from .._checks import (
    check_chunking,
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
    cdiv,
    dot_in_fp32,
    empty_output,
    multiprocessor_count,
    next_power_of_2,
    tuned,
    use_triton,
)

# Pass 1 wants a few programs per SM; each split then covers at least this many keys, because a
# split adds g * w statistics to merge.
PROGRAMS_PER_SM = 4
MIN_KEYS_PER_SPLIT = 256
# Every pass-2 program merges all splits' statistics of all query rows (``splits * g * w * 8``
# bytes, from L2): at most this fraction of the key bytes it reads, which caps the splits at
# sqrt(T * D * e / (64 * g * w)) (32 at T 32K, D 128, bf16, g * w = 128).
MERGE_BYTES_PER_KEY_BYTE = 1 / 8
MAX_MERGE_BLOCK = 16  # splits merged per step
CHUNK_BLOCK = 64  # chunk sums per step

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
# Pass 2 (the merge, the scores, the chunk sums): without BLOCK 128 x 128 on 8 warps, 2 stages,
# which spills 8 B at D 96 / 128 with a key mask with triton 3.9 (255 registers; 254 before
# the merge moved into the kernel: benchmarks/compile_reports).
SCORES_CONFIGS = [
    config
    for config in CONFIGS
    if (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)
    != (128, 128, 8, 2)
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


def window_chunk_scores(q_obs, k, chunk_size, *, key_mask=None, scaling=None) -> torch.Tensor:
    """float32 ``[B, Hkv, n]`` chunk scores of SPEC steps 1-4 (no pooling):
    ``chunk_sum(window_scores(q_obs, k), chunk_size, w)`` with ``w = q_obs.shape[2]``, in two
    kernel launches (the token scores never leave the kernels' scratch)."""
    check_window_inputs(q_obs, k, key_mask, scaling)
    check_chunking(chunk_size, q_obs.shape[2], k.shape[2])
    return _window_chunk_scores(q_obs, k, key_mask, scaling, chunk_size)


def _window_chunk_scores(q_obs, k, key_mask, scaling, chunk_size) -> torch.Tensor:
    """Unchecked dispatch: the operator ``triton_chunkkv::window_chunk_scores``
    (:mod:`..library`), or its implementation directly in plain eager mode."""
    if call_directly(q_obs, k, key_mask):
        return window_chunk_scores_impl(q_obs, k, key_mask, scaling, chunk_size)
    return torch.ops.triton_chunkkv.window_chunk_scores.default(
        q_obs, k, key_mask, scaling, chunk_size
    )


def window_chunk_scores_impl(q_obs, k, key_mask, scaling, chunk_size) -> torch.Tensor:
    """The operator's implementation: the fused kernels, or the reference's two steps."""
    if not use_triton(k):
        scores = reference.window_scores(q_obs, k, key_mask=key_mask, scaling=scaling)
        return reference.chunk_sum(scores, chunk_size, q_obs.shape[2]).contiguous()
    return window_chunk_scores_triton(q_obs, k, key_mask, scaling, chunk_size)


def key_splits(
    seq_len: int,
    programs: int,
    device: torch.device,
    num_rows: int | None = None,
    key_row_bytes: int | None = None,
) -> int:
    """How many programs split the keys of each ``(b, h)`` (pass 1, and pass 2 over the same
    ranges), when ``programs`` (row blocks over all batch rows and KV heads) would run unsplit.

    About :data:`PROGRAMS_PER_SM` programs per SM, no split under :data:`MIN_KEYS_PER_SPLIT`
    keys, and, given ``num_rows`` (``g * w``) and ``key_row_bytes`` (``D * e``), few enough
    that the statistics every pass-2 program merges (``splits * num_rows * 8`` bytes) stay
    within :data:`MERGE_BYTES_PER_KEY_BYTE` of the key bytes it reads
    (``seq_len / splits * key_row_bytes``). Any value >= 1 is correct: a split left without a
    key stores ``m = -inf, l = 0`` and its pass-2 program writes nothing.
    """
    wanted = cdiv(PROGRAMS_PER_SM * multiprocessor_count(device), programs)
    splits = min(wanted, cdiv(seq_len, MIN_KEYS_PER_SPLIT))
    if num_rows and key_row_bytes:
        affordable = seq_len * key_row_bytes * MERGE_BYTES_PER_KEY_BYTE / (8 * num_rows)
        splits = min(splits, math.isqrt(int(affordable)))
    return max(1, splits)


def split_length(seq_len: int, splits: int, align: int) -> int:
    """Keys per split: ``ceil(T / splits)`` rounded up to a multiple of ``align`` (so that a
    split boundary never cuts a chunk when the chunk sums are fused), at least ``align``."""
    return max(align, cdiv(cdiv(seq_len, splits), align) * align)


def window_scores_triton(q_obs, k, key_mask, scaling) -> torch.Tensor:
    """Steps 1-2 without pooling: the two kernels (the merge of the statistics runs in pass 2)."""
    scores, _ = _window_kernels(q_obs, k, key_mask, scaling, chunk_size=None)
    return scores


def window_chunk_scores_triton(q_obs, k, key_mask, scaling, chunk_size) -> torch.Tensor:
    """Steps 1-4 without pooling: the chunk sums come out of pass 2 (two launches in all)."""
    _, chunk_scores = _window_kernels(q_obs, k, key_mask, scaling, chunk_size=chunk_size)
    return chunk_scores


def _window_kernels(q_obs, k, key_mask, scaling, chunk_size):
    """``(scores [B, Hkv, T], chunk_scores [B, Hkv, n] or None)``: pass 1 (per-split softmax
    statistics), then pass 2 (merge, token scores and, with ``chunk_size``, the chunk sums of
    SPEC step 4), with no torch op in between."""
    B, Hq, window, D = q_obs.shape
    _, Hkv, T, _ = k.shape
    group = Hq // Hkv
    num_rows = group * window
    fused = chunk_size is not None
    num_chunks = reference.tail_start(T, chunk_size, window) // chunk_size if fused else 0
    scores = empty_output((B, Hkv, T), torch.float32, k.device)
    chunk_scores = empty_output((B, Hkv, num_chunks), torch.float32, k.device) if fused else None
    if B == 0:
        return scores, chunk_scores
    scaling = D**-0.5 if scaling is None else float(scaling)
    has_key_mask = key_mask is not None
    key_mask_arg = key_mask.view(torch.uint8) if has_key_mask else k  # k: unread placeholder
    key_mask_strides = key_mask.stride() if has_key_mask else (0, 0)

    programs = B * Hkv * cdiv(num_rows, LARGEST_BLOCK_M)
    splits = key_splits(T, programs, k.device, num_rows, D * k.element_size())
    # A split boundary never cuts a chunk of the fused chunk sums: multiples of lcm(c, 16).
    align = chunk_size * 16 // math.gcd(chunk_size, 16) if fused else 16
    split_len = split_length(T, splits, align)
    shared = dict(
        num_splits=splits,
        split_len=split_len,
        num_kv_heads=Hkv,
        seq_len=T,
        window=window,
        num_rows=num_rows,
        group=group,
        qk_scale=scaling * math.log2(math.e),
        ROWS_BUCKET=bucket(num_rows),
        KEYS_PER_SPLIT_BUCKET=bucket(split_len),
        ELEMENT_BYTES=k.element_size(),
        HEAD_DIM=D,
        HEAD_DIM_PAD=max(16, next_power_of_2(D)),
        HAS_KEY_MASK=has_key_mask,
        # The interpreter's tl.dot returns garbage on bf16 operands.
        DOT_IN_FP32=dot_in_fp32(k.dtype),
        # float32 inputs get exact float32 products, not TF32 (which only float32 operands use).
        DOT_PRECISION="ieee" if k.dtype == torch.float32 else "tf32",
    )
    tensors_and_strides = (q_obs, k, key_mask_arg, *q_obs.stride(), *k.stride(), *key_mask_strides)

    # Per split: the row statistics, and (with a key mask) the first unpadded key position.
    row_max = empty_output((B * Hkv, splits, num_rows), torch.float32, k.device)
    row_sum = empty_output((B * Hkv, splits, num_rows), torch.float32, k.device)
    first_key = empty_output((B * Hkv, splits), torch.int32, k.device) if has_key_mask else row_max
    # Row blocks vary fastest: the programs reading the same keys run side by side (L2 reuse).
    _window_stats_kernel[lambda meta: (cdiv(num_rows, meta["BLOCK_M"]), splits, B * Hkv)](
        *tensors_and_strides, row_max, row_sum, first_key, **shared
    )
    # Each pass-2 program's merged (m, 1 / l) of every row: scratch, read back by the program.
    merged = torch.empty((B * Hkv * splits, 2, num_rows), dtype=torch.float32, device=k.device)
    _window_scores_kernel[(splits, B * Hkv)](
        *tensors_and_strides,
        row_max,
        row_sum,
        first_key,
        merged,
        scores,
        chunk_scores if fused else scores,  # scores: unwritten placeholder
        num_chunks,
        chunk_size if fused else 1,
        CHUNK_SUMS=fused,
        BLOCK_S=min(next_power_of_2(splits), MAX_MERGE_BLOCK),
        BLOCK_C=CHUNK_BLOCK,
        **shared,
    )
    return scores, chunk_scores


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
    key_end,
    stride_mask_t,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """Keys ``offs_n`` (zeros from ``key_end`` on: past ``T`` or the program's split) and
    whether each is a real, unpadded key."""
    in_range = offs_n < key_end
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
    first_key_ptr,
    num_splits,
    split_len,
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
    one row block over the keys ``[split * split_len, (split + 1) * split_len)``; with a key
    mask also ``first_key [B * Hkv, splits]``, the split's first unpadded key (``T`` if none),
    from which pass 2 tells the rows that see no key at all."""
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

    key_start = split * split_len
    key_end = tl.minimum(key_start + split_len, seq_len)
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
    first = seq_len
    for start_n in range(key_start, key_end, BLOCK_N):
        offs_n = start_n + offs_block
        k, key_ok = _load_key_block(
            k_ptrs,
            key_mask_row,
            offs_n,
            offs_d,
            key_end,
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
        if HAS_KEY_MASK:
            first = tl.minimum(first, tl.min(tl.where(key_ok, offs_n, seq_len), axis=0))
        k_ptrs += BLOCK_N * stride_kt

    out = (bh * num_splits + split) * num_rows + offs_m
    tl.store(row_max_ptr + out, m_i, mask=offs_m < num_rows)
    tl.store(row_sum_ptr + out, l_i, mask=offs_m < num_rows)
    if HAS_KEY_MASK:
        if row_block == 0:
            tl.store(first_key_ptr + bh * num_splits + split, first)


@tuned(
    configs=SCORES_CONFIGS,
    float32_configs=FLOAT32_CONFIGS,
    interpret_config=INTERPRET_CONFIG,
    key=["ROWS_BUCKET", "KEYS_PER_SPLIT_BUCKET", "HEAD_DIM", "ELEMENT_BYTES"],
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
    row_max_ptr,
    row_sum_ptr,
    first_key_ptr,
    merged_ptr,
    scores_ptr,
    chunk_scores_ptr,
    num_chunks,
    chunk_size,
    num_splits,
    split_len,
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
    CHUNK_SUMS: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Pass 2 over the keys of pass 1's split ``split`` of ``(b, h)``:

    1. merge every split's statistics into ``(m, 1 / l)`` of each query row (a row that sees
       no key gets ``(0, 0)``: zero probabilities) and keep them in this program's rows of
       ``merged``;
    2. ``scores [B, Hkv, T]`` of the split's key blocks, summed over all ``g * w`` query rows;
    3. with ``CHUNK_SUMS``, ``chunk_scores [B, Hkv, n]`` of the chunks starting in the split
       (split boundaries are multiples of ``c``), each the sum of its ``c`` token scores in
       position order, as ``reference.sum_in_order`` adds them.

    The grid runs mirrored to pass 1 (the last ``(b, h)`` and split first) and each program
    walks its key blocks backwards, so that the keys pass 1 read last, the ones most likely
    still in L2, are read first (``docs/PERF_NOTES.md``, "L2 schedule")."""
    split = num_splits - 1 - tl.program_id(0)
    bh = tl.num_programs(1) - 1 - tl.program_id(1)
    batch = (bh // num_kv_heads).to(tl.int64)
    kv_head = (bh % num_kv_heads).to(tl.int64)
    stats_base = bh.to(tl.int64) * num_splits * num_rows
    merged_row = merged_ptr + (bh.to(tl.int64) * num_splits + split) * 2 * num_rows

    # 1. The merge: m = max over splits, l = sum of l_s * exp2(m_s - m), online over tiles of
    # BLOCK_S splits (shifted by 0 while m is -inf, as in pass 1).
    splits_tile = tl.arange(0, BLOCK_S)
    first = seq_len
    if HAS_KEY_MASK:
        for s_start in range(0, num_splits, BLOCK_S):
            s = s_start + splits_tile
            found = tl.load(first_key_ptr + bh * num_splits + s, mask=s < num_splits, other=seq_len)
            first = tl.minimum(first, tl.min(found, axis=0))
    for row_start in range(0, num_rows, BLOCK_M):
        offs_m = row_start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < num_rows
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        for s_start in range(0, num_splits, BLOCK_S):
            s = s_start + splits_tile
            tile = stats_base + s[:, None] * num_rows + offs_m[None, :]
            tile_ok = (s < num_splits)[:, None] & row_ok[None, :]
            split_max = tl.load(row_max_ptr + tile, mask=tile_ok, other=float("-inf"))
            split_sum = tl.load(row_sum_ptr + tile, mask=tile_ok, other=0.0)
            m_new = tl.maximum(m, tl.max(split_max, axis=0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            total = total * tl.exp2(m - shift) + tl.sum(
                split_sum * tl.exp2(split_max - shift[None, :]), axis=0
            )
            m = m_new
        # An explicit mask: only the rows that see no key at all (and the rows past g * w).
        has_key = row_ok
        if HAS_KEY_MASK:
            has_key = has_key & (first <= seq_len - window + offs_m % window)
        m = tl.where(has_key, m, 0.0)
        inv_l = tl.where(has_key, 1.0 / tl.where(has_key, total, 1.0), 0.0)
        tl.store(merged_row + offs_m, m, mask=row_ok)
        tl.store(merged_row + num_rows + offs_m, inv_l, mask=row_ok)
    tl.debug_barrier()  # the merged statistics are read back by every thread of the program

    # 2. Token scores, key blocks last to first.
    key_start = split * split_len
    key_end = tl.minimum(key_start + split_len, seq_len)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_group_ptr = q_ptr + batch * stride_qb + kv_head * group * stride_qh
    num_blocks = tl.cdiv(tl.maximum(key_end - key_start, 0), BLOCK_N)
    scores_row = scores_ptr + bh.to(tl.int64) * seq_len
    for step in range(0, num_blocks):
        block_start = key_start + (num_blocks - 1 - step) * BLOCK_N
        offs_n = block_start + tl.arange(0, BLOCK_N)
        k_ptrs = (
            k_ptr
            + batch * stride_kb
            + kv_head * stride_kh
            + block_start.to(tl.int64) * stride_kt
            + tl.arange(0, BLOCK_N)[:, None] * stride_kt
            + offs_d[None, :] * stride_kd
        )
        k, key_ok = _load_key_block(
            k_ptrs,
            key_mask_ptr + batch * stride_mask_b,
            offs_n,
            offs_d,
            key_end,
            stride_mask_t,
            HEAD_DIM,
            HEAD_DIM_PAD,
            HAS_KEY_MASK,
            DOT_IN_FP32,
        )
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
            m = tl.load(merged_row + offs_m, mask=row_ok, other=0.0)
            inv_l = tl.load(merged_row + num_rows + offs_m, mask=row_ok, other=0.0)
            query_pos = tl.where(row_ok, seq_len - window + offs_m % window, -1)
            logits = _masked_logits(q, k, key_ok, offs_n, query_pos, qk_scale, DOT_PRECISION)
            total += tl.sum(tl.exp2(logits - m[:, None]) * inv_l[:, None], axis=0)
        tl.store(scores_row + offs_n, total / group, mask=offs_n < key_end)

    # 3. Chunk sums of the chunks that start in this split, from the scores just written.
    if CHUNK_SUMS:
        tl.debug_barrier()  # the scores are read back by other threads of the program
        chunk_end = tl.minimum(key_end // chunk_size, num_chunks)
        chunk_row = chunk_scores_ptr + bh.to(tl.int64) * num_chunks
        for chunk_start in range(key_start // chunk_size, chunk_end, BLOCK_C):
            chunks = chunk_start + tl.arange(0, BLOCK_C)
            chunk_ok = chunks < chunk_end
            first_token = scores_row + chunks.to(tl.int64) * chunk_size
            chunk_total = tl.load(first_token, mask=chunk_ok, other=0.0)
            for offset in range(1, chunk_size):
                chunk_total += tl.load(first_token + offset, mask=chunk_ok, other=0.0)
            tl.store(chunk_row + chunks, chunk_total, mask=chunk_ok)

"""Block-sparse decode attention over the retained chunks of an uncompacted cache.

The newest token (or the ``n`` newest, causal among themselves) of each sequence attends to
SPEC's ``R(b, h)`` (the kept chunks plus the dense range ``[tail_start_b, seq_len_b)``) read
in place, flash-decoding style:

1. ``_sparse_decode_split_kernel``, grid ``(B * Hkv, num_splits)``: each ``(b, h)`` walks its
   retained set as one logical list of ``n_valid * c + seq_len_b - tail_start_b`` tokens
   (logical ``j < n_valid * c`` is token ``j % c`` of chunk ``chunk_idx[j // c]``, the rest is
   the tail), cut into ``num_splits`` equal ranges. A program takes the ``g * n`` query rows of
   its KV head (``g`` heads, ``n`` queries) together as the M side of ``tl.dot`` (each K/V row
   is read once per KV head) and writes an unnormalized partial output with its running max
   and sum. Query ``i`` sits at position ``seq_len_b - n + i`` and sees the dense range up to
   it.
2. ``_merge_splits_kernel``, grid ``(B * Hq * n,)``: combines the partials by log-sum-exp.

The split ranges are computed in the kernel from each row's own length, so the grid depends on
shapes only: no host sync, and a ``validate=False`` call can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .._checks import (
    check_bool,
    check_dim,
    check_gqa,
    check_int,
    check_key_value,
    check_nonempty,
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
    launch_lock,
    multiprocessor_count,
    next_power_of_2,
    tuned,
    use_triton,
)
from ..occupancy import sparse_decode_ctas_per_sm

# Below this many tokens (two BLOCK_N 32 steps) a split's fixed cost (loading Q, writing and
# merging a partial: 2 KB at g 4, D 128, against 32 KB of bf16 K/V) outweighs the
# parallelism it adds.
MIN_TOKENS_PER_SPLIT = 64
MAX_SPLITS = 64
# tl.dot needs M >= 16: the g query heads of a KV head are padded up to it.
MIN_DOT_ROWS = 16

INDEX_DTYPES = (torch.int32,)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@tuned(
    configs=[
        triton.Config({"BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)
        for block_n in (32, 64, 128)
        for num_warps in (4, 8)
        for num_stages in (2, 3)
        # BLOCK_N 128 with 3 stages: triton 3.9's ptxas spills 8 B of it at head dim 80 (8 warps),
        # and at head dim 256 it needs 268 KB of shared memory with triton 3.6 (4 warps; sm_90
        # allows 227 KB): benchmarks/compile_reports
        if (block_n, num_stages) != (128, 3)
    ],
    # float32 (IEEE dots on FMA units): BLOCK_N 128 needs 287 KB of shared memory at D 256
    # (sm_90 allows 227 KB) and spills at D 128; these two do not spill at D <= 128.
    float32_configs=[
        triton.Config({"BLOCK_N": block_n}, num_warps=8, num_stages=2) for block_n in (32, 64)
    ],
    key=["BLOCK_G", "BLOCK_D", "TOKENS_PER_SPLIT_BUCKET", "ELEMENT_BYTES"],
    interpret_config=triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1),
)
@triton.jit
def _sparse_decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    chunk_idx_ptr,
    tail_start_ptr,
    seq_lens_ptr,
    slot_map_ptr,
    row_offset_ptr,
    chunk_counts_ptr,
    partial_out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    tail_start_value,
    n_keep,
    num_kv_heads,
    num_queries,
    num_splits,
    qk_scale_log2,
    stride_qb,
    stride_qh,
    stride_qi,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kr,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vr,
    stride_vd,
    stride_cb,
    stride_ch,
    stride_ck,
    stride_sb,
    stride_sp,
    TOKENS_PER_SPLIT_BUCKET,
    ELEMENT_BYTES,  # autotune keys only
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
    TAIL_PER_ROW: tl.constexpr,
    HAS_SLOT_MAP: tl.constexpr,
    HAS_ROW_OFFSET: tl.constexpr,
    HAS_CHUNK_COUNTS: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_kv_heads
    h = bh % num_kv_heads

    seq_len = tl.load(seq_lens_ptr + b)
    if TAIL_PER_ROW:
        tail_start = tl.load(tail_start_ptr + b)
    else:
        tail_start = tail_start_value
    if HAS_CHUNK_COUNTS:
        n_valid = tl.load(chunk_counts_ptr + b)
    else:
        n_valid = n_keep
    chunk_tokens = n_valid * CHUNK_SIZE
    total = chunk_tokens + seq_len - tail_start
    # Whole blocks per split, so that only a split's last block is partial.
    split_len = tl.cdiv(tl.cdiv(total, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, total)

    # Query rows: row r is query r % n of the group's query head r // n.
    rows_g = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    head_ok = rows_g < GROUP * num_queries
    dim_ok = dims < HEAD_DIM
    q_heads = h * GROUP + rows_g // num_queries
    query = rows_g % num_queries
    last_visible = seq_len - num_queries + query  # each query's own position
    q = tl.load(
        q_ptr
        + b.to(tl.int64) * stride_qb
        + q_heads[:, None] * stride_qh
        + query[:, None] * stride_qi
        + dims[None, :] * stride_qd,
        mask=head_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    q = q.to(k_ptr.dtype.element_ty)
    if DOT_IN_FP32:
        q = q.to(tl.float32)

    if HAS_SLOT_MAP:  # every sequence shares the slot pool: only the head picks the base
        k_base = k_ptr + h.to(tl.int64) * stride_kh
        v_base = v_ptr + h.to(tl.int64) * stride_vh
    else:
        k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        if HAS_ROW_OFFSET:
            row_shift = tl.load(row_offset_ptr + b)
        else:
            row_shift = 0
    chunk_idx_base = chunk_idx_ptr + b.to(tl.int64) * stride_cb + h * stride_ch

    row_max = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for block_start in range(start, end, BLOCK_N):
        j = block_start + tl.arange(0, BLOCK_N)
        live = j < end
        in_chunks = j < chunk_tokens
        list_slot = j // CHUNK_SIZE
        chunk = tl.load(chunk_idx_base + list_slot * stride_ck, mask=live & in_chunks, other=0)
        pos = tl.where(
            in_chunks,
            chunk * CHUNK_SIZE + (j - list_slot * CHUNK_SIZE),
            tail_start + (j - chunk_tokens),
        )
        if HAS_SLOT_MAP:
            rows = tl.load(
                slot_map_ptr + b.to(tl.int64) * stride_sb + pos * stride_sp, mask=live, other=0
            ).to(tl.int64)
        else:
            rows = (pos + row_shift).to(tl.int64)
        kv_mask = live[:, None] & dim_ok[None, :]
        k = tl.load(
            k_base + rows[:, None] * stride_kr + dims[None, :] * stride_kd, mask=kv_mask, other=0.0
        )
        v = tl.load(
            v_base + rows[:, None] * stride_vr + dims[None, :] * stride_vd, mask=kv_mask, other=0.0
        )
        if DOT_IN_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale_log2
        # Chunks lie before every query; the dense range is causal among the new queries.
        visible = live[None, :] & (in_chunks[None, :] | (pos[None, :] <= last_visible[:, None]))
        logits = tl.where(visible, logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        # A row that has seen no visible key yet keeps max = -inf: shift it by 0, not -inf, so
        # that exp2 gives 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp2(row_max - shift)
        probs = tl.exp2(logits - shift[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision="ieee")
        row_max = new_max

    # An empty split stores (max=-inf, sum=0, out=0), which the merge weighs by zero.
    partial_rows = ((b * num_kv_heads * GROUP + q_heads) * num_queries + query).to(
        tl.int64
    ) * num_splits + split
    tl.store(
        partial_out_ptr + partial_rows[:, None] * HEAD_DIM + dims[None, :],
        acc,
        mask=head_ok[:, None] & dim_ok[None, :],
    )
    tl.store(partial_max_ptr + partial_rows, row_max, mask=head_ok)
    tl.store(partial_sum_ptr + partial_rows, row_sum, mask=head_ok)


@triton.jit
def _merge_splits_kernel(
    partial_out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    out_ptr,
    num_q_heads,
    num_queries,
    num_splits,
    stride_ob,
    stride_oh,
    stride_oi,
    stride_od,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # (b, hq, query) row-major
    b = row // (num_q_heads * num_queries)
    hq = (row // num_queries) % num_q_heads
    query = row % num_queries
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    split_ok = splits < num_splits
    dim_ok = dims < HEAD_DIM
    partial_rows = row.to(tl.int64) * num_splits + splits
    split_max = tl.load(partial_max_ptr + partial_rows, mask=split_ok, other=float("-inf"))
    split_sum = tl.load(partial_sum_ptr + partial_rows, mask=split_ok, other=0.0)
    split_out = tl.load(
        partial_out_ptr + partial_rows[:, None] * HEAD_DIM + dims[None, :],
        mask=split_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    overall_max = tl.max(split_max, 0)
    # All splits empty (R(b, h) is empty): use 0 as the reference so no weight is NaN.
    overall_max = tl.where(overall_max == float("-inf"), 0.0, overall_max)
    weight = tl.exp2(split_max - overall_max)
    total = tl.sum(weight * split_sum, 0)
    out = tl.sum(weight[:, None] * split_out, 0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr
        + b.to(tl.int64) * stride_ob
        + hq * stride_oh
        + query * stride_oi
        + dims * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=dim_ok,
    )


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def check_sparse_decode_inputs(
    q,
    k_cache,
    v_cache,
    chunk_idx,
    chunk_size,
    tail_start,
    seq_lens,
    scaling,
    num_splits,
    slot_map,
    row_offset,
    chunk_counts,
    data=True,
) -> None:
    """Ranks, shapes, dtypes and devices (no sync), then, with ``data``, the data checks (these
    sync)."""
    if isinstance(q, torch.Tensor) and q.dim() == 4:
        check_tensor("q", q, 4)
        check_nonempty("q", q, {2: "query length (dim 2 of [B, Hq, n, D])"})
    else:
        check_tensor("q", q, 3)
    check_nonempty("q", q, {q.dim() - 1: "head dim"})
    cache_rank = 4 if slot_map is None else 3
    check_key_value("k_cache", k_cache, "v_cache", v_cache, cache_rank)
    if slot_map is not None:
        check_nonempty("k_cache", k_cache, {0: "slots"})
    check_same("dtype", q=q, k_cache=k_cache, v_cache=v_cache)
    check_tensor("chunk_idx", chunk_idx, 3, dtypes=INDEX_DTYPES)
    check_tensor("seq_lens", seq_lens, 1, dtypes=INDEX_DTYPES)
    tail_is_tensor = isinstance(tail_start, torch.Tensor)
    if tail_is_tensor:
        check_tensor("tail_start", tail_start, 1, dtypes=INDEX_DTYPES)
    else:
        check_int("tail_start", tail_start, minimum=0)
    check_int("chunk_size", chunk_size, minimum=1)
    check_scaling(scaling)
    if num_splits is not None:
        check_int("num_splits", num_splits, minimum=1)
    if slot_map is not None:
        check_tensor("slot_map", slot_map, 2, dtypes=INDEX_DTYPES)
        if row_offset is not None:
            raise ValueError(
                "row_offset applies to the dense [B, Hkv, S_max, D] layout only; "
                "with slot_map, put the offset into the slot map"
            )
    if row_offset is not None:
        check_tensor("row_offset", row_offset, 1, dtypes=INDEX_DTYPES)
    if chunk_counts is not None:
        check_tensor("chunk_counts", chunk_counts, 1, dtypes=INDEX_DTYPES)
    check_same(
        "device",
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        chunk_idx=chunk_idx,
        seq_lens=seq_lens,
        tail_start=tail_start if tail_is_tensor else None,
        slot_map=slot_map,
        row_offset=row_offset,
        chunk_counts=chunk_counts,
    )

    B, Hq, D = q.shape[0], q.shape[1], q.shape[-1]
    if slot_map is None:
        check_dim("k_cache", k_cache.shape[0], B, "batch size")
        Hkv, S_max = k_cache.shape[1], k_cache.shape[2]
    else:
        check_dim("slot_map", slot_map.shape[0], B, "batch size")
        Hkv, S_max = k_cache.shape[1], slot_map.shape[1]
    check_dim("k_cache", k_cache.shape[-1], D, "head dim")
    check_gqa("q", Hq, Hkv)
    if tuple(chunk_idx.shape[:2]) != (B, Hkv):
        raise ValueError(
            f"chunk_idx must have shape [{B}, {Hkv}, n_keep], got {tuple(chunk_idx.shape)}"
        )
    for name, t in (
        ("seq_lens", seq_lens),
        ("tail_start", tail_start if tail_is_tensor else None),
        ("row_offset", row_offset),
        ("chunk_counts", chunk_counts),
    ):
        if t is not None:
            check_dim(name, t.shape[0], B, "length")
    if not data:
        return

    check_retained_sets(
        k_cache,
        chunk_idx,
        chunk_size,
        tail_start,
        seq_lens,
        S_max,
        slot_map,
        row_offset,
        chunk_counts,
        num_queries=q.shape[2] if q.dim() == 4 else 1,
    )


def first_bad(name: str, bad: torch.Tensor, values: torch.Tensor, requirement: str) -> None:
    """Raise naming the first index where ``bad`` holds (one host sync)."""
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}{list(where)} = {int(values[where])} violates {requirement}")


def check_retained_sets(
    k_cache,
    chunk_idx,
    chunk_size,
    tail_start,
    seq_lens,
    S_max,
    slot_map,
    row_offset,
    chunk_counts,
    num_queries=1,
) -> None:
    """The data checks: they read the index tensors on the host. With ``num_queries`` new
    tokens, the dense range starts at or before the first of them (chunks lie before every
    query)."""
    B, _, n_keep = chunk_idx.shape
    device = chunk_idx.device
    tails = torch.as_tensor(tail_start, device=device).expand(B).long()
    lens = seq_lens.long()
    if row_offset is not None:
        first_bad(
            "row_offset",
            (row_offset < 0) | (row_offset > S_max),
            row_offset,
            f"0 <= row_offset <= S_max = {S_max}",
        )
        capacity = S_max - row_offset.long()
    else:
        capacity = torch.full((B,), S_max, device=device)
    first_bad("tail_start", tails < 0, tails, "tail_start >= 0")
    if num_queries == 1:
        first_bad("tail_start", tails > lens, tails, "tail_start <= seq_lens")
    else:
        first_bad(
            "tail_start",
            tails > lens - num_queries + 1,
            tails,
            f"tail_start <= seq_lens - n + 1 (n = {num_queries} queries)",
        )
    first_bad(
        "seq_lens",
        lens > capacity,
        lens,
        "seq_lens <= the cache capacity (S_max, minus row_offset in the dense layout)",
    )
    if chunk_counts is not None:
        first_bad(
            "chunk_counts",
            (chunk_counts < 0) | (chunk_counts > n_keep),
            chunk_counts,
            f"0 <= chunk_counts <= n_keep = {n_keep}",
        )
        used = torch.arange(n_keep, device=device) < chunk_counts.long()[:, None, None]
        used = used.expand(chunk_idx.shape)
    else:
        used = torch.ones_like(chunk_idx, dtype=torch.bool)
    idx = chunk_idx.long()
    num_chunks = (tails // chunk_size)[:, None, None]
    first_bad(
        "chunk_idx",
        used & ((idx < 0) | (idx >= num_chunks)),
        idx,
        "0 <= chunk_idx < tail_start // chunk_size (chunks lie before the dense tail)",
    )
    not_ascending = torch.zeros_like(used)
    not_ascending[..., 1:] = used[..., 1:] & (idx[..., 1:] <= idx[..., :-1])
    first_bad(
        "chunk_idx", not_ascending, idx, "chunk_idx sorted strictly ascending along the last dim"
    )
    if slot_map is not None:
        retained = reference.retained_mask(
            chunk_idx, chunk_size, tail_start, seq_lens, S_max, chunk_counts=chunk_counts
        ).any(dim=1)
        num_slots = k_cache.shape[0]
        first_bad(
            "slot_map",
            retained & ((slot_map < 0) | (slot_map >= num_slots)),
            slot_map,
            f"0 <= slot_map < num_slots = {num_slots} at retained positions",
        )


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------


def sparse_decode(
    q,
    k_cache,
    v_cache,
    chunk_idx,
    chunk_size,
    tail_start,
    seq_lens,
    *,
    scaling=None,
    num_splits=None,
    slot_map=None,
    row_offset=None,
    chunk_counts=None,
    validate=True,
) -> torch.Tensor:
    """Decode attention over SPEC's retained set ``R(b, h)``, read in place: ``[B, Hq, D]``
    (``[B, Hq, n, D]`` for ``n`` queries).

    Query head ``hq`` of row ``b`` attends, with exact softmax, to the positions of KV head
    ``h = hq // g`` that are in a kept chunk ``[j*c, (j+1)*c)`` for ``j`` in
    ``chunk_idx[b, h]``, or in the dense range ``[tail_start_b, seq_lens[b])`` (the prompt's
    tail and every generated token). No other cache entry is read. A ``(b, h)`` whose set is
    empty (no chunks and ``tail_start_b == seq_lens[b]``) gets zeros. With ``n`` queries (the
    ``n`` newest tokens, e.g. a question after a compressed context), query ``i`` sits at
    position ``seq_lens[b] - n + i`` and sees the dense range up to itself only.

    Args:
        q: ``[B, Hq, D]`` (the token being decoded) or ``[B, Hq, n, D]`` (the ``n`` newest),
            float16 / bfloat16 / float32. ``Hq = g * Hkv``.
        k_cache, v_cache: the uncompacted cache, ``q``'s dtype. Dense layout
            ``[B, Hkv, S_max, D]``: position ``p`` of row ``b`` is at index ``p`` (plus
            ``row_offset[b]``). Slot layout (with ``slot_map``): ``[num_slots, Hkv, D]``.
        chunk_idx: int32 ``[B, Hkv, n_keep]``, each row sorted strictly ascending, every entry
            in ``[0, tail_start_b // chunk_size)``; ``n_keep`` may be 0.
        chunk_size: ``c``, any int >= 1 (ChunkKV uses 10).
        tail_start: int, or int32 ``[B]``: the first position of the dense range, at most
            ``seq_lens - n + 1``.
        seq_lens: int32 ``[B]``: each row's current length (the dense range ends there).
        scaling: logit scale, default ``D ** -0.5``.
        num_splits: how many programs share one ``(b, h)``'s retained set; ``None`` picks it
            from the shapes and the GPU's SM count (no sync), an int forces it.
        slot_map: int32 ``[B, S_max]``: position ``p`` of row ``b`` lives in slot
            ``slot_map[b, p]`` of the slot-layout cache (paged / SGLang-style caches).
        row_offset: int32 ``[B]``, dense layout only: position ``p`` of row ``b`` lives at
            index ``row_offset[b] + p`` (left-padded batches; positions, ``tail_start`` and
            ``seq_lens`` are then row-local).
        chunk_counts: int32 ``[B]``: row ``b`` uses only ``chunk_idx[b, :, :chunk_counts[b]]``
            (rows keep different numbers of chunks); later entries are ignored.
        validate: check shapes, dtypes, devices and the index data (this syncs with the host).
            ``False`` skips every check so the call can be captured in a CUDA graph or compiled
            with ``torch.compile(fullgraph=True)``; bad indices then read wrong or
            out-of-bounds memory. While ``torch.compile`` traces, ``False`` still runs the
            checks that read no data: they cost nothing once compiled.

    Returns:
        ``[B, Hq, D]`` (or ``[B, Hq, n, D]``, like ``q``) in ``q``'s dtype.
    """
    check_bool("validate", validate)  # no sync: a plain Python check
    if validate or torch.compiler.is_compiling():
        check_sparse_decode_inputs(
            q,
            k_cache,
            v_cache,
            chunk_idx,
            chunk_size,
            tail_start,
            seq_lens,
            scaling,
            num_splits,
            slot_map,
            row_offset,
            chunk_counts,
            data=validate,
        )
    return _sparse_decode(
        q,
        k_cache,
        v_cache,
        chunk_idx,
        chunk_size,
        tail_start,
        seq_lens,
        scaling,
        num_splits,
        slot_map,
        row_offset,
        chunk_counts,
    )


def _sparse_decode(
    q,
    k_cache,
    v_cache,
    chunk_idx,
    chunk_size,
    tail_start,
    seq_lens,
    scaling,
    num_splits,
    slot_map,
    row_offset,
    chunk_counts,
) -> torch.Tensor:
    """Unchecked dispatch: the operator ``triton_chunkkv::sparse_decode`` (:mod:`..library`), or
    its implementation directly in plain eager mode. The operator's schema cannot say "int or
    tensor": ``tail_start`` travels as an int plus an optional ``[B]`` tensor."""
    tail_is_tensor = isinstance(tail_start, torch.Tensor)
    tail_tensor = tail_start if tail_is_tensor else None
    tensors = (q, k_cache, v_cache, chunk_idx, seq_lens, tail_tensor, slot_map, row_offset)
    if call_directly(*tensors, chunk_counts):
        return sparse_decode_impl(
            q,
            k_cache,
            v_cache,
            chunk_idx,
            chunk_size,
            tail_start,
            seq_lens,
            scaling,
            num_splits,
            slot_map,
            row_offset,
            chunk_counts,
        )
    return torch.ops.triton_chunkkv.sparse_decode.default(
        q,
        k_cache,
        v_cache,
        chunk_idx,
        chunk_size,
        0 if tail_is_tensor else tail_start,
        tail_tensor,
        seq_lens,
        scaling,
        num_splits,
        slot_map,
        row_offset,
        chunk_counts,
    )


def sparse_decode_impl(
    q,
    k_cache,
    v_cache,
    chunk_idx,
    chunk_size,
    tail_start,
    seq_lens,
    scaling,
    num_splits,
    slot_map,
    row_offset,
    chunk_counts,
) -> torch.Tensor:
    """The operator's implementation: the Triton kernels or the reference (``tail_start`` an
    int or a ``[B]`` tensor)."""
    if not use_triton(q):
        return reference.sparse_decode(
            q,
            k_cache,
            v_cache,
            chunk_idx,
            chunk_size,
            tail_start,
            seq_lens,
            scaling=scaling,
            slot_map=slot_map,
            row_offset=row_offset,
            chunk_counts=chunk_counts,
        ).contiguous()
    one_query = q.dim() == 3
    q4 = q[:, :, None] if one_query else q  # [B, Hq, n, D]
    B, Hq, n, D = q4.shape
    if B == 0:  # nothing to launch (and no split count to pick for zero rows)
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    Hkv = k_cache.shape[1]
    n_keep = chunk_idx.shape[2]
    S_max = k_cache.shape[2] if slot_map is None else slot_map.shape[1]
    tail_is_tensor = isinstance(tail_start, torch.Tensor)
    # Host-side bound on any row's retained length: shapes only, never the data.
    max_tokens = n_keep * chunk_size + S_max - (0 if tail_is_tensor else tail_start)
    group = Hq // Hkv
    block_d = max(next_power_of_2(D), MIN_DOT_ROWS)
    block_g = max(next_power_of_2(group * n), MIN_DOT_ROWS)
    if num_splits is None:
        resident = sparse_decode_ctas_per_sm(k_cache.element_size(), block_d, block_g)
        num_splits = default_num_splits(B * Hkv, max_tokens, q.device, resident)
    scaling = D**-0.5 if scaling is None else scaling

    partial_out = empty_output((B, Hq, n, num_splits, D), torch.float32, q.device)
    partial_max = empty_output((B, Hq, n, num_splits), torch.float32, q.device)
    partial_sum = empty_output((B, Hq, n, num_splits), torch.float32, q.device)
    # Dense caches index by (b, h, position); slot caches by (slot, h): k_cache's dim 0 is
    # then the slot, so the batch stride is unused and the row stride is dim 0's.
    if slot_map is None:
        k_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3))
        v_strides = (v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3))
        slot_strides = (0, 0)
    else:
        k_strides = (0, k_cache.stride(1), k_cache.stride(0), k_cache.stride(2))
        v_strides = (0, v_cache.stride(1), v_cache.stride(0), v_cache.stride(2))
        slot_strides = slot_map.stride()
    _sparse_decode_split_kernel[(B * Hkv, num_splits)](
        q4,
        k_cache,
        v_cache,
        chunk_idx,
        tail_start if tail_is_tensor else None,
        seq_lens,
        slot_map,
        row_offset,
        chunk_counts,
        partial_out,
        partial_max,
        partial_sum,
        0 if tail_is_tensor else tail_start,
        n_keep,
        Hkv,
        n,
        num_splits,
        scaling * 1.4426950408889634,  # log2(e): the kernels use exp2
        *q4.stride(),
        *k_strides,
        *v_strides,
        *chunk_idx.stride(),
        *slot_strides,
        TOKENS_PER_SPLIT_BUCKET=bucket(cdiv(max_tokens, num_splits)),
        ELEMENT_BYTES=k_cache.element_size(),
        GROUP=group,
        HEAD_DIM=D,
        CHUNK_SIZE=chunk_size,
        TAIL_PER_ROW=tail_is_tensor,
        HAS_SLOT_MAP=slot_map is not None,
        HAS_ROW_OFFSET=row_offset is not None,
        HAS_CHUNK_COUNTS=chunk_counts is not None,
        DOT_IN_FP32=dot_in_fp32(k_cache.dtype),
        BLOCK_G=block_g,
        BLOCK_D=block_d,
    )
    out = empty_output((B, Hq, n, D), q.dtype, q.device)
    with launch_lock():  # a plain @triton.jit kernel: the tuned ones take the lock themselves
        _merge_splits_kernel[(B * Hq * n,)](
            partial_out,
            partial_max,
            partial_sum,
            out,
            Hq,
            n,
            num_splits,
            *out.stride(),
            HEAD_DIM=D,
            BLOCK_S=next_power_of_2(num_splits),
            BLOCK_D=block_d,
        )
    return out[:, :, 0] if one_query else out


def default_num_splits(
    batch_kv_heads: int, max_tokens: int, device: torch.device, ctas_per_sm: int = 1
) -> int:
    """Splits per ``(b, h)`` from shapes alone (no host sync; the same on every CUDA-graph
    replay): enough programs for one full wave of the GPU, ``ctas_per_sm`` resident CTAs on
    each SM (:func:`..occupancy.sparse_decode_ctas_per_sm`, from the compile report), and no
    more than one wave when the rows alone fill it; but no split shorter than
    :data:`MIN_TOKENS_PER_SPLIT` tokens of the longest possible retained set, and at most
    :data:`MAX_SPLITS`."""
    resident = ctas_per_sm * multiprocessor_count(device)
    wanted = max(1, resident // batch_kv_heads)
    return max(1, min(wanted, cdiv(max_tokens, MIN_TOKENS_PER_SPLIT), MAX_SPLITS))

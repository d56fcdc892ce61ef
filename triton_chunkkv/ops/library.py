"""The ops as PyTorch operators, ``torch.ops.triton_chunkkv.<op>``: what ``torch.compile``
(``fullgraph=True``), ``torch.export``, fake tensors and CUDA graphs see.

Each operator is defined here with its schema, its implementation (the op module's
``<op>_impl``: the Triton kernels or the torch reference, chosen when it runs) for every device,
and a fake implementation that gives the exact output shapes, dtypes and strides from the
arguments' shapes and the int arguments alone (never from tensor data: the number of kept
chunks is ``chunk_idx``'s last dim or the ``n_keep`` argument). To a compiler an operator is
opaque: it is called as it is, which the ``tuned`` autotune wrapper and the interpreter need.

The unchecked dispatchers that the public ops and the compositions call (``_sparse_decode``,
...) call these operators whenever something traces or records them, and the implementations
directly in plain eager mode (:func:`.._runtime.call_directly`), so eager callers do not pay
the dispatcher. The public ops keep their signatures and checks; the checks read no tensor data
except where a ``validate`` flag says so (``docs/DESIGN.md``, "Bad input").

Schemas cannot say "int or tensor": ``sparse_decode``'s ``tail_start`` is an int plus an
optional ``[B]`` tensor ``tail_starts`` (which wins when given). Ints are ``SymInt`` so that
``torch.compile`` may pass them symbolically (an int that changes between calls).

The operators have no gradient (decode-time inference ops).
"""

from __future__ import annotations

import torch

from . import reference
from .kernels import chunk_sum, decode_select, gather, select_chunks, sparse_decode, window_scores

NAMESPACE = "triton_chunkkv"
# Kept for the life of the process: the registrations go with the Library object.
LIBRARY = torch.library.Library(NAMESPACE, "DEF")


def register(schema: str, impl, fake):
    """Define ``NAMESPACE::<schema>``, with ``impl`` for every device (an opaque
    CompositeExplicitAutograd kernel: no tracer looks inside) and ``fake`` for fake and meta
    tensors; returns the operator's ``OpOverload``."""
    name = schema.split("(", 1)[0]
    LIBRARY.define(schema)
    LIBRARY.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIBRARY)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


# ---------------------------------------------------------------------------------------------
# Fake implementations: shapes from shapes and int arguments only
# ---------------------------------------------------------------------------------------------


def window_scores_fake(q_obs, k, key_mask, scaling, pool_kernel):
    B, Hkv, T, _ = k.shape
    return k.new_empty((B, Hkv, T), dtype=torch.float32)


def window_chunk_scores_fake(q_obs, k, key_mask, scaling, chunk_size):
    B, Hkv, T, _ = k.shape
    num_chunks = reference.tail_start(T, chunk_size, q_obs.shape[2]) // chunk_size
    return k.new_empty((B, Hkv, num_chunks), dtype=torch.float32)


def chunk_sum_fake(scores, chunk_size, window):
    B, H, T = scores.shape
    num_chunks = reference.tail_start(T, chunk_size, window) // chunk_size
    return scores.new_empty((B, H, num_chunks), dtype=torch.float32)


def select_chunks_fake(chunk_scores, n_keep, share_heads):
    B, H, _ = chunk_scores.shape
    return chunk_scores.new_empty((B, H, n_keep), dtype=torch.int32)


def gather_chunks_fake(k, v, chunk_idx, chunk_size, tail_start):
    B, Hkv, T, D = k.shape
    out_len = chunk_idx.shape[2] * chunk_size + T - tail_start
    return k.new_empty((B, Hkv, out_len, D)), v.new_empty((B, Hkv, out_len, D))


def sparse_decode_fake(
    q,
    k_cache,
    v_cache,
    chunk_idx,
    chunk_size,
    tail_start,
    tail_starts,
    seq_lens,
    scaling,
    num_splits,
    slot_map,
    row_offset,
    chunk_counts,
):
    return q.new_empty(q.shape)


def decode_chunk_scores_fake(q, kmin, kmax, chunk_counts):
    B, Hkv, n, _ = kmin.shape
    return q.new_empty((B, Hkv, n), dtype=torch.float32)


def chunk_bounds_fake(k, chunk_size, num_chunks):
    B, H, _, D = k.shape
    return k.new_empty((B, H, num_chunks, D)), k.new_empty((B, H, num_chunks, D))


# ---------------------------------------------------------------------------------------------
# Real implementations: the op modules' ``*_impl`` (their outputs are fresh contiguous tensors,
# as the fakes say; ``tests/test_opcheck.py`` compares the two)
# ---------------------------------------------------------------------------------------------


def sparse_decode_real(
    q,
    k_cache,
    v_cache,
    chunk_idx,
    chunk_size,
    tail_start,
    tail_starts,
    seq_lens,
    scaling,
    num_splits,
    slot_map,
    row_offset,
    chunk_counts,
):
    """The implementation with its "int or tensor" ``tail_start`` joined again."""
    return sparse_decode.sparse_decode_impl(
        q,
        k_cache,
        v_cache,
        chunk_idx,
        chunk_size,
        tail_start if tail_starts is None else tail_starts,
        seq_lens,
        scaling,
        num_splits,
        slot_map,
        row_offset,
        chunk_counts,
    )


# ---------------------------------------------------------------------------------------------
# The operators
# ---------------------------------------------------------------------------------------------

WINDOW_SCORES = register(
    "window_scores(Tensor q_obs, Tensor k, Tensor? key_mask, float? scaling, SymInt pool_kernel)"
    " -> Tensor",
    window_scores.window_scores_impl,
    window_scores_fake,
)
WINDOW_CHUNK_SCORES = register(
    "window_chunk_scores(Tensor q_obs, Tensor k, Tensor? key_mask, float? scaling, "
    "SymInt chunk_size) -> Tensor",
    window_scores.window_chunk_scores_impl,
    window_chunk_scores_fake,
)
CHUNK_SUM = register(
    "chunk_sum(Tensor scores, SymInt chunk_size, SymInt window) -> Tensor",
    chunk_sum.chunk_sum_impl,
    chunk_sum_fake,
)
SELECT_CHUNKS = register(
    "select_chunks(Tensor chunk_scores, SymInt n_keep, bool share_heads) -> Tensor",
    select_chunks.select_chunks_impl,
    select_chunks_fake,
)
GATHER_CHUNKS = register(
    "gather_chunks(Tensor k, Tensor v, Tensor chunk_idx, SymInt chunk_size, SymInt tail_start)"
    " -> (Tensor, Tensor)",
    gather.gather_chunks_impl,
    gather_chunks_fake,
)
SPARSE_DECODE = register(
    "sparse_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor chunk_idx, "
    "SymInt chunk_size, SymInt tail_start, Tensor? tail_starts, Tensor seq_lens, "
    "float? scaling, SymInt? num_splits, Tensor? slot_map, Tensor? row_offset, "
    "Tensor? chunk_counts) -> Tensor",
    sparse_decode_real,
    sparse_decode_fake,
)
DECODE_CHUNK_SCORES = register(
    "decode_chunk_scores(Tensor q, Tensor kmin, Tensor kmax, Tensor? chunk_counts) -> Tensor",
    decode_select.decode_chunk_scores_impl,
    decode_chunk_scores_fake,
)
CHUNK_BOUNDS = register(
    "chunk_bounds(Tensor k, SymInt chunk_size, SymInt num_chunks) -> (Tensor, Tensor)",
    decode_select.chunk_bounds_impl,
    chunk_bounds_fake,
)

OPERATORS = {
    "window_scores": WINDOW_SCORES,
    "window_chunk_scores": WINDOW_CHUNK_SCORES,
    "chunk_sum": CHUNK_SUM,
    "select_chunks": SELECT_CHUNKS,
    "gather_chunks": GATHER_CHUNKS,
    "sparse_decode": SPARSE_DECODE,
    "decode_chunk_scores": DECODE_CHUNK_SCORES,
    "chunk_bounds": CHUNK_BOUNDS,
}

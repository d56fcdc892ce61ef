"""SPEC step 7: one pass writing the chosen chunks and the dense tail into fresh tensors."""

from __future__ import annotations

import torch

from . import reference
from ._checks import check_dim, check_int, check_same, check_tensor
from ._runtime import use_triton


def check_chunk_idx(chunk_idx, batch, num_kv_heads, num_chunks) -> None:
    check_tensor("chunk_idx", chunk_idx, 3, dtypes=(torch.int32, torch.int64))
    if tuple(chunk_idx.shape[:2]) != (batch, num_kv_heads):
        raise ValueError(f"chunk_idx must have shape [{batch}, {num_kv_heads}, n_keep], got "
                         f"{tuple(chunk_idx.shape)}")
    if chunk_idx.numel() and (int(chunk_idx.min()) < 0 or int(chunk_idx.max()) >= num_chunks):
        raise ValueError(f"chunk_idx must lie in [0, {num_chunks}) (the chunks before "
                         f"tail_start), got values in [{int(chunk_idx.min())}, "
                         f"{int(chunk_idx.max())}]")


def gather_chunks(k, v, chunk_idx, chunk_size, tail_start):
    """``(k_out, v_out)``, each ``[B, Hkv, n_keep * c + T - tail_start, D]`` contiguous:
    chunk ``chunk_idx[..., 0]``, ..., then ``[tail_start, T)``, in that order."""
    check_tensor("k", k, 4)
    check_tensor("v", v, 4)
    check_same("device", k=k, v=v, chunk_idx=chunk_idx)
    check_same("dtype", k=k, v=v)
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    check_int("chunk_size", chunk_size, minimum=1)
    check_int("tail_start", tail_start, minimum=0)
    B, Hkv, T, D = k.shape
    if tail_start > T:
        raise ValueError(f"tail_start must be <= the sequence length {T}, got {tail_start}")
    check_chunk_idx(chunk_idx, B, Hkv, tail_start // chunk_size)
    return _gather_chunks(k, v, chunk_idx, chunk_size, tail_start)


def _gather_chunks(k, v, chunk_idx, chunk_size, tail_start):
    """Unchecked dispatch: the Triton kernel or the reference."""
    if not use_triton(k):
        return reference.gather_chunks(k, v, chunk_idx, chunk_size, tail_start)
    raise NotImplementedError("gather_chunks Triton kernel")

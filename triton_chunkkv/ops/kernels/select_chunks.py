"""SPEC steps 4-6: the top-scoring chunks, ties to the lower index, sorted ascending.

Selection is a stable sort on ``n = T / c`` numbers per head: torch does it on any device, so
the reference implementation is the op.
"""

from __future__ import annotations

import torch

from .. import reference
from .._checks import check_bool, check_int, check_tensor
from .._runtime import call_directly


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
    """The operator's implementation: a stable sort in torch on every device."""
    return reference.select_chunks(chunk_scores, n_keep, share_heads=share_heads).contiguous()

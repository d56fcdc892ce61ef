"""SPEC steps 3-4: per-chunk sums of the token scores, up to the dense tail."""

from __future__ import annotations

import torch

from . import reference
from ._checks import check_chunking, check_tensor
from ._runtime import use_triton


def chunk_sum(scores, chunk_size, window) -> torch.Tensor:
    """float32 ``[B, Hkv, n]``: ``scores [B, Hkv, T]`` summed over chunks ``[j*c, (j+1)*c)``
    for ``j < n = P0 / c`` (SPEC step 3 fixes ``P0``)."""
    check_tensor("scores", scores, 3)
    check_chunking(chunk_size, window, scores.shape[2])
    return _chunk_sum(scores, chunk_size, window)


def _chunk_sum(scores, chunk_size, window) -> torch.Tensor:
    """Unchecked dispatch: the Triton kernel or the reference."""
    if not use_triton(scores):
        return reference.chunk_sum(scores, chunk_size, window)
    raise NotImplementedError("chunk_sum Triton kernel")

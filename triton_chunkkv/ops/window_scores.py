"""SPEC steps 1-2: window-attention token scores, fused (the window logits never reach memory)."""

from __future__ import annotations

import torch

from . import reference
from ._checks import check_dim, check_gqa, check_pool_kernel, check_same, check_tensor
from ._runtime import use_triton


def check_window_inputs(q_obs, k, key_mask, scaling) -> None:
    check_tensor("q_obs", q_obs, 4)
    check_tensor("k", k, 4)
    check_same("device", q_obs=q_obs, k=k, key_mask=key_mask)
    check_same("dtype", q_obs=q_obs, k=k)
    B, Hkv, T, D = k.shape
    check_dim("q_obs", q_obs.shape[0], B, "batch size")
    check_dim("q_obs", q_obs.shape[3], D, "head dim")
    check_gqa("q_obs", q_obs.shape[1], Hkv)
    if not 1 <= q_obs.shape[2] <= T:
        raise ValueError(f"q_obs holds a window of {q_obs.shape[2]} queries, expected 1..{T} "
                         "(the window cannot exceed the sequence length)")
    if key_mask is not None:
        check_tensor("key_mask", key_mask, 2, dtypes=(torch.bool,))
        if tuple(key_mask.shape) != (B, T):
            raise ValueError(f"key_mask must have shape {(B, T)}, got {tuple(key_mask.shape)}")
    if scaling is not None and (isinstance(scaling, bool) or not isinstance(scaling, (int, float))):
        raise TypeError(f"scaling must be a float or None, got {type(scaling).__name__}")


def window_scores(q_obs, k, *, key_mask=None, scaling=None, pool_kernel=1) -> torch.Tensor:
    """float32 ``[B, Hkv, T]`` token scores of SPEC steps 1-2.

    ``q_obs [B, Hq, w, D]`` are the last ``w`` prompt queries, ``k [B, Hkv, T, D]`` the keys,
    ``key_mask [B, T]`` (bool, False = padding) optional.
    """
    check_window_inputs(q_obs, k, key_mask, scaling)
    check_pool_kernel(pool_kernel)
    return _window_scores(q_obs, k, key_mask, scaling, pool_kernel)


def _window_scores(q_obs, k, key_mask, scaling, pool_kernel) -> torch.Tensor:
    """Unchecked dispatch: the Triton kernel or the reference."""
    if not use_triton(k):
        return reference.window_scores(q_obs, k, key_mask=key_mask, scaling=scaling,
                                       pool_kernel=pool_kernel)
    raise NotImplementedError("window_scores Triton kernel")

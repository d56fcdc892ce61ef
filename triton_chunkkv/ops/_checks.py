"""Argument checks shared by the ops: each raises a ValueError/TypeError naming the argument.

A public op checks every argument's type before it reads an attribute of it (a list where a
tensor belongs is a TypeError, not an AttributeError from inside the op), then ranks, sizes,
dtypes and devices. None of these checks syncs with the device.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, t, ndim: int, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        expected = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({expected}), got {t.dtype}")


def check_nonempty(name: str, t: torch.Tensor, dims: dict[int, str]) -> None:
    """The dimensions ``dims`` (``{index: what it counts}``) of ``t`` are at least 1. Only the
    batch may be empty: a head dim of 0 has no scaling ``D ** -0.5``, and zero heads no GQA
    group."""
    for index, what in dims.items():
        if t.shape[index] < 1:
            raise ValueError(f"{name} has {what} 0 (shape {tuple(t.shape)}), expected >= 1")


def check_same(what: str, **tensors) -> None:
    """All ``tensors`` share the attribute ``what`` ('device' or 'dtype'); call it after their
    types are checked."""
    values = {name: getattr(t, what) for name, t in tensors.items() if t is not None}
    if len(set(values.values())) > 1:
        listed = ", ".join(f"{name}={value}" for name, value in values.items())
        raise ValueError(f"expected one {what} for {', '.join(values)}, got {listed}")


def check_key_value(k_name: str, k, v_name: str, v, ndim: int) -> None:
    """Keys and values: tensors of rank ``ndim`` with one shape, dtype and device, at least one
    head (dim 1) and a head dim (the last) of at least 1."""
    check_tensor(k_name, k, ndim)
    check_tensor(v_name, v, ndim)
    check_same("device", **{k_name: k, v_name: v})
    check_same("dtype", **{k_name: k, v_name: v})
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(
            f"{v_name} must have {k_name}'s shape {tuple(k.shape)}, got {tuple(v.shape)}"
        )
    check_nonempty(k_name, k, {1: "key/value heads", ndim - 1: "head dim"})


def check_scaling(scaling) -> None:
    """``None`` (``D ** -0.5``) or a finite number > 0: a NaN, infinite or non-positive scale
    makes every logit NaN, infinite or reversed."""
    if scaling is None:
        return
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a float or None, got {type(scaling).__name__}")
    try:
        finite = math.isfinite(scaling)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite or scaling <= 0:
        raise ValueError(f"scaling must be a finite number > 0, got {scaling!r}")


def check_dim(name: str, actual: int, expected: int, what: str) -> None:
    if actual != expected:
        raise ValueError(f"{name} has {what} {actual}, expected {expected}")


def check_int(name: str, value, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def check_gqa(q_name: str, num_q_heads: int, num_kv_heads: int) -> int:
    """Returns the GQA group size ``Hq // Hkv``."""
    if num_kv_heads < 1 or num_q_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"{q_name} has {num_q_heads} heads, which is not a positive multiple of the "
            f"{num_kv_heads} key/value heads"
        )
    return num_q_heads // num_kv_heads


def check_budget(budget, ratio) -> None:
    """Exactly one of ``budget`` (int >= 0 tokens) and ``ratio`` (in (0, 1])."""
    if (budget is None) == (ratio is None):
        raise ValueError(
            f"pass exactly one of budget and ratio, got budget={budget!r}, ratio={ratio!r}"
        )
    if budget is not None:
        check_int("budget", budget, minimum=0)
    elif isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")


def check_window(window, seq_len: int) -> None:
    if window > seq_len:
        raise ValueError(f"window must be <= the sequence length {seq_len}, got {window}")


def check_chunking(chunk_size, window, seq_len: int | None = None) -> None:
    check_int("chunk_size", chunk_size, minimum=1)
    check_int("window", window, minimum=1)
    if seq_len is not None:
        check_window(window, seq_len)


def check_pool_kernel(pool_kernel) -> None:
    check_int("pool_kernel", pool_kernel, minimum=1)
    if pool_kernel > 1 and pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be 1 or odd, got {pool_kernel}")

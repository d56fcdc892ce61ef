"""Argument checks shared by the ops: each raises a ValueError/TypeError naming the argument."""

from __future__ import annotations

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


def check_same(what: str, **tensors) -> None:
    """All ``tensors`` share the attribute ``what`` ('device' or 'dtype')."""
    values = {name: getattr(t, what) for name, t in tensors.items() if t is not None}
    if len(set(values.values())) > 1:
        listed = ", ".join(f"{name}={value}" for name, value in values.items())
        raise ValueError(f"expected one {what} for {', '.join(values)}, got {listed}")


def check_key_value(k_name: str, k, v_name: str, v, ndim: int) -> None:
    """Keys and values: tensors of rank ``ndim`` with one shape, dtype and device."""
    check_tensor(k_name, k, ndim)
    check_tensor(v_name, v, ndim)
    check_same("device", **{k_name: k, v_name: v})
    check_same("dtype", **{k_name: k, v_name: v})
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(
            f"{v_name} must have {k_name}'s shape {tuple(k.shape)}, got {tuple(v.shape)}"
        )


def check_scaling(scaling) -> None:
    if scaling is not None and (isinstance(scaling, bool) or not isinstance(scaling, (int, float))):
        raise TypeError(f"scaling must be a float or None, got {type(scaling).__name__}")


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
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"{q_name} has {num_q_heads} heads, which is not a multiple of the "
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


def check_chunking(chunk_size, window, seq_len: int | None = None) -> None:
    check_int("chunk_size", chunk_size, minimum=1)
    check_int("window", window, minimum=1)
    if seq_len is not None and window > seq_len:
        raise ValueError(f"window must be <= the sequence length {seq_len}, got {window}")


def check_pool_kernel(pool_kernel) -> None:
    check_int("pool_kernel", pool_kernel, minimum=1)
    if pool_kernel > 1 and pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be 1 or odd, got {pool_kernel}")

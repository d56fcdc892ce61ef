"""``compress`` (SPEC steps 1-7 for one layer) and ``compress_layers`` (with SPEC Algorithm 2's
index reuse): the :class:`~triton_chunkkv.policies.ChunkKV` policy's selection, then the gather.

These are the compositions every adapter runs, so the op benchmarks time what users run. They
sit above the policies (which compose the kernels), under the ``ops`` name for convenience.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..policies.base import group_leader
from ..policies.chunkkv import ChunkKV
from . import reference
from ._checks import (
    check_bool,
    check_budget,
    check_chunking,
    check_int,
    check_key_value,
    check_pool_kernel,
    check_window,
)
from .kernels.gather import _gather_chunks
from .kernels.window_scores import check_window_inputs
from .reference import Compressed


def check_options(budget, ratio, chunk_size, window, share_heads, pool_kernel) -> None:
    """The options alone (no tensor is read)."""
    check_budget(budget, ratio)
    check_chunking(chunk_size, window)
    check_bool("share_heads", share_heads)
    check_pool_kernel(pool_kernel)


def check_layer(q_obs, k, v, key_mask, scaling, window) -> None:
    """One layer's tensors, once :func:`check_options` has passed."""
    check_key_value("k", k, "v", v, 4)
    check_window(window, k.shape[2])
    check_window_inputs(q_obs, k, key_mask, scaling)
    if q_obs.shape[2] != window:
        raise ValueError(f"q_obs must hold the last window={window} queries, got {q_obs.shape[2]}")


def check_layers(layers, reuse_layers, key_mask, scaling, window) -> None:
    """``layers``: a sequence of ``(q_obs, k, v)`` triples, each checked as :func:`check_layer`
    checks one (a reused layer with its group leader's ``q_obs``), with one shape for every
    ``k``. Errors name the layer."""
    if not isinstance(layers, Sequence) or isinstance(layers, (str, bytes)):
        raise TypeError(
            f"layers must be a sequence of (q_obs, k, v) triples, got {type(layers).__name__}"
        )
    for layer, triple in enumerate(layers):
        if not isinstance(triple, Sequence) or isinstance(triple, (str, bytes)):
            raise TypeError(
                f"layers[{layer}] must be a (q_obs, k, v) triple, got {type(triple).__name__}"
            )
        if len(triple) != 3:
            raise ValueError(
                f"layers[{layer}] must be a (q_obs, k, v) triple, got {len(triple)} items"
            )
    for layer, (_, k, v) in enumerate(layers):
        # A reused layer's own q_obs is never read: its group leader's is checked instead.
        leader = group_leader(layer, reuse_layers)
        where = f"layers[{layer}]" + (f" (q_obs of layers[{leader}])" if leader != layer else "")
        try:
            check_layer(layers[leader][0], k, v, key_mask, scaling, window)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}: {error}") from None
        if layer and tuple(k.shape) != tuple(layers[0][1].shape):
            raise ValueError(
                f"layers[{layer}] k has shape {tuple(k.shape)}, expected the shape "
                f"of layers[0] k {tuple(layers[0][1].shape)}"
            )


def compress(
    q_obs,
    k,
    v,
    *,
    budget=None,
    ratio=None,
    chunk_size=10,
    window=32,
    key_mask=None,
    scaling=None,
    share_heads=False,
    pool_kernel=1,
) -> Compressed:
    """Compress one layer's prompt cache.

    ``q_obs [B, Hq, w, D]`` (``w == window``), ``k``/``v [B, Hkv, T, D]``; exactly one of
    ``budget`` (tokens per KV head) and ``ratio`` (``L = floor(ratio * T)``). Returns
    ``Compressed(keys, values, chunk_idx, tail_start)``; when ``L >= T`` nothing is dropped and
    ``keys``/``values`` are the input tensors themselves, with every chunk in ``chunk_idx``.
    """
    check_options(budget, ratio, chunk_size, window, share_heads, pool_kernel)
    check_layer(q_obs, k, v, key_mask, scaling, window)
    policy = ChunkKV(
        chunk_size=chunk_size, window=window, share_heads=share_heads, pool_kernel=pool_kernel
    )
    selection = _select(policy, q_obs, k, budget, ratio, key_mask, scaling)
    return _gather(policy, k, v, selection)


def compress_layers(
    layers: Sequence,
    *,
    reuse_layers=1,
    budget=None,
    ratio=None,
    chunk_size=10,
    window=32,
    key_mask=None,
    scaling=None,
    share_heads=False,
    pool_kernel=1,
) -> list[Compressed]:
    """:func:`compress` over ``(q_obs, k, v)`` per layer with index reuse (SPEC Algorithm 2).

    Layer ``l`` selects its own chunks when ``l % reuse_layers == 0``; the others gather their
    own ``k``/``v`` with the indices of layer ``reuse_layers * (l // reuse_layers)`` and their
    ``q_obs`` is never read (pass ``None`` to skip computing it).
    """
    check_int("reuse_layers", reuse_layers, minimum=1)
    check_options(budget, ratio, chunk_size, window, share_heads, pool_kernel)
    check_layers(layers, reuse_layers, key_mask, scaling, window)
    policy = ChunkKV(
        chunk_size=chunk_size, window=window, share_heads=share_heads, pool_kernel=pool_kernel
    )
    selections = {}
    out = []
    for layer, (q_obs, k, v) in enumerate(layers):
        leader = group_leader(layer, reuse_layers)
        if leader == layer:
            selections[layer] = _select(policy, q_obs, k, budget, ratio, key_mask, scaling)
        out.append(_gather(policy, k, v, selections[leader]))
    return out


def _select(policy, q_obs, k, budget, ratio, key_mask, scaling):
    T = k.shape[2]
    return policy.select(
        q_obs,
        k,
        budget=reference.resolve_budget(T, budget, ratio),
        layer=0,
        num_layers=1,
        key_mask=key_mask,
        scaling=scaling,
    )


def _gather(policy, k, v, selection) -> Compressed:
    """SPEC step 7 for ``selection``; the identity (``k``/``v`` themselves) for ``None``."""
    B, Hkv, T, _ = k.shape
    if selection is None:
        chunk_idx = reference.all_chunks(B, Hkv, T, policy.chunk_size, policy.window, k.device)
        p0 = reference.tail_start(T, policy.chunk_size, policy.window)
        return Compressed(k, v, chunk_idx, p0)
    chunk_idx, chunk_size, tail_start = selection
    kept = _gather_chunks(k, v, chunk_idx, chunk_size, tail_start)
    return Compressed(*kept, chunk_idx, tail_start)

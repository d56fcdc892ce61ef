"""One layer of ChunkKV (SPEC steps 1-7), and layer-wise index reuse (SPEC Algorithm 2)."""

from __future__ import annotations

from collections.abc import Sequence

from . import reference
from ._checks import check_budget, check_chunking, check_int, check_key_value, check_pool_kernel
from .chunk_sum import _chunk_sum
from .gather import _gather_chunks
from .reference import Compressed
from .select_chunks import select_chunks
from .window_scores import _window_scores, check_window_inputs


def check_layer(q_obs, k, v, key_mask, scaling, window) -> None:
    check_window_inputs(q_obs, k, key_mask, scaling)
    if q_obs.shape[2] != window:
        raise ValueError(f"q_obs must hold the last window={window} queries, got {q_obs.shape[2]}")
    check_key_value("k", k, "v", v, 4)


def check_options(budget, ratio, chunk_size, window, pool_kernel, seq_len) -> None:
    check_budget(budget, ratio)
    check_chunking(chunk_size, window, seq_len)
    check_pool_kernel(pool_kernel)


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
    check_options(budget, ratio, chunk_size, window, pool_kernel, k.shape[2])
    check_layer(q_obs, k, v, key_mask, scaling, window)
    return _compress(
        q_obs,
        k,
        v,
        budget=budget,
        ratio=ratio,
        chunk_size=chunk_size,
        window=window,
        key_mask=key_mask,
        scaling=scaling,
        share_heads=share_heads,
        pool_kernel=pool_kernel,
    )


def _compress(
    q_obs, k, v, *, budget, ratio, chunk_size, window, key_mask, scaling, share_heads, pool_kernel
) -> Compressed:
    B, Hkv, T, _ = k.shape
    p0 = reference.tail_start(T, chunk_size, window)
    budget = reference.resolve_budget(T, budget, ratio)
    n_keep = reference.num_kept_chunks(T, budget, chunk_size, window)
    if n_keep is None:
        return Compressed(k, v, reference.all_chunks(B, Hkv, T, chunk_size, window, k.device), p0)
    scores = _window_scores(q_obs, k, key_mask, scaling, pool_kernel)
    chunk_idx = select_chunks(
        _chunk_sum(scores, chunk_size, window), n_keep, share_heads=share_heads
    )
    return Compressed(*_gather_chunks(k, v, chunk_idx, chunk_size, p0), chunk_idx, p0)


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
    for layer, (_, k, v) in enumerate(layers):
        check_options(budget, ratio, chunk_size, window, pool_kernel, k.shape[2])
        if layer and tuple(k.shape) != tuple(layers[0][1].shape):
            raise ValueError(
                f"layers[{layer}] k has shape {tuple(k.shape)}, expected the shape "
                f"of layers[0] k {tuple(layers[0][1].shape)}"
            )
        # A reused layer's own q_obs is never read: its group leader's is checked instead.
        check_layer(layers[layer - layer % reuse_layers][0], k, v, key_mask, scaling, window)
    options = dict(
        budget=budget,
        ratio=ratio,
        chunk_size=chunk_size,
        window=window,
        key_mask=key_mask,
        scaling=scaling,
        share_heads=share_heads,
        pool_kernel=pool_kernel,
    )
    return reference.compress_layers(
        layers,
        reuse_layers=reuse_layers,
        gather_fn=_gather_chunks,
        compress_fn=_compress,
        **options,
    )

"""The torch peers the ops are measured against, in the same run and on the same inputs.

* ``materialized_*``: ChunkKV as kvpress-style code writes it: ``repeat_kv`` the keys, store
  the ``[B, Hq, w, T]`` window logits, softmax in float32, reduce, top-k, ``gather``.
* ``sdpa_decode``: ``scaled_dot_product_attention`` of one query per head over a cache (the
  full one, or the compacted one of SPEC step 7).
* ``flex_sparse_decode``: FlexAttention over the full cache with a block mask of the retained
  set, where FlexAttention applies (compiled on CUDA; eager, unfused, on CPU).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from triton_chunkkv.ops import reference


def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """``[B, Hkv, T, D] -> [B, Hkv * group, T, D]``, as HF's ``repeat_kv`` (a real copy)."""
    B, H, T, D = x.shape
    return x[:, :, None].expand(B, H, group, T, D).reshape(B, H * group, T, D)


def materialized_window_scores(q_obs, k) -> torch.Tensor:
    """SPEC steps 1-2 through stored window logits; float32 ``[B, Hkv, T]``."""
    B, Hq, w, D = q_obs.shape
    Hkv, T = k.shape[1], k.shape[2]
    logits = torch.matmul(q_obs, repeat_kv(k, Hq // Hkv).transpose(2, 3)) * D**-0.5
    future = torch.ones(w, w, dtype=torch.bool, device=k.device).triu(1)
    logits[..., T - w :].masked_fill_(future, float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return probs.sum(dim=2).view(B, Hkv, Hq // Hkv, T).mean(dim=2)


def materialized_compress(q_obs, k, v, n_keep: int, chunk_size: int, window: int):
    """SPEC steps 1-7: ``(keys, values, chunk_idx)``."""
    B, Hkv, T, D = k.shape
    p0 = reference.tail_start(T, chunk_size, window)
    scores = materialized_window_scores(q_obs, k)
    chunk_scores = scores[..., :p0].reshape(B, Hkv, p0 // chunk_size, chunk_size).sum(-1)
    chunk_idx = chunk_scores.topk(n_keep, dim=-1).indices.sort(dim=-1).values
    offsets = torch.arange(chunk_size, device=k.device)
    rows = (chunk_idx[..., None] * chunk_size + offsets).flatten(2)
    rows = torch.cat([rows, torch.arange(p0, T, device=k.device).expand(B, Hkv, -1)], dim=-1)
    index = rows[..., None].expand(-1, -1, -1, D)
    return k.gather(2, index), v.gather(2, index), chunk_idx.int()


def sdpa_decode(q, k_cache, v_cache) -> torch.Tensor:
    """One query per head ``q [B, Hq, D]`` over ``[B, Hkv, S, D]``: the ``g`` query heads of a
    KV head become ``g`` query rows, so every backend reads each key once (no repeat_kv)."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    out = F.scaled_dot_product_attention(q.view(B, Hkv, Hq // Hkv, D), k_cache, v_cache)
    return out.reshape(B, Hq, D)


def flex_sparse_decode(q, k_cache, v_cache, chunk_idx, chunk_size, tail_start, seq_len):
    """``run(q, k, v)``: attention over SPEC's retained set with a FlexAttention block mask
    (built here, outside the timed call, and run once to compile)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, Hq, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    keep = reference.retained_mask(chunk_idx, chunk_size, tail_start, seq_len, S)

    def retained(b, h, q_idx, kv_idx):
        return keep[b, h, kv_idx]

    block_mask = create_block_mask(retained, B, Hkv, Hq // Hkv, S, device=q.device)
    attend = torch.compile(flex_attention) if q.is_cuda else flex_attention

    def run(q, k, v):
        out = attend(q.view(B, Hkv, Hq // Hkv, D), k, v, block_mask=block_mask)
        return out.reshape(B, Hq, D)

    with warnings.catch_warnings():  # eager flex_attention warns once that it is unfused
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        run(q, k_cache, v_cache)
    return run

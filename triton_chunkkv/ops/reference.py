"""Plain-torch ChunkKV: the executable form of ``SPEC.md``, one function per step.

The Triton kernels are tested against these functions, and CPU tensors run them when
``TRITON_INTERPRET`` is not set. Everything is written for clarity, not speed: step 1
materializes the ``[B, Hq, w, T]`` window probabilities that the kernels never store.

Two rules hold on every path (``docs/DESIGN.md``, "NaN and inf", "Ties"): NaN and inf inputs
propagate as ``torch.softmax`` attention propagates them (only a query with no visible key, or
an empty retained set, gives zeros, by an explicit mask); and the sums behind the scores add in
a fixed order (:func:`sum_in_order`), so equal inputs give bit-equal scores and SPEC's
lower-index tie rule decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import NamedTuple

import torch


class Compressed(NamedTuple):
    """One layer's compressed cache (SPEC step 7) and the indices that produced it."""

    keys: torch.Tensor  # [B, Hkv, n_keep * c + tail_len, D]
    values: torch.Tensor  # same shape as keys
    chunk_idx: torch.Tensor  # int32 [B, Hkv, n_keep], sorted ascending
    tail_start: int  # P0: the dense tail [P0, T) is always kept


def sum_in_order(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.sum(dim)`` adding the slices along ``dim`` one after another, so every output element
    adds its inputs in the same order: equal inputs give bit-equal sums wherever they sit.
    (torch's reductions order a vectorized body and its remainder differently: equal chunks
    differed by one ulp, which broke exact ties.)"""
    slices = x.unbind(dim)
    if not slices:
        return x.sum(dim)
    total = slices[0].clone()
    for s in slices[1:]:
        total = total + s
    return total


# ---------------------------------------------------------------------------------------------
# Steps 1-2: window attention and token scores
# ---------------------------------------------------------------------------------------------


def window_probs(q_obs, k, key_mask=None, scaling=None) -> torch.Tensor:
    """SPEC step 1: float32 ``[B, Hq, w, T]`` softmax of the window queries over the keys.

    A window query whose every key is masked (only possible under padding) gets all-zero
    probabilities instead of NaN, so it adds nothing to the scores. NaN or inf in ``q_obs`` or
    in a visible key gives what ``torch.softmax`` gives (NaN rows); masked keys are never read.
    """
    B, Hq, w, D = q_obs.shape
    T = k.shape[2]
    g = Hq // k.shape[1]
    scaling = D**-0.5 if scaling is None else scaling
    # float64 products and sums, rounded once to float32: a matmul's rounding may depend on a
    # key's position (BLAS blocks), and equal keys must give bit-equal logits (ties, step 6).
    keys = k.double().repeat_interleave(g, dim=1)
    # In place where it changes nothing: H2O's windows are whole prompts, [B, Hq, T, T].
    logits = torch.einsum("bhid,bhtd->bhit", q_obs.double(), keys).mul_(scaling).float()
    # Window query i sits at T - w + i: only the last w keys can lie in its future.
    future = torch.ones(w, w, dtype=torch.bool, device=k.device).triu_(1)
    logits[..., T - w :].masked_fill_(future, float("-inf"))
    if key_mask is None:  # every window query sees key 0: no empty row
        return torch.softmax(logits, dim=-1)
    visible = key_mask[:, None, None, :].bool()
    logits.masked_fill_(~visible, float("-inf"))
    query_pos = torch.arange(T - w, T, device=k.device)[:, None]
    causal = torch.arange(T, device=k.device)[None, :] <= query_pos  # [w, T]
    empty = ~(visible & causal).any(dim=-1, keepdim=True)
    return torch.softmax(logits, dim=-1).masked_fill_(empty, 0.0)


def token_scores(probs, num_kv_heads, pool_kernel=1) -> torch.Tensor:
    """SPEC step 2: float32 ``[B, Hkv, T]``, the window-summed probabilities averaged over
    each KV head's GQA group, then optionally average-pooled (zero padded, divisor ``p``)."""
    B, Hq, w, T = probs.shape
    g = Hq // num_kv_heads
    per_query_head = sum_in_order(probs, dim=2)
    scores = sum_in_order(per_query_head.view(B, num_kv_heads, g, T), dim=2) / g
    return pool_scores(scores, pool_kernel)


def pool_scores(scores, pool_kernel: int) -> torch.Tensor:
    """SPEC step 2's pooling of ``[B, Hkv, T]`` scores: the average over
    ``[t - p//2, t + p//2]``, zero padded (divisor always ``p``); ``p = 1`` returns them as is."""
    if pool_kernel == 1:
        return scores
    B, H, T = scores.shape
    flat = scores.reshape(B * H, 1, T)
    return torch.nn.functional.avg_pool1d(flat, pool_kernel, 1, pool_kernel // 2).view(B, H, T)


def window_scores(q_obs, k, *, key_mask=None, scaling=None, pool_kernel=1) -> torch.Tensor:
    """SPEC steps 1-2."""
    probs = window_probs(q_obs, k, key_mask=key_mask, scaling=scaling)
    return token_scores(probs, k.shape[1], pool_kernel=pool_kernel)


# ---------------------------------------------------------------------------------------------
# Steps 3-6: tail, chunks, how many, which
# ---------------------------------------------------------------------------------------------


def tail_start(seq_len: int, chunk_size: int, window: int) -> int:
    """SPEC step 3: ``P0``, the first position of the always-kept dense tail."""
    return chunk_size * ((seq_len - window) // chunk_size)


def chunk_sum(scores, chunk_size, window) -> torch.Tensor:
    """SPEC step 4: float32 ``[B, Hkv, n]`` sums of the token scores over each whole chunk."""
    B, H, T = scores.shape
    p0 = tail_start(T, chunk_size, window)
    chunks = scores[..., :p0].float().reshape(B, H, p0 // chunk_size, chunk_size)
    return sum_in_order(chunks, dim=-1)


def resolve_budget(seq_len: int, budget=None, ratio=None) -> int:
    """``L`` in tokens per KV head: the budget itself, or ``floor(ratio * T)`` taken on the
    ratio as written in decimal (0.29 of 100 tokens is 29, not the float product's 28)."""
    if budget is not None:
        return budget
    # Integer arithmetic on the decimal's numerator and denominator: dynamo traces it (it
    # cannot trace arithmetic on a Fraction) and seq_len may be symbolic.
    numerator, denominator = Fraction(str(ratio)).as_integer_ratio()
    return seq_len * numerator // denominator


def num_kept_chunks(seq_len, budget, chunk_size, window) -> int | None:
    """SPEC step 5: how many chunks stand beside the tail; ``None`` when nothing is dropped."""
    if budget >= seq_len:
        return None
    p0 = tail_start(seq_len, chunk_size, window)
    tail_len = seq_len - p0
    return min(max((budget - tail_len) // chunk_size, 0), p0 // chunk_size)


def select_chunks(chunk_scores, n_keep, *, share_heads=False) -> torch.Tensor:
    """SPEC step 6: int32 ``[B, Hkv, n_keep]``, the top chunks (ties: lower index), ascending."""
    B, H, n = chunk_scores.shape
    scores = chunk_scores.float()
    if share_heads:
        scores = sum_in_order(scores, dim=1)[:, None].expand(B, H, n)
    # A stable descending sort puts equal scores in index order: ties go to the lower index.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n_keep]
    return order.sort(dim=-1).values.to(torch.int32)


# ---------------------------------------------------------------------------------------------
# Step 7: the compacted cache
# ---------------------------------------------------------------------------------------------


def kept_positions(chunk_idx, chunk_size, tail_start, seq_len) -> torch.Tensor:
    """int64 ``[B, Hkv, n_keep * c + seq_len - tail_start]``: the token positions step 7 keeps,
    in order."""
    B, H, n_keep = chunk_idx.shape
    offsets = torch.arange(chunk_size, device=chunk_idx.device)
    in_chunks = (chunk_idx.long()[..., None] * chunk_size + offsets).reshape(
        B, H, n_keep * chunk_size
    )
    tail = torch.arange(tail_start, seq_len, device=chunk_idx.device).expand(B, H, -1)
    return torch.cat([in_chunks, tail], dim=-1)


def gather_chunks(k, v, chunk_idx, chunk_size, tail_start):
    """SPEC step 7: the chosen chunks then the dense tail ``[tail_start, T)``, as fresh tensors."""
    positions = kept_positions(chunk_idx, chunk_size, tail_start, k.shape[2])
    index = positions[..., None].expand(-1, -1, -1, k.shape[-1])
    return k.gather(2, index), v.gather(2, index)


def all_chunks(batch, num_kv_heads, seq_len, chunk_size, window, device) -> torch.Tensor:
    """The identity selection: every chunk index, int32 ``[B, Hkv, n]``."""
    n = tail_start(seq_len, chunk_size, window) // chunk_size
    return torch.arange(n, dtype=torch.int32, device=device).expand(batch, num_kv_heads, n)


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
    """SPEC steps 1-7 for one layer. Identity (same tensors, every chunk) when ``L >= T``."""
    B, Hkv, T, _ = k.shape
    p0 = tail_start(T, chunk_size, window)
    n_keep = num_kept_chunks(T, resolve_budget(T, budget, ratio), chunk_size, window)
    if n_keep is None:
        return Compressed(k, v, all_chunks(B, Hkv, T, chunk_size, window, k.device), p0)
    scores = window_scores(q_obs, k, key_mask=key_mask, scaling=scaling, pool_kernel=pool_kernel)
    chunk_idx = select_chunks(
        chunk_sum(scores, chunk_size, window), n_keep, share_heads=share_heads
    )
    return Compressed(*gather_chunks(k, v, chunk_idx, chunk_size, p0), chunk_idx, p0)


def compress_layers(
    layers: Sequence, *, reuse_layers=1, compress_fn=None, gather_fn=None, **kwargs
) -> list[Compressed]:
    """Layer-wise index reuse (SPEC Algorithm 2) over ``(q_obs, k, v)`` triples.

    Layer ``l`` selects its own chunks when ``l % reuse_layers == 0`` and otherwise gathers
    its own keys and values with the indices of layer ``reuse_layers * (l // reuse_layers)``;
    a reused layer's ``q_obs`` is never read (it may be ``None``). ``compress_fn`` and
    ``gather_fn`` (default: this module's) let the kernels share this loop.
    """
    compress_fn = compress_fn or compress
    gather_fn = gather_fn or gather_chunks
    out: list[Compressed] = []
    for layer, (q_obs, k, v) in enumerate(layers):
        first = reuse_layers * (layer // reuse_layers)
        if layer == first:
            out.append(compress_fn(q_obs, k, v, **kwargs))
        elif out[first].keys is layers[first][1]:  # the group's first layer dropped nothing
            out.append(Compressed(k, v, out[first].chunk_idx, out[first].tail_start))
        else:
            kept = gather_fn(
                k, v, out[first].chunk_idx, kwargs.get("chunk_size", 10), out[first].tail_start
            )
            out.append(Compressed(*kept, out[first].chunk_idx, out[first].tail_start))
    return out


# ---------------------------------------------------------------------------------------------
# Decode over retained chunks
# ---------------------------------------------------------------------------------------------


def retained_mask(
    chunk_idx, chunk_size, tail_start, seq_lens, max_len, *, chunk_counts=None
) -> torch.Tensor:
    """bool ``[B, Hkv, max_len]``: SPEC's ``R(b, h)``, the chosen chunks plus
    ``[tail_start_b, seq_len_b)``. ``tail_start`` and ``seq_lens`` are ints or ``[B]``; with
    ``chunk_counts [B]``, row ``b`` uses only ``chunk_idx[b, :, :chunk_counts[b]]``."""
    B, H, n_keep = chunk_idx.shape
    device = chunk_idx.device
    pos = torch.arange(max_len, device=device)
    tail = torch.as_tensor(tail_start, device=device).expand(B).long()
    lens = torch.as_tensor(seq_lens, device=device).expand(B).long()
    mask = (pos >= tail[:, None]) & (pos < lens[:, None])
    mask = mask[:, None, :].expand(B, H, max_len).clone()
    idx = chunk_idx.long()
    if chunk_counts is not None:  # entries past a row's count may hold anything: never match
        unused = torch.arange(n_keep, device=device) >= chunk_counts.long()[:, None, None]
        idx = idx.masked_fill(unused, -1)
    chunk_of_pos = (pos // chunk_size)[None, None, :, None]
    in_chunks = (chunk_of_pos == idx[:, :, None, :]).any(dim=-1)
    return mask | in_chunks


def sparse_decode(
    q,
    k_cache,
    v_cache,
    chunk_idx,
    chunk_size,
    tail_start,
    seq_lens,
    *,
    scaling=None,
    slot_map=None,
    row_offset=None,
    chunk_counts=None,
) -> torch.Tensor:
    """Exact softmax attention of ``q [B, Hq, D]`` (or the ``n`` newest tokens' ``[B, Hq, n,
    D]``, query ``i`` at position ``seq_len - n + i``, causal in the dense range) over
    ``R(b, h)`` of the uncompacted cache; output like ``q``, in its dtype, zeros where ``R`` is
    empty (an explicit mask: NaN or inf inside ``R`` propagates as in ``torch.softmax``).

    ``k_cache``/``v_cache`` are ``[B, Hkv, S_max, D]`` (position ``p`` of row ``b`` at index
    ``row_offset[b] + p``, default 0), or ``[num_slots, Hkv, D]`` with ``slot_map [B, S_max]``
    giving each position's slot. Values outside ``R`` are never used, even NaN ones.
    """
    one_query = q.dim() == 3
    q = q[:, :, None] if one_query else q  # [B, Hq, n, D]
    if slot_map is not None:  # [num_slots, Hkv, D] -> [B, Hkv, S_max, D]
        # Slots of positions outside R may hold anything; clamped, they are read and masked.
        slots = slot_map.long().clamp(0, k_cache.shape[0] - 1)
        k_cache, v_cache = k_cache[slots].transpose(1, 2), v_cache[slots].transpose(1, 2)
    elif row_offset is not None:  # shift each row so that index p holds position p
        S_max = k_cache.shape[2]
        index = row_offset.long()[:, None] + torch.arange(S_max, device=q.device)
        index = index.clamp(max=S_max - 1)[:, None, :, None].expand_as(k_cache)
        k_cache, v_cache = k_cache.gather(2, index), v_cache.gather(2, index)
    B, Hq, n, D = q.shape
    Hkv, S_max = k_cache.shape[1], k_cache.shape[2]
    g = Hq // Hkv
    scaling = D**-0.5 if scaling is None else scaling
    retained = retained_mask(
        chunk_idx, chunk_size, tail_start, seq_lens, S_max, chunk_counts=chunk_counts
    ).repeat_interleave(g, dim=1)  # [B, Hq, S_max]
    # Query i sees the dense range up to its own position seq_len - n + i; chunks, before the
    # dense range, it always sees.
    pos = torch.arange(S_max, device=q.device)
    tails = torch.as_tensor(tail_start, device=q.device).expand(B).long()
    own = torch.as_tensor(seq_lens, device=q.device).expand(B).long()[:, None] - n
    own = own + torch.arange(n, device=q.device)  # [B, n]
    causal = (pos[None, None, :] < tails[:, None, None]) | (pos[None, None, :] <= own[..., None])
    keep = retained[:, :, None, :] & causal[:, None]  # [B, Hq, n, S_max]
    keys = k_cache.float().repeat_interleave(g, dim=1).masked_fill(~retained[..., None], 0.0)
    values = v_cache.float().repeat_interleave(g, dim=1).masked_fill(~retained[..., None], 0.0)
    logits = scaling * torch.einsum("bhqd,bhtd->bhqt", q.float(), keys)
    logits = logits.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(logits, dim=-1).masked_fill(~keep.any(dim=-1, keepdim=True), 0.0)
    out = torch.einsum("bhqt,bhtd->bhqd", probs, values).to(q.dtype)
    return out[:, :, 0] if one_query else out


# ---------------------------------------------------------------------------------------------
# Decode-time chunk selection (beyond SPEC: ops/kernels/decode_select.py)
# ---------------------------------------------------------------------------------------------


def chunk_bounds(k, chunk_size, num_chunks):
    """``(kmin, kmax)`` ``[B, Hkv, n, D]``: per-dimension bounds of the keys of each chunk."""
    B, H, _, D = k.shape
    chunks = k[:, :, : num_chunks * chunk_size].reshape(B, H, num_chunks, chunk_size, D)
    return chunks.amin(dim=3), chunks.amax(dim=3)


def decode_chunk_scores(q, kmin, kmax, *, chunk_counts=None):
    """float32 ``[B, Hkv, n]``: the largest upper bound on ``<q_h, k>`` over a chunk's keys and
    the query heads of the KV head's group: ``sum_d max(q_d kmin_d, q_d kmax_d)``."""
    B, Hq, D = q.shape
    Hkv, n = kmin.shape[1], kmin.shape[2]
    g = Hq // Hkv
    q = q.float().view(B, Hkv, g, 1, D)
    bound = torch.maximum(q * kmin.float()[:, :, None], q * kmax.float()[:, :, None]).sum(-1)
    scores = bound.amax(dim=2)  # [B, Hkv, n]
    if chunk_counts is not None:
        unused = torch.arange(n, device=q.device) >= chunk_counts.long()[:, None, None]
        scores = scores.masked_fill(unused, float("-inf"))
    return scores

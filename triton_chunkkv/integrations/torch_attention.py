"""ChunkKV for hand-written attention: one cache object per layer and an attention function.

    caches = [ChunkKVCache(ratio=0.2, layer=i, num_layers=n) for i in range(n)]
    ...
    # inside layer i, with RoPE already applied at positions caches[i].seq_len onwards:
    out = chunkkv_attention(q, k, v, caches[i])  # q [B, Hq, S, D], k/v [B, Hkv, S, D]

The first call on an empty cache is the prefill: dense causal attention over the prompt, then
the policy selects and the cache is compressed. Later calls attend to the compacted cache
(``mode="evict"``) or, through ``ops.sparse_decode``, to the kept chunks of the full cache
(``mode="sparse"``). Rows of a batch share one prompt length (no padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..ops import reference
from ..ops._checks import check_budget, check_gqa, check_int, check_tensor
from ..policies import ChunkKV, Policy, Selection, select_prompt

MODES = ("evict", "sparse")


class ChunkKVCache:
    """One layer's KV cache, compressed once after prefill.

    Args:
        budget / ratio: tokens kept per KV head, or ``floor(ratio * T)``; exactly one.
        policy: the selection policy (default ``ChunkKV()``: chunk 10, window 32).
        mode: ``"evict"`` keeps only the compacted keys/values; ``"sparse"`` keeps everything
            and decodes over the selection with ``ops.sparse_decode``.
        layer, num_layers: passed to the policy (layer-dependent budgets).
        leader: another layer's cache whose selection this layer reuses instead of scoring
            (SPEC Algorithm 2); it must have run its prefill first.

    Attributes:
        keys, values: ``[B, Hkv, stored, D]``, what attention reads.
        seq_len: the true sequence length, i.e. the position of the next token.
        selection: the :class:`~triton_chunkkv.policies.Selection` used, ``None`` when the
            layer kept everything (or before prefill).
    """

    def __init__(
        self,
        *,
        budget=None,
        ratio=None,
        policy: Policy | None = None,
        mode="evict",
        layer=0,
        num_layers=1,
        leader: ChunkKVCache | None = None,
    ):
        check_budget(budget, ratio)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(
                f"policy must be a triton_chunkkv.policies.Policy or None, got "
                f"{type(policy).__name__}"
            )
        if leader is not None and not isinstance(leader, ChunkKVCache):
            raise TypeError(f"leader must be a ChunkKVCache or None, got {type(leader).__name__}")
        check_int("layer", layer, minimum=0)
        check_int("num_layers", num_layers, minimum=layer + 1)
        self.budget, self.ratio, self.mode = budget, ratio, mode
        self.policy = policy if policy is not None else ChunkKV()
        self.layer, self.num_layers, self.leader = layer, num_layers, leader
        self.keys = self.values = None
        self.seq_len = 0
        self.selection: Selection | None = None
        self.decode_checked = False  # sparse_decode validates the selection on the first step

    def append(self, key, value) -> None:
        if self.keys is None:
            self.keys, self.values = key, value
        else:
            self.keys = torch.cat([self.keys, key], dim=2)
            self.values = torch.cat([self.values, value], dim=2)
        self.seq_len += key.shape[2]

    def compress(self, query, scaling, input_ids=None) -> None:
        """Select on the prompt now in the cache; in evict mode, keep only what was selected."""
        if self.leader is not None:
            if self.leader.seq_len != self.seq_len:
                raise ValueError("leader must run its prefill on the same prompt before this layer")
            self.selection = self.leader.selection
        else:
            budget = reference.resolve_budget(self.seq_len, self.budget, self.ratio)
            self.selection = select_prompt(
                self.policy,
                query,
                self.keys,
                budgets=[budget],
                layer=self.layer,
                num_layers=self.num_layers,
                input_ids=input_ids,
                scaling=scaling,
            )[0]
        if self.selection is not None and self.mode == "evict":
            s = self.selection
            self.keys, self.values = ops.gather_chunks(
                self.keys, self.values, s.chunk_idx, s.chunk_size, s.tail_start
            )


def causal_attention(query, key, value, scaling):
    """Softmax attention where query ``i`` sits at key index ``kv - q + i`` (GQA by repeat)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    if q_len in (1, kv_len):  # SDPA's causal flag is exact here
        return F.scaled_dot_product_attention(query, key, value, is_causal=q_len > 1, scale=scaling)
    mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)


def chunkkv_attention(query, key, value, cache: ChunkKVCache, *, scaling=None, input_ids=None):
    """Append ``key``/``value`` to ``cache`` and attend; ``[B, Hq, S, D]`` like ``query``.

    ``query [B, Hq, S, D]``, ``key``/``value [B, Hkv, S, D]``, RoPE applied at positions
    ``cache.seq_len`` to ``cache.seq_len + S - 1``. The call on an empty cache is the prefill;
    there, ``input_ids [B, S]`` (optional) go to ``policy.on_prompt`` for text-aware policies.
    """
    check_tensor("query", query, 4)
    check_tensor("key", key, 4)
    check_tensor("value", value, 4)
    if not isinstance(cache, ChunkKVCache):
        raise TypeError(f"cache must be a ChunkKVCache, got {type(cache).__name__}")
    check_gqa("query", query.shape[1], key.shape[1])
    if tuple(value.shape) != tuple(key.shape) or key.shape[2] != query.shape[2]:
        raise ValueError(
            f"key and value must be [B, Hkv, S, D] with query's S={query.shape[2]},"
            f" got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    prefill = cache.seq_len == 0
    cache.append(key, value)
    if prefill:
        out = causal_attention(query, cache.keys, cache.values, scaling)
        cache.compress(query, scaling, input_ids)
        return out
    s = cache.selection
    if s is None or cache.mode == "evict":
        return causal_attention(query, cache.keys, cache.values, scaling)
    B, _, q_len, _ = query.shape
    outputs = []
    for i in range(q_len):  # one query at a time; q_len is 1 in ordinary decoding
        seq_lens = torch.full(
            (B,), cache.seq_len - q_len + i + 1, dtype=torch.int32, device=query.device
        )
        outputs.append(
            ops.sparse_decode(
                query[:, :, i],
                cache.keys,
                cache.values,
                s.chunk_idx.to(torch.int32),
                s.chunk_size,
                s.tail_start,
                seq_lens,
                scaling=scaling,
                validate=not cache.decode_checked,
            )
        )
        cache.decode_checked = True
    return torch.stack(outputs, dim=2)

"""ChunkKV for hand-written attention: one cache object per layer and an attention function.

    caches = ChunkKVCache.for_layers(n, ratio=0.2, reuse_layers=2)
    out = chunkkv_attention(q, k, v, caches[i])  # in layer i; RoPE at positions seq_len.. on

The call on an empty cache is the prefill (dense causal attention, then selection and
compression); later calls attend to the compacted cache (``mode="evict"``) or the kept chunks
of the full cache (``mode="sparse"``). With ``mode="question"`` a later call of several tokens
(a question) runs dense over the whole cache and selects again, as a prefill of everything so
far would. Rows share one prompt length. The bookkeeping is
:mod:`triton_chunkkv.cache`'s.
"""

from __future__ import annotations

import torch

from .. import cache as core
from ..ops._checks import check_budget, check_gqa, check_int, check_same, check_tensor
from ..policies import ChunkKV, Policy, Selection, group_leader, resolve_budget


class ChunkKVCache:
    """One layer's KV cache, compressed once after prefill.

    ``budget`` or ``keep_ratio`` (the fraction kept; ``ratio`` is its older name), ``policy``
    (default ``ChunkKV()``), ``mode``, and ``layer``/``num_layers`` for the policy.
    ``leader``: the cache whose selection this layer reuses (SPEC Algorithm 2;
    :meth:`for_layers` wires the groups). ``keys``/``values`` are what
    attention reads, ``seq_len`` the position of the next token, ``selection`` the policy's
    choice (``None``: kept everything, or before prefill).
    """

    def __init__(
        self,
        *,
        budget=None,
        keep_ratio=None,
        ratio=None,
        policy: Policy | None = None,
        mode="evict",
        layer=0,
        num_layers=1,
        leader: ChunkKVCache | None = None,
    ):
        ratio = core.kept_fraction(ratio, keep_ratio)
        check_budget(budget, ratio)
        core.check_mode(mode)
        for name, value, kind in (("policy", policy, Policy), ("leader", leader, ChunkKVCache)):
            if value is not None and not isinstance(value, kind):
                raise TypeError(f"{name} must be a {kind.__name__} or None, got {value!r}")
        core.check_mode(mode, policy)
        check_int("layer", layer, minimum=0)
        check_int("num_layers", num_layers, minimum=layer + 1)
        self.budget, self.ratio, self.mode = budget, ratio, mode
        self.policy = policy if policy is not None else ChunkKV()
        self.layer, self.num_layers, self.leader = layer, num_layers, leader
        self.keys = self.values = self.sparse = None
        self.seq_len = 0
        self.selection: Selection | None = None
        self.decode_checked = False  # sparse_decode validates the selection on the first step

    @classmethod
    def for_layers(cls, num_layers: int, *, reuse_layers=1, **options) -> list[ChunkKVCache]:
        """One cache per layer, each reusing its group leader's selection."""
        check_int("num_layers", num_layers, minimum=1)
        check_int("reuse_layers", reuse_layers, minimum=1)
        caches: list[ChunkKVCache] = []
        for layer in range(num_layers):
            leader = group_leader(layer, reuse_layers)
            leader = None if leader == layer else caches[leader]
            caches.append(cls(layer=layer, num_layers=num_layers, leader=leader, **options))
        return caches

    def prefill(self, query, key, value, scaling, input_ids=None, policy=None) -> None:
        """Select, then keep the compacted (evict) or whole (sparse, question) prompt: all
        computed before the cache changes. ``query`` holds the last queries of ``key``'s
        sequence (all of them on the first call); ``policy`` (a question's) replaces the
        cache's own for this selection."""
        pads = [0] * key.shape[0]
        budget = resolve_budget(key.shape[2], self.budget, self.ratio)
        if self.mode == "dynamic":  # every decode step selects: no prefill-time selection
            grid = core.chunk_grid(self.policy)
            kv = core.dynamic_layer(key, value, pads, [budget] * len(pads), *grid)
            self.keys, self.values, self.sparse = key, value, kv.sparse
            self.selection, self.seq_len = None, key.shape[2]
            return
        if self.leader is not None:
            if self.leader.seq_len != key.shape[2]:
                raise ValueError("leader must run its prefill on the same prompt before this layer")
            selection = self.leader.selection
        else:
            selection = core.select_rows(
                policy or self.policy,
                query,
                key,
                pads=pads,
                budgets=[budget],
                layer=self.layer,
                num_layers=self.num_layers,
                input_ids=input_ids,
                scaling=scaling,
            )
        kv = core.compress_layer(self.mode, key, value, selection, pads)
        self.keys, self.values = (key, value) if kv is None else (kv.keys, kv.values)
        self.sparse = None if kv is None else kv.sparse
        self.selection, self.seq_len = selection, key.shape[2]
        self.decode_checked = False


def chunkkv_attention(query, key, value, cache: ChunkKVCache, *, scaling=None, input_ids=None):
    """Append ``key``/``value [B, Hkv, S, D]`` to ``cache`` and attend with ``query
    [B, Hq, S, D]``; returns ``[B, Hq, S, D]``. ``input_ids`` go to ``policy.on_prompt``:
    the prompt's ``[B, S]`` on the prefill, the whole sequence's ``[B, seq_len + S]`` on a
    question-mode call of several tokens. Every argument is checked before the cache changes."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t, 4)
    if not isinstance(cache, ChunkKVCache):
        raise TypeError(f"cache must be a ChunkKVCache, got {type(cache).__name__}")
    check_gqa("query", query.shape[1], key.shape[1])
    if tuple(value.shape) != tuple(key.shape) or key.shape[2] != query.shape[2]:
        raise ValueError(
            f"key and value must be [B, Hkv, S, D] with query's S={query.shape[2]}, "
            f"got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    for what in ("dtype", "device"):
        check_same(what, query=query, key=key, value=value, cache=cache.keys)
    if cache.keys is not None and key.shape[:2] != cache.keys.shape[:2]:
        raise ValueError(
            f"key has [B, Hkv] {list(key.shape[:2])}, the cache {list(cache.keys.shape[:2])}"
        )
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if cache.seq_len == 0:
        out = core.dense_attention(query, key, value, scaling)
        cache.prefill(query, key, value, scaling, input_ids)
        return out
    keys, values = torch.cat([cache.keys, key], dim=2), torch.cat([cache.values, value], dim=2)
    question = core.question_policy(cache.mode, cache.policy, key.shape[2], keys.shape[2])
    if question is not None:  # dense over everything so far, then select again
        out = core.dense_attention(query, keys, values, scaling)
        cache.prefill(query, keys, values, scaling, input_ids, question)
        return out
    if cache.sparse is None:
        out = core.dense_attention(query, keys, values, scaling)
    else:
        out = core.sparse_attention(
            query,
            keys,
            values,
            cache.sparse,
            key_start=None,
            scaling=scaling,
            validate=not cache.decode_checked,
        )
        cache.decode_checked = True
    cache.keys, cache.values, cache.seq_len = keys, values, cache.seq_len + key.shape[2]
    return out

"""Evaluation engine: one prefill per prompt, then every (policy, budget) decodes from it.

ChunkKV and its baselines compress the cache after the prompt's own attention, so the prefill
is the same for every policy; only the cache that decoding reads differs. The engine runs the
prompt once, keeps each layer's RoPE'd queries, keys and values, and for each policy:

1. calls the policy per layer exactly as the HF adapter does (the last
   ``observation_window(policy, T)`` queries, the uniform budget, the layer index), through
   ``policy.select_many`` so that the scores serve every budget;
2. compacts each layer as the adapters' evict mode does (``cache.compress_layer``, SPEC
   step 7);
3. decodes greedily over the compacted cache, positions continuing at ``T`` (SPEC
   "Positions").

This gives the tokens ``chunkkv(model, policy=..., budget=...)`` + ``model.generate`` gives
(``tests/test_eval.py`` checks it) at a fraction of the cost: on a CPU, a 1K-token prefill of the
default model costs as much as decoding a few dozen tokens.

For the fidelity metrics, :func:`trace` feeds a fixed continuation through a cache and records,
per layer, the continuation's attention probabilities and outputs (float32, exact softmax) and
the keys/values it writes.

Prompts run one at a time; the configurations of one prompt decode (and trace) together as one
batch, their caches left padded to a common length. Everything goes through the engine's own
attention function (registered as ``chunkkv_eval``): causal attention aligned on the last key,
so a query sees its row's whole compacted prompt and the tokens generated before it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, DynamicCache

from .. import cache as core
from ..integrations.hf import GrowingLayer, cache_kwargs
from ..ops import reference
from ..policies import Policy, Selection, group_leader, select_prompt

ATTENTION_NAME = "chunkkv_eval"


@dataclass
class Recorder:
    """What the attention function keeps of the current forward call, per layer, and the
    left padding of a batch of caches (``key_start[layer]``: int64 ``[C]``, the first real
    cache index of each row; absent: no padding)."""

    capture_qkv: bool = False  # prefill: queries, keys, values
    exact: bool = False  # trace: float32 attention with probabilities
    key_start: dict = field(default_factory=dict)
    # layer -> [(row, DynamicIndex)]: rows that pick their chunks at every step (dynamic mode)
    dynamic: dict = field(default_factory=dict)
    queries: dict = field(default_factory=dict)
    keys: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    probs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    scaling: float | None = None


_RECORDER: Recorder | None = None


def exact_attention(query, key, value, scaling, mask):
    """float32 ``(probs [C, Hq, q, kv], out [C, Hq, q, D])``; ``mask`` from
    ``cache.causal_mask`` (``None``: every key visible)."""
    group = query.shape[1] // key.shape[1]
    logits = scaling * query.float() @ key.float().repeat_interleave(group, dim=1).transpose(-1, -2)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return probs, probs @ value.float().repeat_interleave(group, dim=1)


def eval_attention(
    module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, **kwargs
):
    """``AttentionInterface`` entry, active inside :func:`recording`."""
    recorder = _RECORDER
    if recorder is None:
        raise RuntimeError(
            f"attn_implementation={ATTENTION_NAME!r} only works inside "
            "triton_chunkkv.eval.engine.recording(model)"
        )
    layer = module.layer_idx
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    recorder.scaling = scaling
    if recorder.capture_qkv:
        recorder.queries[layer], recorder.keys[layer], recorder.values[layer] = query, key, value
    q_len = query.shape[2]
    # transformers builds no mask for an unregistered implementation: attention_mask is None.
    key_valid = core.valid_keys(recorder.key_start.get(layer), key.shape[2])
    mask = core.causal_mask(
        q_len, key.shape[2], key_valid, device=query.device, sdpa=not recorder.exact
    )
    if recorder.dynamic.get(layer):
        mask = dynamic_rows_mask(query, key.shape[2], mask, recorder.dynamic[layer], key_valid)
    if recorder.exact:
        probs, out = exact_attention(query, key, value, scaling, mask)
        recorder.probs[layer], recorder.outputs[layer] = probs, out
        recorder.keys[layer], recorder.values[layer] = key[:, :, -q_len:], value[:, :, -q_len:]
        return out.to(query.dtype).transpose(1, 2).contiguous(), None
    return core.dense_attention(query, key, value, scaling, mask).transpose(1, 2), None


def dynamic_rows_mask(query, kv_len, mask, rows, key_valid) -> torch.Tensor:
    """``mask`` as ``[C, Hkv, q, kv]``, the dynamic-mode rows narrowed to what each of their
    queries reads (``cache.dynamic_read_mask``); a dynamic row is never padded (its cache is
    the whole prompt, the longest row)."""
    C, _, q_len, _ = query.shape
    Hkv = rows[0][1].kmin.shape[1]
    if mask is None:
        mask = core.causal_mask(q_len, kv_len, key_valid, device=query.device, sdpa=False)
    if mask is None:  # one query, no padding: every key
        mask = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=query.device)
    mask = mask.expand(C, Hkv, q_len, kv_len).clone()
    for row, index in rows:
        mask[row] &= core.dynamic_read_mask(query[row : row + 1], index, kv_len)[0]
    return mask


AttentionInterface.register(ATTENTION_NAME, eval_attention)


@contextmanager
def recording(model, recorder: Recorder):
    """Runs ``model`` through :func:`eval_attention`, filling ``recorder``."""
    global _RECORDER
    previous = model.config._attn_implementation
    _RECORDER = recorder
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield recorder
    finally:
        model.set_attn_implementation(previous)
        _RECORDER = None


@dataclass
class Prefill:
    """One prompt's prefill, shared by every policy."""

    input_ids: torch.Tensor  # [1, T]
    queries: list  # per layer [1, Hq, T, D], RoPE applied (after a question: its q only)
    keys: list  # per layer [1, Hkv, T, D]
    values: list
    next_token: int  # the greedy token after the prompt: the same for every policy
    scaling: float

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_layers(self) -> int:
        return len(self.keys)


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor) -> Prefill:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape [1, T], got {tuple(input_ids.shape)}")
    with recording(model, Recorder(capture_qkv=True)) as rec:
        logits = model(input_ids, use_cache=False, logits_to_keep=1).logits
    return recorded(rec, input_ids, logits)


def recorded(rec: Recorder, input_ids, logits) -> Prefill:
    """The :class:`Prefill` of ``input_ids`` from a ``capture_qkv`` forward's recorder and
    its last logits."""
    layers = range(len(rec.keys))
    return Prefill(
        input_ids,
        [rec.queries[i] for i in layers],
        [rec.keys[i] for i in layers],
        [rec.values[i] for i in layers],
        int(logits[0, -1].argmax()),
        rec.scaling,
    )


@torch.no_grad()
def extend(model, pre: Prefill, question: list[int]) -> Prefill:
    """``pre`` continued by ``question``, read over the whole cache (question mode): the
    sequence's keys and values, the question's queries (the last ones a policy's window
    reads) and the greedy token after the question."""
    cache, _, _ = stack_caches([compact(pre, [None] * pre.num_layers)], spare=len(question))
    tokens = torch.tensor([question], device=pre.input_ids.device)
    positions = torch.arange(pre.seq_len, pre.seq_len + len(question), device=tokens.device)
    with recording(model, Recorder(capture_qkv=True)) as rec:
        logits = model(
            tokens,
            **cache_kwargs(model, cache),
            use_cache=True,
            logits_to_keep=1,
            position_ids=positions[None],
        ).logits
    return recorded(rec, torch.cat([pre.input_ids, tokens], dim=1), logits)


def select_layers(
    pre: Prefill, policy: Policy, budgets, reuse_layers: int = 1
) -> list[list[Selection | None]]:
    """``policy``'s selection in every layer (inner list) for each of ``budgets`` (outer list),
    as the adapters call it, its scores computed once per layer; with ``reuse_layers`` a layer
    takes its group leader's selections (SPEC Algorithm 2)."""
    per_layer = []
    for layer in range(pre.num_layers):
        leader = group_leader(layer, reuse_layers)
        if leader < layer:
            per_layer.append(per_layer[leader])
            continue
        per_layer.append(
            select_prompt(
                policy,
                pre.queries[layer],
                pre.keys[layer],
                budgets=budgets,
                layer=layer,
                num_layers=pre.num_layers,
                input_ids=pre.input_ids,
                scaling=pre.scaling,
            )
        )
    return [list(selections) for selections in zip(*per_layer)]


def compact(pre: Prefill, selections) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's ``(keys, values)`` after SPEC step 7 (the prefill's own when ``None``)."""
    out = []
    for k, v, selection in zip(pre.keys, pre.values, selections):
        compressed = core.compress_layer("evict", k, v, selection, [0])
        out.append((k, v) if compressed is None else (compressed.keys, compressed.values))
    return out


def dynamic(pre: Prefill, budget: int, chunk_size: int, window: int) -> list:
    """Each layer's ``(keys, values, index)`` in dynamic mode: the whole prompt, and the
    :class:`~triton_chunkkv.cache.DynamicIndex` every decode step selects with."""
    out = []
    for k, v in zip(pre.keys, pre.values):
        layer = core.dynamic_layer(k, v, [0], [budget], chunk_size, window)
        out.append((k, v, layer.sparse))
    return out


def kept_positions(selection: Selection | None, seq_len: int, device) -> torch.Tensor:
    """int64 ``[1, Hkv or 1, kept]``: the prompt positions a layer keeps, in cache order."""
    if selection is None:
        return torch.arange(seq_len, device=device)[None, None]
    return reference.kept_positions(
        selection.chunk_idx, selection.chunk_size, selection.tail_start, seq_len
    )


def stack_caches(caches, spare: int = 0) -> tuple[DynamicCache, dict]:
    """Several configurations' caches (each a list of per-layer ``(keys, values)``, batch 1, or
    ``(keys, values, index)`` in dynamic mode) as one batch cache: per layer, the rows left
    padded with zeros to a common length, with room for ``spare`` more tokens (appends then
    copy nothing else); ``key_start`` (int64 ``[C]``) for the layers whose rows differ in
    length, and the dynamic rows per layer."""
    layers, key_start, dynamic_rows = [], {}, {}
    for layer, rows in enumerate(zip(*caches)):
        keys, values, starts = core.left_pad_stack([row[:2] for row in rows], spare)
        if starts is not None:
            key_start[layer] = starts
        indexed = [(r, row[2]) for r, row in enumerate(rows) if len(row) == 3]
        if indexed:
            if starts is not None and any(int(starts[r]) for r, _ in indexed):
                raise ValueError("a dynamic-mode cache must be the longest of its batch")
            dynamic_rows[layer] = indexed
        layers.append(GrowingLayer.with_room(keys, values, keys.shape[2] - spare))
    cache = DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in layers])
    cache.layers = layers
    return cache, key_start, dynamic_rows


def until_stop(tokens: list[int], stop_ids) -> list[int]:
    """``tokens`` up to and including the first stop token."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: i + 1]
    return tokens


@torch.no_grad()
def greedy_decode(
    model, pre: Prefill, caches, max_new_tokens: int, stop_ids=(), question=None
) -> list:
    """Greedy tokens after the prompt for each cache of ``caches`` (each from :func:`compact`),
    decoded together as one batch; each row ends at its first stop token.

    ``question`` (token ids, question-agnostic setting): the prefill was the context alone, so
    each cache first reads the question at positions ``T, T+1, ...`` (attending to its
    compressed context and causally to the question) and its first token follows from there.
    """
    cache, key_start, dynamic_rows = stack_caches(caches, len(question or ()) + max_new_tokens)
    device = pre.input_ids.device
    start = pre.seq_len
    with recording(model, Recorder(key_start=key_start, dynamic=dynamic_rows)):
        if question:
            tokens = torch.tensor([question] * len(caches), device=device)
            positions = torch.arange(start, start + len(question), device=device)
            logits = model(
                tokens,
                **cache_kwargs(model, cache),
                use_cache=True,
                logits_to_keep=1,
                position_ids=positions.expand_as(tokens),
            ).logits
            rows = [[token] for token in logits[:, -1].argmax(dim=-1).tolist()]
            start += len(question)
        else:
            rows = [[pre.next_token] for _ in caches]
        for position in range(start, start + max_new_tokens - 1):
            if stop_ids and all(any(t in stop_ids for t in row) for row in rows):
                break
            last = torch.tensor([[row[-1]] for row in rows], device=device)
            logits = model(
                last,
                **cache_kwargs(model, cache),
                use_cache=True,
                logits_to_keep=1,
                position_ids=torch.full_like(last, position),
            ).logits
            for row, token in zip(rows, logits[:, -1].argmax(dim=-1).tolist()):
                row.append(token)
    return [until_stop(row, stop_ids) for row in rows]


@dataclass
class Trace:
    """A continuation fed through one cache: per layer, the continuation's float32 attention
    ``probs [1, Hq, n, kept + n]`` and ``outputs [1, Hq, n, D]``, and the ``keys``/``values``
    ``[1, Hkv, n, D]`` it wrote."""

    probs: list
    outputs: list
    keys: list
    values: list


@torch.no_grad()
def trace(model, pre: Prefill, caches, continuation: list[int]) -> list[Trace]:
    """Teacher-forces ``continuation`` (positions ``T, T+1, ...``) over each cache of
    ``caches``, as one batch; one :class:`Trace` per cache, padding removed."""
    device = pre.input_ids.device
    cache, key_start, dynamic_rows = stack_caches(caches, spare=len(continuation))
    n = len(continuation)
    tokens = torch.tensor([continuation] * len(caches), device=device)
    positions = torch.arange(pre.seq_len, pre.seq_len + n, device=device).expand_as(tokens)
    recorder = Recorder(exact=True, key_start=key_start, dynamic=dynamic_rows)
    with recording(model, recorder) as rec:
        model(
            tokens,
            **cache_kwargs(model, cache),
            use_cache=True,
            logits_to_keep=1,
            position_ids=positions,
        )
    traces = []
    for row in range(len(caches)):
        pad = [
            int(key_start[layer][row]) if layer in key_start else 0
            for layer in range(pre.num_layers)
        ]
        traces.append(
            Trace(
                [
                    rec.probs[layer][row : row + 1, ..., pad[layer] :]
                    for layer in range(pre.num_layers)
                ],
                [rec.outputs[layer][row : row + 1] for layer in range(pre.num_layers)],
                [rec.keys[layer][row : row + 1] for layer in range(pre.num_layers)],
                [rec.values[layer][row : row + 1] for layer in range(pre.num_layers)],
            )
        )
    return traces

"""HuggingFace transformers adapter: ChunkKV inside ``model.generate`` and plain forward calls.

    from triton_chunkkv.integrations.hf import chunkkv

    with chunkkv(model, ratio=0.2) as state:
        out = model.generate(**inputs, max_new_tokens=32)
    state.kept_lengths  # what each layer kept of each prompt

How it hooks in, without patching model code:

* The context registers the attention function :func:`chunkkv_attention` through transformers'
  ``AttentionInterface`` and switches the model to it (``set_attn_implementation``); the model's
  previous implementation is restored on exit. The function runs after the layer's cache update,
  with the layer's RoPE'd queries, so on prefill it runs dense causal attention (PyTorch SDPA),
  then selects that layer's chunks.
* A matching ``AttentionMaskInterface`` entry hands the attention function the 2-D padding mask
  as is: after eviction the cache is shorter than the sequence, so the 4-D masks transformers
  would build from the cache length no longer line up; the decode mask is built from each
  layer's own per-row state instead.
* A forward pre-hook on each attention module finds the ``Cache`` it is called with (the
  argument is ``past_key_values`` up to transformers 5.23 and ``cache`` from 5.24; the hook looks
  for the object, not the name). A prefill that reaches the attention function without a cache
  raises: the context never runs as a silent no-op.
* When the last layer of the prefill has selected, every layer's cache entry is swapped for a
  :class:`CompressedLayer` at once (an error part way changes nothing). That layer reports the
  true sequence length, so positions never shift (SPEC "Positions"): after a ``T``-token prompt
  the next token has position ``T`` whatever the kept length.
* ``mode="question"`` keeps every key: a later call of several tokens (a question after a
  context) runs dense over the whole cache and selects again, with its own last queries, as
  the prefill of everything so far would; the steps after it read only that selection.
  Layer 0 carries the sequence's token ids for policies that read them.

The selection, compaction and decode bookkeeping is the framework-neutral core in
:mod:`triton_chunkkv.cache`; this module is transformers plumbing. Batches may be left padded
(``attention_mask`` zeros at the start of a row): every row then selects on its own unpadded
prompt, exactly as if it ran alone.
"""

from __future__ import annotations

import functools
import inspect
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import transformers
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .. import cache as core
from ..ops._checks import check_budget, check_int
from ..policies import Policy, Selection, chunk_policy, group_leader, resolve_budget

ATTENTION_NAME = "chunkkv"
MODES = core.MODES
# The layer types whose attention is plain causal softmax over the cached keys.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


# ---------------------------------------------------------------------------------------------
# What the context reports, and the compressed cache layer
# ---------------------------------------------------------------------------------------------


@dataclass
class ChunkKVState:
    """Yielded by :func:`chunkkv`; describes the latest prefill run inside the context.

    Attributes:
        policy: the selection policy in use.
        mode: ``"evict"`` or ``"sparse"``.
        reuse_layers: layer ``l`` selects when ``l % reuse_layers == 0``, else it reuses the
            selection of layer ``reuse_layers * (l // reuse_layers)``.
        num_layers: attention layers in the model.
        prompt_lengths: each row's own prompt length ``T_b`` (left padding excluded).
        budgets: each row's budget ``L_b`` in tokens per KV head.
        selections: one entry per layer. Rows of equal length (no padding) select together:
            the entry is the batch's :class:`~triton_chunkkv.policies.Selection`, or ``None``
            when the layer keeps everything. A left-padded batch selects row by row: the entry
            is a list of per-row ``Selection | None`` (batch dimension 1, positions counted
            from the row's first real token). :meth:`row_selection` reads either form.
        kept_lengths: per layer, per row: how many prompt tokens each KV head keeps
            (``T_b`` when nothing is dropped).
        compress_seconds: time spent selecting and compacting during the prefill (all layers).
        prefills: how many prefills have been compressed inside the context so far.
    """

    policy: Policy
    mode: str
    reuse_layers: int
    num_layers: int
    prompt_lengths: list[int] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)
    selections: list = field(default_factory=list)
    kept_lengths: list[list[int]] = field(default_factory=list)
    compress_seconds: float = 0.0
    prefills: int = 0

    def require_prefill(self) -> None:
        """Raises unless a prefill ran through the adapter: results of a context that
        compressed nothing must not be reported as ChunkKV's."""
        if not self.prefills:
            raise RuntimeError(
                f"chunkkv compressed no prefill inside the context (transformers "
                f"{transformers.__version__}): the numbers would be the full "
                "cache's"
            )

    def row_selection(self, layer: int, row: int) -> Selection | None:
        """Row ``row``'s selection in ``layer``, with batch dimension 1."""
        entry = self.selections[layer]
        if isinstance(entry, list):
            return entry[row]
        if entry is None:
            return None
        return entry._replace(chunk_idx=entry.chunk_idx[row : row + 1])


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends into spare room instead of concatenating the whole cache
    at every step (``DynamicLayer.update`` copies every key and value once per token): the
    buffers grow by ``GROW_TOKENS`` positions at a time, so an append copies only the new
    tokens, and the whole cache once per ``GROW_TOKENS`` steps. ``keys``/``values`` are views
    of the filled part."""

    GROW_TOKENS = 256

    def __init__(self, keys, values):
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._adopt(keys, values)

    @classmethod
    def with_room(cls, key_buffer, value_buffer, filled: int) -> GrowingLayer:
        """A layer whose cache is the first ``filled`` positions of the buffers: appends go
        into the rest before anything is copied (``cache.left_pad_stack(spare=...)``)."""
        layer = cls(key_buffer[..., :filled, :], value_buffer[..., :filled, :])
        layer._key_buffer, layer._value_buffer = key_buffer, value_buffer
        return layer

    def _adopt(self, keys, values) -> None:
        """Takes ``keys``/``values`` as the filled part, with no spare room yet."""
        self._key_buffer, self._value_buffer = keys, values
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, *args, **kwargs):
        length, new = self.keys.shape[-2], key_states.shape[-2]
        if length + new > self._key_buffer.shape[-2]:
            capacity = length + new + self.GROW_TOKENS
            grown = []
            for filled in (self.keys, self.values):
                buffer = filled.new_empty((*filled.shape[:-2], capacity, filled.shape[-1]))
                buffer[..., :length, :] = filled
                grown.append(buffer)
            self._key_buffer, self._value_buffer = grown
        self._key_buffer[..., length : length + new, :] = key_states
        self._value_buffer[..., length : length + new, :] = value_states
        self.keys = self._key_buffer[..., : length + new, :]
        self.values = self._value_buffer[..., : length + new, :]
        return self.keys, self.values

    # The row and length edits of DynamicLayer reassign keys/values: adopt the result.
    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._adopt(self.keys, self.values)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._adopt(self.keys, self.values)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._adopt(self.keys, self.values)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._adopt(self.keys, self.values)


class CompressedLayer(GrowingLayer):
    """A cache layer after ChunkKV's prefill compression (a
    :class:`~triton_chunkkv.cache.CompressedKV` that transformers can grow): ``keys``/``values``
    are the compacted prompt (evict) or the whole prompt with ``sparse`` saying what decode
    reads, then the generated tokens. :meth:`get_seq_length` is the true sequence length."""

    def __init__(self, compressed: core.CompressedKV, *, seq_len: int):
        super().__init__(compressed.keys, compressed.values)
        self.dropped = seq_len - self.keys.shape[-2]
        self.key_start = compressed.key_start
        self.sparse = compressed.sparse
        self.prompt_len = seq_len  # positions from here on are tokens appended after compression
        self.decode_checked = False  # sparse_decode validates the selection on the first step
        self.token_ids = None  # question mode, layer 0: the ids of the sequence so far [B, len]

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] + self.dropped

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_row_state(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_row_state(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        rows = torch.arange(len(self.keys), device=self.device) // repeats
        self._select_row_state(rows)

    def _select_row_state(self, rows) -> None:
        rows = rows.to(self.device)
        if self.key_start is not None:
            self.key_start = self.key_start[rows]
        if self.token_ids is not None:
            self.token_ids = self.token_ids[rows.to(self.token_ids.device)]
        if self.sparse is not None:
            self.sparse = self.sparse.select_rows(rows)


# ---------------------------------------------------------------------------------------------
# The context manager
# ---------------------------------------------------------------------------------------------


@dataclass
class _Prefill:
    """The prefill in progress: what layer 0 found, and each layer's staged result."""

    cache: Cache
    prompt_lengths: list[int]
    budgets: list[int]
    staged: core.StagedPrefill
    seconds: float = 0.0


@dataclass
class _Session:
    """One active ``chunkkv`` context: its options, its state, and the caches seen per layer."""

    policy: Policy
    budget: int | None
    ratio: float | None
    mode: str
    reuse_layers: int
    state: ChunkKVState
    sliding_window: int | None = None  # the smallest sliding window of any layer
    caches: dict = field(default_factory=dict)  # layer index -> the Cache of this call
    # The token ids of the current forward call; in question mode on a compressed cache, of
    # the whole sequence up to the end of this call.
    input_ids: torch.Tensor | None = None
    prefill: _Prefill | None = None


# Attention module -> its session; the registered attention function looks itself up here.
_SESSIONS: weakref.WeakKeyDictionary[torch.nn.Module, _Session] = weakref.WeakKeyDictionary()


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's causal self-attention modules that dispatch through ``AttentionInterface``,
    ordered by layer index."""
    found = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "layer_idx", None), int)
        and hasattr(m, "num_key_value_groups")
        and getattr(m, "is_causal", False)
    ]
    return sorted(found, key=lambda m: m.layer_idx)


def check_model(model) -> list[torch.nn.Module]:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    config = model.config.get_text_config(decoder=True)
    modules = attention_modules(model)
    unsupported = (
        getattr(model.config, "is_encoder_decoder", False)
        or not modules
        or not type(model)._can_set_attn_implementation()
    )
    if unsupported:
        raise ValueError(
            f"model ({type(model).__name__}) has no causal self-attention that "
            "dispatches through transformers' AttentionInterface; supported: "
            "decoder-only models such as Llama, Qwen2 and Mistral"
        )
    if [m.layer_idx for m in modules] != list(range(len(modules))):
        raise ValueError(
            f"model ({type(model).__name__}) has attention layers indexed "
            f"{[m.layer_idx for m in modules]}, expected 0..{len(modules) - 1}"
        )
    layer_types = set(getattr(config, "layer_types", None) or ())
    if not layer_types <= set(SUPPORTED_LAYER_TYPES):
        raise ValueError(
            f"model ({type(model).__name__}) has layer types "
            f"{sorted(layer_types - set(SUPPORTED_LAYER_TYPES))}; supported: "
            f"{list(SUPPORTED_LAYER_TYPES)}"
        )
    if any(module in _SESSIONS for module in modules):
        raise ValueError("model is already inside a chunkkv(...) context")
    return modules


@contextmanager
def chunkkv(
    model,
    *,
    budget=None,
    keep_ratio=None,
    ratio=None,
    chunk_size=10,
    window=32,
    reuse_layers=1,
    share_heads=False,
    pool_kernel=1,
    mode="evict",
    policy=None,
):
    """Compress each layer's KV cache once, right after prefill, for calls made inside.

    The forward call that fills an empty cache is the prefill: it runs dense, then every layer
    is compressed. Later calls, of one token (decoding) or several (a question after a
    context, a second chat turn), attend to the compressed cache and join its dense tail.

    Args:
        model: a transformers decoder-only model (Llama, Qwen2, Mistral families, ...).
        budget: tokens kept per KV head (``L``); or
        keep_ratio: the fraction of each row's prompt kept, ``L = floor(keep_ratio * T_b)``
            (kvpress's ``compression_ratio`` is the fraction removed: ``1 - keep_ratio``).
            ``ratio`` is the same option under its older name. Exactly one of ``budget``,
            ``keep_ratio``, ``ratio``. When ``L >= T_b`` the row keeps everything.
        chunk_size, window, share_heads, pool_kernel: the ChunkKV options (SPEC.md); only
            with ``policy=None``.
        reuse_layers: layer-wise index reuse (SPEC Algorithm 2); 1 turns it off.
        mode: ``"evict"``: the cache holds the compacted keys/values (memory is freed);
            ``"sparse"``: the cache keeps everything and decode attends, through
            ``ops.sparse_decode``, to the kept chunks and the dense tail only;
            ``"dynamic"``: the cache keeps everything and every decode step reads the chunks
            that its own query's bounds score highest (``ops.select_decode_chunks``, on the
            policy's chunk grid), as many as the budget allows, plus the dense tail;
            ``"question"``: as ``"sparse"``, and every later call of several tokens (a
            question after a context) attends to the whole cache and selects again with its
            own last ``window`` queries (all of them when it is shorter; the budget from the
            sequence's new length), so the steps that answer it read the chunks that question
            points at.
        policy: any :class:`~triton_chunkkv.policies.Policy`; ``None`` builds ``ChunkKV``.

    Yields:
        :class:`ChunkKVState`, filled in by each prefill.

    A cache compressed here is only valid inside the context. Everything is validated before
    the model is touched; on exit the model is exactly as before.
    """
    ratio = core.kept_fraction(ratio, keep_ratio)
    check_budget(budget, ratio)
    core.check_mode(mode)
    check_int("reuse_layers", reuse_layers, minimum=1)
    policy = chunk_policy(
        policy,
        chunk_size=chunk_size,
        window=window,
        share_heads=share_heads,
        pool_kernel=pool_kernel,
    )
    core.check_mode(mode, policy)
    modules = check_model(model)

    state = ChunkKVState(
        policy=policy, mode=mode, reuse_layers=reuse_layers, num_layers=len(modules)
    )
    windows = [m.sliding_window for m in modules if getattr(m, "sliding_window", None)]
    session = _Session(
        policy, budget, ratio, mode, reuse_layers, state, sliding_window=min(windows, default=None)
    )
    previous = model.config._attn_implementation
    hooks = [
        model.register_forward_pre_hook(
            functools.partial(_remember_input_ids, session), with_kwargs=True
        )
    ]
    own_generate = model.__dict__.get("generate")
    try:
        for module in modules:
            _SESSIONS[module] = session
            hooks.append(module.register_forward_pre_hook(_remember_cache, with_kwargs=True))
        model.set_attn_implementation(ATTENTION_NAME)
        model.generate = _without_chunked_prefill(model, model.generate)
        yield state
    finally:
        model.set_attn_implementation(previous)
        if own_generate is None:
            model.__dict__.pop("generate", None)
        else:
            model.generate = own_generate
        for hook in hooks:
            hook.remove()
        for module in modules:
            _SESSIONS.pop(module, None)


def _without_chunked_prefill(model, generate):
    """``model.generate`` inside the context. A chunked prefill feeds the prompt in several
    calls, and the first would be compressed alone (later calls append to a compressed cache):
    refused before anything runs."""

    @functools.wraps(generate)
    def generate_in_one_prefill(*args, **kwargs):
        config = kwargs.get("generation_config") or model.generation_config
        if kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None)):
            raise ValueError(
                "chunked prefill (generate(prefill_chunk_size=...)) is not supported: chunkkv "
                "compresses the prompt of the call that fills an empty cache, so the first chunk "
                "would be compressed alone; prefill the whole prompt in one call"
            )
        return generate(*args, **kwargs)

    return generate_in_one_prefill


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for a forward call of ``model``: the argument is ``cache`` from
    transformers 5.24 and ``past_key_values`` before (5.24 still takes the old name, with a
    deprecation warning)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def _call_cache(args, kwargs) -> Cache | None:
    """The ``Cache`` a forward call gets, found by type whatever transformers names the
    argument (``past_key_values``, ``cache``) or however it is passed."""
    return next((value for value in (*args, *kwargs.values()) if isinstance(value, Cache)), None)


def _remember_input_ids(session, model, args, kwargs):
    """Model pre-hook: the call's ``input_ids`` (``None`` when it gets embeddings); in question
    mode on a compressed cache, appended to the sequence's ids that layer 0 carries."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    cache = _call_cache(args, kwargs)
    first = cache.layers[0] if cache is not None and cache.layers else None
    if isinstance(first, CompressedLayer) and first.token_ids is not None:
        known = ids is not None and len(ids) == len(first.token_ids)
        first.token_ids = (
            torch.cat([first.token_ids, ids.to(first.token_ids)], 1) if known else None
        )
        ids = first.token_ids
    session.input_ids = ids


def _remember_cache(module, args, kwargs):
    """Attention pre-hook: the cache this layer is about to update (:func:`_call_cache`)."""
    _SESSIONS[module].caches[module.layer_idx] = _call_cache(args, kwargs)


# ---------------------------------------------------------------------------------------------
# The attention function
# ---------------------------------------------------------------------------------------------


def _padding_mask(*, attention_mask=None, **_):
    """``AttentionMaskInterface`` entry, once per forward call: the 2-D ``[B, seq_len]``
    padding mask as is, or ``None`` when it masks nothing (then SDPA runs unmasked, as for
    the model's own attention)."""
    if attention_mask is not None and bool(attention_mask.all()):
        return None
    return attention_mask


def chunkkv_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """``AttentionInterface`` entry, with the parameters of transformers'
    ``sdpa_attention_forward`` in its order (wrappers pass them positionally). ``query
    [B, Hq, q, D]``, ``key``/``value`` the layer's cache after the update; returns
    ``([B, q, Hq, D], None)``."""
    session = _SESSIONS.get(module)
    if session is None:
        raise RuntimeError(
            f"attn_implementation={ATTENTION_NAME!r} only works inside "
            "triton_chunkkv.integrations.hf.chunkkv(model, ...)"
        )
    cache = session.caches.pop(module.layer_idx, None)  # not kept alive past this call
    q_len = query.shape[2]
    if cache is None:
        raise RuntimeError(
            f"chunkkv found no KV cache in layer {module.layer_idx}'s attention call "
            f"(transformers {transformers.__version__}), so there is nothing to compress: run "
            "the model with use_cache=True; if it does, this transformers version passes the "
            "cache in a way the adapter does not know"
        )
    layer = cache.layers[module.layer_idx]
    _check_call(session, module, layer, attention_mask, kwargs.get("sliding_window"))
    question = core.question_policy(session.mode, session.policy, q_len, key.shape[2])
    if isinstance(layer, CompressedLayer):
        if q_len > 1 and attention_mask is not None:
            _check_no_padding_after(layer.prompt_len, attention_mask)
        if question is None:
            return _decode(module, layer, query, key, value, scaling, dropout)
    # A prefill (this call filled an empty cache) or a question-mode question: dense over the
    # whole cache (question mode never drops a key), then select.
    key_valid = attention_mask[:, : key.shape[2]] if attention_mask is not None else None
    mask = core.causal_mask(q_len, key.shape[2], key_valid, device=query.device)
    out = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling)
    if key.shape[2] == q_len or question is not None:
        policy = session.policy if question is None else question
        _stage_layer(
            session, module.layer_idx, cache, query, key, value, attention_mask, scaling, policy
        )
    return out


def _check_call(session, module, layer, attention_mask, sliding_window) -> None:
    if not isinstance(layer, DynamicLayer):
        raise ValueError(
            f"chunkkv needs a DynamicCache (layers that grow); got a "
            f"{type(layer).__name__}, e.g. from cache_implementation='static'"
        )
    seq_len = layer.get_seq_length()
    # Also checked against the smallest window of any layer (Qwen2 keeps it on the sliding
    # layers only), so that layer 0 raises before any layer is changed.
    window = min((w for w in (sliding_window, session.sliding_window) if w), default=None)
    if window is not None and seq_len > window:
        raise ValueError(
            f"sequence length {seq_len} exceeds the sliding window {window}; "
            "chunkkv supports sliding-window layers only within their window"
        )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"chunkkv needs a 2-D attention_mask [batch, seq_len], got shape "
            f"{tuple(attention_mask.shape)}"
        )
    if attention_mask is not None and attention_mask.shape[-1] != seq_len:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} positions, expected "
            f"the sequence length {seq_len}"
        )


def _check_no_padding_after(prompt_len: int, attention_mask) -> None:
    """Tokens appended to a compressed cache join its dense tail in every row: padding there
    (a batch of questions of different lengths) would be attended to."""
    if not bool(attention_mask[:, prompt_len:].all()):
        raise ValueError(
            "attention_mask has padding after the compressed prompt: calls on a compressed "
            "cache append the same number of real tokens to every row (pad questions on the "
            "right and cut them, or run them one at a time)"
        )


def _decode(module, layer, query, key, value, scaling, dropout):
    """Attention of the new tokens (one or several, causal among themselves) once ``layer``
    is compressed: over the compacted cache (evict) or the retained set read in place
    (sparse), plus the tokens appended since."""
    if layer.sparse is None:  # evict: plain attention over the compacted cache
        key_valid = core.valid_keys(layer.key_start, key.shape[2])
        mask = core.causal_mask(query.shape[2], key.shape[2], key_valid, device=query.device)
        return core.dense_attention(query, key, value, scaling, mask).transpose(1, 2), None
    out = core.sparse_attention(
        query,
        key,
        value,
        layer.sparse,
        key_start=layer.key_start,
        scaling=scaling,
        validate=not layer.decode_checked,
    )
    layer.decode_checked = True
    return out.transpose(1, 2), None


# ---------------------------------------------------------------------------------------------
# Prefill: select each layer, then swap every layer in at once
# ---------------------------------------------------------------------------------------------


def _stage_layer(session, layer_idx, cache, query, key, value, attention_mask, scaling, policy):
    """Selects (with ``policy``: the session's, or a question's) and compresses one layer of
    the prefill into the stage; the last layer swaps the whole stage into ``cache`` and the
    state."""
    B, _, T_pad, _ = key.shape
    if layer_idx == 0:  # every layer of the prefill sees the same padding: read it once
        lengths = [T_pad - pad for pad in _left_padding(attention_mask, B, T_pad, key.device)]
        budgets = [resolve_budget(T, session.budget, session.ratio) for T in lengths]
        staged = core.StagedPrefill(session.state.num_layers)
        session.prefill = _Prefill(cache, lengths, budgets, staged)
    prefill = session.prefill
    if prefill is None or prefill.cache is not cache:
        raise RuntimeError(f"chunkkv saw layer {layer_idx} of a prefill whose layer 0 it missed")
    pads = [T_pad - T for T in prefill.prompt_lengths]
    if key.is_cuda:
        torch.cuda.synchronize(key.device)
    start = time.perf_counter()

    leader = group_leader(layer_idx, session.reuse_layers)
    if session.mode == "dynamic":  # every decode step selects: no prefill-time selection
        selection = None
        grid = core.chunk_grid(session.policy)
        compressed = core.dynamic_layer(key, value, pads, prefill.budgets, *grid)
    elif layer_idx == leader:
        input_ids = session.input_ids
        if input_ids is not None and tuple(input_ids.shape) != (B, T_pad):
            input_ids = None  # not the prompt of this prefill (e.g. a model called on embeddings)
        selection = core.select_rows(
            policy,
            query,
            key,
            pads=pads,
            budgets=prefill.budgets,
            layer=layer_idx,
            num_layers=session.state.num_layers,
            input_ids=input_ids,
            scaling=scaling,
        )
    else:
        selection = prefill.staged.layers[leader][0]
    if session.mode != "dynamic":
        compressed = core.compress_layer(session.mode, key, value, selection, pads)

    if key.is_cuda:
        torch.cuda.synchronize(key.device)
    prefill.seconds += time.perf_counter() - start
    if prefill.staged.stage(layer_idx, (selection, compressed)):
        _commit(session, prefill)


def _commit(session, prefill: _Prefill) -> None:
    """Every layer has its result: swap them into the cache and the state together."""
    state = session.state
    layers = [prefill.staged.layers[layer] for layer in range(state.num_layers)]
    new_layers = {}
    for layer, (_, compressed) in enumerate(layers):
        old = prefill.cache.layers[layer]
        if compressed is None and session.mode == "question":  # keeps all: read densely
            pads = [old.keys.shape[-2] - T for T in prefill.prompt_lengths]
            key_start = torch.tensor(pads, device=old.device) if any(pads) else None
            compressed = core.CompressedKV(old.keys, old.values, key_start, None, [])
        if compressed is not None:
            new_layers[layer] = CompressedLayer(compressed, seq_len=old.get_seq_length())
    if session.mode == "question":  # the ids a later question's policy reads
        new_layers[0].token_ids = session.input_ids
    for layer, new in new_layers.items():
        prefill.cache.layers[layer] = new
    state.prompt_lengths, state.budgets = prefill.prompt_lengths, prefill.budgets
    state.selections = [selection for selection, _ in layers]
    state.kept_lengths = [
        list(prefill.prompt_lengths) if compressed is None else compressed.kept_lengths
        for _, compressed in layers
    ]
    state.compress_seconds = prefill.seconds
    state.prefills += 1
    session.prefill = None


def _left_padding(attention_mask, batch, T_pad, device) -> list[int]:
    """Each row's count of left-padding positions; raises unless padding is on the left only."""
    if attention_mask is None:
        return [0] * batch
    real = attention_mask[:, :T_pad].bool()
    lengths = real.sum(dim=1)
    expected = torch.arange(T_pad, device=device)[None, :] >= (T_pad - lengths)[:, None]
    if not torch.equal(real, expected):
        raise ValueError(
            "attention_mask must mark padding on the left of each prompt only "
            "(zeros first, then ones); use tokenizer.padding_side = 'left'"
        )
    return [T_pad - int(n) for n in lengths.tolist()]


AttentionInterface.register(ATTENTION_NAME, chunkkv_attention)
AttentionMaskInterface.register(ATTENTION_NAME, _padding_mask)

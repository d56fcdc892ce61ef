"""The compressed-cache core: what the adapters and the evaluation engine do with a selection.

Plain tensors in and out, no framework types, so that the transformers adapter, the torch
adapter and the evaluation engine share one implementation of (the SGLang backend selects
through the same policy path, and keeps its selections in device tables of its own,
``integrations/sglang/tables.py``, that its CUDA graphs read):

* selecting on a left-padded batch, each row on its own unpadded prompt (:func:`select_rows`);
* turning one layer's selection into what decode reads (:func:`compress_layer`): the compacted
  keys/values (evict mode, rows left padded to a common length) or the full cache plus a
  :class:`SparseIndex` (sparse mode, read in place by ``ops.sparse_decode``); or, in dynamic
  mode, the full cache plus per-chunk key bounds from which every decode step picks its own
  chunks (:func:`dynamic_layer`, :class:`DynamicIndex`);
* packing ragged per-row selections into one index (:func:`pack_rows`);
* attention over a compressed layer: the causal mask (:func:`causal_mask`), dense attention
  (:func:`dense_attention`) and sparse decode (:func:`sparse_attention`);
* all-or-nothing prefill updates (:class:`StagedPrefill`): every layer's new state is computed
  before any is swapped in, so an error leaves the caller's cache as it was.

Compositions here call the unchecked kernel dispatchers: the indices come from a policy, not
from a user, and the public ops' checks would sync with the host on every layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .ops import reference
from .ops.kernels.decode_select import _chunk_bounds, select_decode_chunks
from .ops.kernels.gather import _gather_chunks
from .ops.kernels.sparse_decode import sparse_decode
from .policies.base import (
    Policy,
    ScoreReduce,
    Selection,
    kept_length,
    observation_window,
    select_prompt,
)

# evict: prefill-time selection, the cache compacted (memory freed); sparse: prefill-time
# selection read in place (reads shrink); dynamic: the chunks re-selected at every decode step
# from that step's query (reads shrink, the selection follows the question); question: read
# in place as sparse, and every several-token call (a question after a context) runs dense and
# selects again with its own last queries (the selection follows each question).
MODES = ("evict", "sparse", "dynamic", "question")
# The modes whose layers keep every key and read a SparseIndex in place.
IN_PLACE_MODES = ("sparse", "question")


def check_mode(mode, policy: Policy | None = None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "question" and policy is not None and policy.window is None:
        raise ValueError(
            f"mode='question' selects with a question's last queries; {policy.name} scores "
            "with every prompt query (window=None): use another mode or policy"
        )


def question_policy(mode: str, policy: Policy, q_len: int, seq_len: int) -> Policy | None:
    """The policy a call of ``q_len`` tokens that brings the cache to ``seq_len`` selects
    again with, or ``None`` when it does not select again: in question mode, every call of
    several tokens on a filled cache (a question) selects. A question shorter than the
    policy's observation window scores with all of its queries: the window shrinks to it."""
    if mode != "question" or not 1 < q_len < seq_len:
        return None
    if q_len >= observation_window(policy, seq_len):
        return policy
    shrinkable = dataclasses.is_dataclass(policy) and "window" in {
        f.name for f in dataclasses.fields(policy)
    }
    if not shrinkable:
        raise ValueError(
            f"a question of {q_len} tokens is shorter than {policy.name}'s window "
            f"{policy.window}, which cannot be shrunk: ask with at least {policy.window} tokens"
        )
    return dataclasses.replace(policy, window=q_len)


def kept_fraction(ratio, keep_ratio):
    """The adapters' ``keep_ratio`` (the fraction kept, a name that cannot be read backwards)
    and its older name ``ratio``: one value, or ``None`` when neither is given."""
    if ratio is not None and keep_ratio is not None:
        raise ValueError(
            f"pass keep_ratio or its older name ratio, not both: got keep_ratio={keep_ratio!r}, "
            f"ratio={ratio!r}"
        )
    return keep_ratio if keep_ratio is not None else ratio


# ---------------------------------------------------------------------------------------------
# Selection on a (possibly left-padded) batch
# ---------------------------------------------------------------------------------------------


def select_rows(
    policy: Policy,
    queries,
    keys,
    *,
    pads: Sequence[int],
    budgets: Sequence[int],
    layer: int,
    num_layers: int,
    input_ids=None,
    scaling=None,
    reduce_scores: ScoreReduce | None = None,
):
    """One layer's selection for a batch whose row ``b`` has ``pads[b]`` left-padding
    positions and budget ``budgets[b]``.

    Without padding the rows share one prompt length and select together: a ``Selection`` (or
    ``None``: keep all). With padding each row selects on its own unpadded prompt, exactly as
    if it ran alone: a list of per-row ``Selection | None`` (batch dimension 1, positions
    counted from the row's first real token). ``queries`` are the last ``q`` positions' (the
    whole padded prompt's on a prefill, a question's on a later call).
    """
    options = dict(layer=layer, num_layers=num_layers, scaling=scaling, reduce_scores=reduce_scores)
    if not any(pads):
        return select_prompt(
            policy, queries, keys, budgets=budgets[:1], input_ids=input_ids, **options
        )[0]
    q_len, T_pad = queries.shape[2], keys.shape[2]
    return [
        select_prompt(
            policy,
            queries[row : row + 1, :, max(q_len - (T_pad - pad), 0) :],
            keys[row : row + 1, :, pad:],
            budgets=[budgets[row]],
            input_ids=None if input_ids is None else input_ids[row : row + 1, pad:],
            **options,
        )[0]
        for row, pad in enumerate(pads)
    ]


# ---------------------------------------------------------------------------------------------
# One layer after compression
# ---------------------------------------------------------------------------------------------


class SparseIndex(NamedTuple):
    """What ``ops.sparse_decode`` needs to read a sparse-mode layer's retained set in place."""

    chunk_idx: torch.Tensor  # int32 [B, Hkv, n_max]
    chunk_size: int
    tail_start: int | torch.Tensor  # int, or int32 [B] row-local
    chunk_counts: torch.Tensor | None  # int32 [B] when rows keep different numbers of chunks
    row_offset: torch.Tensor | None  # int32 [B]: cache index of each row's position 0

    def select_rows(self, rows: torch.Tensor) -> SparseIndex:
        def pick(t):
            return t[rows] if isinstance(t, torch.Tensor) else t

        return SparseIndex(
            self.chunk_idx[rows],
            self.chunk_size,
            pick(self.tail_start),
            pick(self.chunk_counts),
            pick(self.row_offset),
        )


class DynamicIndex(NamedTuple):
    """A dynamic-mode layer: each decode step reads the ``keep_counts[b]`` chunks whose key
    bounds score highest against its own query, plus the dense tail."""

    kmin: torch.Tensor  # [B, Hkv, n_max, D]: per-chunk key bounds (ops.chunk_bounds)
    kmax: torch.Tensor
    chunk_counts: torch.Tensor  # int32 [B]: whole chunks before each row's tail
    keep_counts: torch.Tensor  # int32 [B]: chunks a step reads
    n_keep: int  # max(keep_counts)
    chunk_size: int
    tail_start: int | torch.Tensor  # int, or int32 [B] row-local
    row_offset: torch.Tensor | None  # int32 [B]: cache index of each row's position 0

    def select_rows(self, rows: torch.Tensor) -> DynamicIndex:
        def pick(t):
            return t[rows] if isinstance(t, torch.Tensor) else t

        return self._replace(**{name: pick(getattr(self, name)) for name in self._fields})


@dataclass
class CompressedKV:
    """One layer's cache after its prefill was compressed.

    ``evict``: ``keys``/``values`` hold the compacted prompt, rows left padded to a common
    length. ``sparse``: they hold the whole prompt and ``sparse`` says which positions decode
    reads. Cache indices below ``key_start[b]`` are padding (``None``: no padding).
    """

    keys: torch.Tensor
    values: torch.Tensor
    key_start: torch.Tensor | None
    sparse: SparseIndex | DynamicIndex | None
    kept_lengths: list[int]  # per row: prompt tokens kept (dynamic: read per decode step)


def pack_rows(
    chunk_idx_rows: Sequence[torch.Tensor | None], tail_starts: Sequence[int], num_kv_heads, device
):
    """Ragged per-row selections as one index: ``(chunk_idx [B, Hkv, n_max], chunk_counts [B],
    tail_start [B])``, int32. Row ``b``'s ``chunk_idx_rows[b]`` is ``[Hkv, n_b]`` (``None``: no
    chunks, the whole prompt dense from position 0); entries past a row's count are zeros that
    ``sparse_decode`` never reads."""
    counts = [0 if t is None else t.shape[-1] for t in chunk_idx_rows]
    batch = len(chunk_idx_rows)
    chunk_idx = torch.zeros(batch, num_kv_heads, max(counts), dtype=torch.int32, device=device)
    for row, t in enumerate(chunk_idx_rows):
        if t is not None:
            chunk_idx[row, :, : counts[row]] = t
    tails = [0 if t is None else tail for t, tail in zip(chunk_idx_rows, tail_starts)]

    def as_int32(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    return chunk_idx, as_int32(counts), as_int32(tails)


def left_pad_stack(rows: Sequence[tuple[torch.Tensor, torch.Tensor]], spare: int = 0):
    """``(keys, values, key_start)``: batch-1 ``(k, v)`` rows of different lengths stacked into
    one batch, each left padded with zeros; ``key_start [B]`` (int64) is each row's first real
    index, ``None`` when no row is padded. Each row is copied once, into buffers with room for
    ``spare`` more positions after the stacked ones (``[B, H, width + spare, D]``)."""
    width = max(k.shape[2] for k, _ in rows)
    pads = [width - k.shape[2] for k, _ in rows]
    first_k, first_v = rows[0]
    B, H, D = len(rows), first_k.shape[1], first_k.shape[3]
    keys = first_k.new_empty(B, H, width + spare, D)
    values = first_v.new_empty(B, H, width + spare, D)
    for row, ((k, v), pad) in enumerate(zip(rows, pads)):
        keys[row, :, :pad].zero_()
        values[row, :, :pad].zero_()
        keys[row, :, pad:width] = k[0]
        values[row, :, pad:width] = v[0]
    key_start = torch.tensor(pads, device=keys.device) if any(pads) else None
    return keys, values, key_start


def compress_layer(mode: str, key, value, selection, pads: Sequence[int]) -> CompressedKV | None:
    """What decode reads of one layer's prompt ``key``/``value [B, Hkv, T_pad, D]`` under
    ``selection`` (from :func:`select_rows`) in ``mode`` (evict, or one of
    :data:`IN_PLACE_MODES`); ``None`` when no row drops anything."""
    T_pad = key.shape[2]
    if selection is None:
        return None
    if isinstance(selection, Selection):  # no padding: one selection for the batch
        kept = [kept_length(selection, T_pad)] * key.shape[0]
        chunk_idx, chunk_size, tail_start = selection
        if mode in IN_PLACE_MODES:
            index = SparseIndex(chunk_idx.to(torch.int32), chunk_size, tail_start, None, None)
            return CompressedKV(key, value, None, index, kept)
        keys, values = _gather_chunks(key, value, chunk_idx, chunk_size, tail_start)
        return CompressedKV(keys, values, None, None, kept)
    if all(s is None for s in selection):
        return None
    kept = [kept_length(s, T_pad - pad) for s, pad in zip(selection, pads)]
    if mode in IN_PLACE_MODES:
        chunk_sizes = {s.chunk_size for s in selection if s is not None}
        if len(chunk_sizes) > 1:
            raise ValueError(
                f"the policy chose different chunk sizes {sorted(chunk_sizes)} "
                "for the rows of one layer"
            )
        chunk_idx, counts, tails = pack_rows(
            [None if s is None else s.chunk_idx[0] for s in selection],
            [0 if s is None else s.tail_start for s in selection],
            key.shape[1],
            key.device,
        )
        row_offset = torch.tensor(pads, dtype=torch.int32, device=key.device)
        index = SparseIndex(chunk_idx, chunk_sizes.pop(), tails, counts, row_offset)
        return CompressedKV(key, value, row_offset.long(), index, kept)
    rows = []
    for row, (s, pad) in enumerate(zip(selection, pads)):
        k, v = key[row : row + 1, :, pad:], value[row : row + 1, :, pad:]
        rows.append((k, v) if s is None else _gather_chunks(k, v, *s))
    keys, values, key_start = left_pad_stack(rows)
    return CompressedKV(keys, values, key_start, None, kept)


def chunk_grid(policy) -> tuple[int, int]:
    """``(chunk_size, window)`` dynamic mode uses: the policy's own (SPEC's by default)."""
    return getattr(policy, "chunk_size", 10), getattr(policy, "window", None) or 32


def dynamic_layer(key, value, pads, budgets, chunk_size: int, window: int) -> CompressedKV:
    """Dynamic mode: the whole prompt stays; each row's whole chunks before its SPEC tail
    (step 3 with ``window``) get key bounds, and each decode step will read the number of
    chunks SPEC step 5 gives for the row's budget (all of them when it covers the prompt)."""
    B, _, T_pad, _ = key.shape
    rows = []
    for pad, budget in zip(pads, budgets):
        T = T_pad - pad
        if T < window:  # the prompt fits in the observation window: all of it is the tail
            rows.append((T, 0, 0))
            continue
        tail = reference.tail_start(T, chunk_size, window)
        keep = reference.num_kept_chunks(T, budget, chunk_size, window)
        rows.append((T, tail, tail // chunk_size if keep is None else keep))
    n_max = max(tail // chunk_size for _, tail, _ in rows)
    kmin = key.new_zeros(B, key.shape[1], n_max, key.shape[3])
    kmax = key.new_zeros(B, key.shape[1], n_max, key.shape[3])
    for row, (pad, (_, tail, _)) in enumerate(zip(pads, rows)):
        n = tail // chunk_size
        kmin[row, :, :n], kmax[row, :, :n] = _chunk_bounds(
            key[row : row + 1, :, pad:], chunk_size, n
        )
    device = key.device

    def as_int32(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    keep = [n for _, _, n in rows]
    index = DynamicIndex(
        kmin,
        kmax,
        as_int32([tail // chunk_size for _, tail, _ in rows]),
        as_int32(keep),
        max(keep),
        chunk_size,
        as_int32([tail for _, tail, _ in rows]),
        as_int32(pads) if any(pads) else None,
    )
    kept = [n * chunk_size + T - tail for (T, tail, _), n in zip(rows, keep)]
    key_start = torch.tensor(pads, device=device) if any(pads) else None
    return CompressedKV(key, value, key_start, index, kept)


# ---------------------------------------------------------------------------------------------
# Attention over a compressed layer
# ---------------------------------------------------------------------------------------------


def valid_keys(key_start, kv_len: int) -> torch.Tensor | None:
    """bool ``[B, kv]``: the cache indices at or after each row's ``key_start``."""
    if key_start is None:
        return None
    return torch.arange(kv_len, device=key_start.device)[None, :] >= key_start[:, None]


def causal_mask(q_len: int, kv_len: int, key_valid=None, *, device=None, sdpa=True):
    """bool ``[B or 1, 1, q, kv]`` (True: attend). Query ``i`` sits at cache index
    ``kv - q + i`` and sees the keys up to it; ``key_valid [B, kv]`` marks real (non-padding)
    keys, and a padding query attends to itself only, so no row is empty. ``None`` when no
    mask is needed: one query without padding, or (``sdpa``) SDPA's own causal flag is exact."""
    if key_valid is None and (q_len == 1 or (sdpa and q_len == kv_len)):
        return None
    query_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    key_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = (key_pos <= query_pos)[None, None]
    if key_valid is not None:
        allowed = allowed & (key_valid.bool()[:, None, None, :] | (key_pos == query_pos))
    return allowed


def dense_attention(query, key, value, scaling, mask=None):
    """Softmax attention ``[B, Hq, q, D]`` with GQA (``Hq = g * Hkv``), causal as in
    :func:`causal_mask` when ``mask`` is ``None`` and ``q > 1``.

    The ``g`` query heads of a KV head are stacked along the query axis (``[B, Hkv, g * q, D]``)
    rather than the keys repeated ``g`` times: decode reads each cached key once instead of
    copying the whole cache ``g`` times per layer and step."""
    B, Hq, q_len, D = query.shape
    Hkv, kv_len = key.shape[1], key.shape[2]
    group = Hq // Hkv
    if mask is None and q_len > 1:  # stacked queries: SDPA's causal flag would be wrong
        mask = causal_mask(q_len, kv_len, device=query.device, sdpa=False)
    if mask is not None:  # [B or 1, 1, q, kv] -> [B or 1, 1, g * q, kv], as the queries
        mask = mask.repeat(1, 1, group, 1)
    stacked = query.reshape(B, Hkv, group * q_len, D)
    out = F.scaled_dot_product_attention(stacked, key, value, attn_mask=mask, scale=scaling)
    return out.view(B, Hq, q_len, D)


def sparse_attention(query, key, value, index, *, key_start, scaling, validate):
    """Attention ``[B, Hq, q, D]`` of the ``q`` newest tokens (the last ``q`` cache entries,
    causal among themselves) over a sparse- or dynamic-mode layer: each attends to the retained
    set plus the tokens before it. Sparse mode is one ``sparse_decode`` call for all of them;
    in dynamic mode each query picks its own chunks first. ``key_start [B]`` (or ``None``) is
    each row's first real index."""
    B, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    seq_lens = torch.full((B,), kv_len, dtype=torch.int32, device=key.device)
    if key_start is not None:
        seq_lens = seq_lens - key_start.to(torch.int32)
    options = dict(scaling=scaling, row_offset=index.row_offset)
    if isinstance(index, SparseIndex):
        return sparse_decode(
            query,
            key,
            value,
            index.chunk_idx,
            index.chunk_size,
            index.tail_start,
            seq_lens,
            chunk_counts=index.chunk_counts,
            validate=validate,
            **options,
        )
    outputs = []
    for i in range(q_len):  # one query at a time: each selects its own chunks
        chunk_idx = step_chunks(query[:, :, i], index)
        outputs.append(
            sparse_decode(
                query[:, :, i],
                key,
                value,
                chunk_idx,
                index.chunk_size,
                index.tail_start,
                seq_lens - (q_len - 1 - i),
                chunk_counts=index.keep_counts,
                validate=validate and i == 0,
                **options,
            )
        )
    return torch.stack(outputs, dim=2)


def step_chunks(query, index: DynamicIndex) -> torch.Tensor:
    """int32 ``[B, Hkv, n_keep]``: the chunks a dynamic-mode step with ``query [B, Hq, D]``
    reads, each row's first ``keep_counts[b]`` of them (no host sync)."""
    return select_decode_chunks(
        query,
        index.kmin,
        index.kmax,
        index.n_keep,
        keep_counts=index.keep_counts,
        chunk_counts=index.chunk_counts,
        validate=False,
    )


def dynamic_read_mask(query, index: DynamicIndex, kv_len: int) -> torch.Tensor:
    """bool ``[1, Hkv, q, kv]``: the cache indices each of the ``q`` newest tokens of a
    batch-1 dynamic-mode layer reads (its own best chunks, the dense range up to itself): what
    :func:`sparse_attention` reads, as a mask for batched dense attention (the evaluation)."""
    q_len = query.shape[2]
    masks = []
    for i in range(q_len):
        chunk_idx = step_chunks(query[:, :, i], index)
        seq_len = kv_len - q_len + i + 1
        masks.append(
            reference.retained_mask(
                chunk_idx,
                index.chunk_size,
                index.tail_start,
                seq_len,
                kv_len,
                chunk_counts=index.keep_counts,
            )
        )
    return torch.stack(masks, dim=2)


# ---------------------------------------------------------------------------------------------
# All-or-nothing prefill updates
# ---------------------------------------------------------------------------------------------


@dataclass
class StagedPrefill:
    """One prefill's per-layer results, kept aside until every layer has one.

    An adapter stages each layer as its attention runs and swaps all of them into the caller's
    cache (and its own state) only when the last layer is staged: a prefill that raises part
    way leaves nothing half-compressed. A new prefill starts a new stage.
    """

    num_layers: int
    layers: dict = field(default_factory=dict)

    def stage(self, layer: int, result) -> bool:
        """Keeps ``result`` for ``layer``; True when every layer has been staged."""
        self.layers[layer] = result
        return len(self.layers) == self.num_layers

"""ChunkKV (SPEC.md steps 1-6): the one place the kernels are composed into a selection.

``ops.compress`` / ``ops.compress_layers`` and every adapter select through :class:`ChunkKV`,
which calls the unchecked kernel dispatchers (its inputs are checked once here, with no host
sync). The per-layer budgets of PyramidKV live here too, since ``ChunkKV(layer_budgets=
"pyramid")`` and the ``PyramidKV`` baseline share them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import reference
from ..ops._checks import check_bool, check_chunking, check_int, check_pool_kernel
from ..ops.kernels.chunk_sum import _chunk_sum
from ..ops.kernels.select_chunks import _select_chunks
from ..ops.kernels.window_scores import (
    _window_chunk_scores,
    _window_scores,
    check_window_inputs,
)
from .base import Policy, Selection

LAYER_BUDGETS = ("uniform", "pyramid")


def pyramid_budgets(
    budget: int, num_layers: int, seq_len: int, window: int, beta: float = 20.0
) -> list[int]:
    """PyramidKV's per-layer budgets: ``window`` plus a share of ``budget - window`` that
    decreases linearly with depth, from ``2 (L - w) - m`` at layer 0 to ``m = (L - w) / beta``
    at the last layer (capped at ``seq_len``), with the same total as the uniform ``budget``.

    The fractional budgets are rounded by largest remainder (ties: the lower layer), so they sum
    to ``num_layers * budget`` exactly. Falls back to uniform when no pyramid fits (one layer,
    ``budget <= window``, or ``budget >= seq_len``), as PyramidKV does.
    """
    spare = budget - window
    if num_layers == 1 or spare <= 0 or budget >= seq_len:
        return [budget] * num_layers
    low = spare / beta
    high = 2 * spare - low
    if high > seq_len - window:  # layer 0 cannot keep more than the prompt
        high = seq_len - window
        low = 2 * spare - high
    step = (high - low) / (num_layers - 1)
    targets = [window + high - layer * step for layer in range(num_layers)]
    floors = [int(t) for t in targets]
    missing = num_layers * budget - sum(floors)
    by_remainder = sorted(
        range(num_layers), key=lambda layer: (floors[layer] - targets[layer], layer)
    )
    for layer in by_remainder[:missing]:
        floors[layer] += 1
    return floors


def layer_budget(
    mode: str, budget: int, layer: int, num_layers: int, seq_len: int, window: int
) -> int:
    """This layer's budget under ``mode`` (one of :data:`LAYER_BUDGETS`)."""
    if mode == "uniform":
        return budget
    return pyramid_budgets(budget, num_layers, seq_len, window)[layer]


def check_layer_budgets(mode) -> None:
    if mode not in LAYER_BUDGETS:
        raise ValueError(f"layer_budgets must be one of {LAYER_BUDGETS}, got {mode!r}")


def sink_chunk_mask(
    key_mask, batch: int, seq_len: int, sink_tokens: int, chunk_size: int, num_chunks: int, device
) -> torch.Tensor:
    """bool ``[B, 1, n]``: the chunks holding each row's first ``sink_tokens`` real tokens
    (``key_mask`` False marks left padding)."""
    real = (
        torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        if key_mask is None
        else key_mask.bool()
    )
    is_sink = real & (real.cumsum(dim=1) <= sink_tokens)
    is_sink = is_sink[:, : num_chunks * chunk_size].reshape(batch, num_chunks, chunk_size)
    return is_sink.any(dim=-1)[:, None, :]


@dataclass
class ChunkKV(Policy):
    """SPEC steps 1-6 through the kernels.

    The defaults are SPEC. Two options are evaluation variants (``docs/EVAL.md``):
    ``layer_budgets="pyramid"`` spreads the budget over the layers as PyramidKV does, and
    ``sink_tokens > 0`` always keeps the chunks that hold the first ``sink_tokens`` tokens
    (attention sinks), within the same number of chunks.
    """

    chunk_size: int = 10
    window: int = 32
    share_heads: bool = False
    pool_kernel: int = 1
    layer_budgets: str = "uniform"
    sink_tokens: int = 0
    name = "chunkkv"

    def __post_init__(self):
        check_chunking(self.chunk_size, self.window)
        check_pool_kernel(self.pool_kernel)
        check_layer_budgets(self.layer_budgets)
        check_int("sink_tokens", self.sink_tokens, minimum=0)
        check_bool("share_heads", self.share_heads)

    def select_many(
        self,
        q_obs,
        k,
        *,
        budgets,
        layer,
        num_layers,
        key_mask=None,
        scaling=None,
        reduce_scores=None,
    ):
        B, Hkv, T, _ = k.shape
        n_keeps = [
            reference.num_kept_chunks(
                T,
                layer_budget(self.layer_budgets, budget, layer, num_layers, T, self.window),
                self.chunk_size,
                self.window,
            )
            for budget in budgets
        ]
        if all(n_keep is None for n_keep in n_keeps):
            return [None] * len(budgets)
        if q_obs is None or q_obs.shape[2] != self.window:  # P0 below assumes this window
            raise ValueError(
                f"q_obs must hold the last window={self.window} queries, got "
                f"{None if q_obs is None else q_obs.shape[2]}"
            )
        check_window_inputs(q_obs, k, key_mask, scaling)
        if self.pool_kernel == 1:  # steps 1-4 in two launches: no token scores in between
            chunk_scores = _window_chunk_scores(q_obs, k, key_mask, scaling, self.chunk_size)
        else:  # pooling crosses the kernels' key blocks: it runs on the token scores
            scores = _window_scores(q_obs, k, key_mask, scaling, self.pool_kernel)
            chunk_scores = _chunk_sum(scores, self.chunk_size, self.window)
        if self.sink_tokens:
            sinks = sink_chunk_mask(
                key_mask, B, T, self.sink_tokens, self.chunk_size, chunk_scores.shape[2], k.device
            )
            chunk_scores = chunk_scores.masked_fill(sinks, float("inf"))
        if self.share_heads:
            # In a fixed order, so that heads whose scores tie give tied sums (SPEC step 6).
            chunk_scores = reference.sum_in_order(chunk_scores, dim=1)[:, None]
        if reduce_scores is not None:
            chunk_scores = reduce_scores(chunk_scores)
        tail_start = reference.tail_start(T, self.chunk_size, self.window)
        selections = []
        for n_keep in n_keeps:
            if n_keep is None:
                selections.append(None)
                continue
            chunk_idx = _select_chunks(chunk_scores, n_keep, False).expand(B, Hkv, n_keep)
            selections.append(Selection(chunk_idx.contiguous(), self.chunk_size, tail_start))
        return selections

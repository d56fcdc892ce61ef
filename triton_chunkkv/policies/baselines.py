"""The baselines of the ChunkKV paper as selection policies, on the same ``ops`` kernels.

Each one is the ChunkKV pipeline with one piece changed, so that a comparison isolates that
piece:

* ``FullKV``: keeps everything.
* ``StreamingLLM``: the first ``sink_tokens`` tokens and the most recent ones; reads no query.
* ``H2O``: token scores accumulated over every prompt query (not only the last ``window``), the
  ``recent`` last tokens kept dense.
* ``SnapKV``: ChunkKV with one-token chunks and pooled scores.
* ``PyramidKV``: SnapKV with per-layer budgets decreasing with depth, same total.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import ops
from ..ops import reference
from ..ops._checks import check_int, check_pool_kernel
from .base import Policy, Selection
from .chunkkv import ChunkKV


@dataclass
class FullKV(Policy):
    """Keeps the whole prompt: the reference every other policy is compared with."""

    window = 0
    name = "fullkv"

    def select(
        self,
        q_obs,
        k,
        *,
        budget,
        layer,
        num_layers,
        key_mask=None,
        scaling=None,
        reduce_scores=None,
    ):
        return None


@dataclass
class StreamingLLM(Policy):
    """The first ``sink_tokens`` real tokens (attention sinks) plus the most recent
    ``L - sink_tokens`` tokens as the dense tail: exactly ``L`` tokens."""

    sink_tokens: int = 4
    window = 0
    name = "streamingllm"

    def __post_init__(self):
        check_int("sink_tokens", self.sink_tokens, minimum=0)

    def select(
        self,
        q_obs,
        k,
        *,
        budget,
        layer,
        num_layers,
        key_mask=None,
        scaling=None,
        reduce_scores=None,
    ):
        B, Hkv, T, _ = k.shape
        if budget >= T:
            return None
        num_sinks = min(self.sink_tokens, budget)
        tail_start = T - (budget - num_sinks)
        # Rank positions before the tail: real tokens first, earliest first (left padding last).
        positions = torch.arange(tail_start, device=k.device, dtype=torch.float32)
        rank = (tail_start - positions).expand(B, tail_start)
        if key_mask is not None:
            rank = rank.masked_fill(~key_mask[:, :tail_start].bool(), 0.0)
        chunk_idx = ops.select_chunks(
            rank[:, None, :].expand(B, Hkv, tail_start).contiguous(), num_sinks
        )
        return Selection(chunk_idx, 1, tail_start)


@dataclass
class H2O(Policy):
    """Heavy hitters: each token scored by the attention it receives from every prompt query
    (SPEC step 2 with the whole prompt as the window), the ``recent`` last tokens kept dense,
    the best ``L - recent`` others beside them.

    ``select`` needs all ``T`` prompt queries: ``window`` is ``None``.
    """

    recent: int = 32
    pool_kernel: int = 1
    query_block: int = 512
    window = None
    name = "h2o"

    def __post_init__(self):
        check_int("recent", self.recent, minimum=1)
        check_pool_kernel(self.pool_kernel)
        check_int("query_block", self.query_block, minimum=1)

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
        T = k.shape[2]
        if q_obs is None or q_obs.shape[2] != T:
            got = None if q_obs is None else q_obs.shape[2]
            raise ValueError(
                f"H2O scores with every prompt query: q_obs must hold all {T} "
                f"prompt queries, got {got} (pass "
                "observation_window(policy, T) queries)"
            )
        recent = min(self.recent, T)
        n_keeps = [reference.num_kept_chunks(T, budget, 1, recent) for budget in budgets]
        if all(n_keep is None for n_keep in n_keeps):
            return [None] * len(budgets)
        scores = ops.chunk_sum(self.accumulated_attention(q_obs, k, key_mask, scaling), 1, recent)
        if reduce_scores is not None:
            scores = reduce_scores(scores)
        return [
            None if n_keep is None else Selection(ops.select_chunks(scores, n_keep), 1, T - recent)
            for n_keep in n_keeps
        ]

    def accumulated_attention(self, q, k, key_mask, scaling) -> torch.Tensor:
        """float32 ``[B, Hkv, T]``: SPEC step 2 with every prompt query as the window, summed
        over blocks of queries. Queries ``[a, b)`` see keys ``[0, b)`` only, so each block is
        a window over the first ``b`` keys; this skips the masked upper triangle and bounds the
        memory of the reference path to ``query_block * T`` probabilities per head."""
        B, Hkv, T, _ = k.shape
        scores = torch.zeros(B, Hkv, T, dtype=torch.float32, device=k.device)
        for start in range(0, T, self.query_block):
            end = min(start + self.query_block, T)
            scores[..., :end] += ops.window_scores(
                q[:, :, start:end],
                k[:, :, :end],
                scaling=scaling,
                key_mask=None if key_mask is None else key_mask[:, :end],
            )
        return reference.pool_scores(scores, self.pool_kernel)


@dataclass
class SnapKV(ChunkKV):
    """ChunkKV with one-token chunks: the last ``window`` tokens kept dense, the ``L - window``
    best-scoring others beside them, scores average-pooled over ``pool_kernel`` neighbours (5,
    as in SnapKV's and kvpress's defaults; SPEC pools before the window is cut off, SnapKV after,
    which only changes the last ``pool_kernel // 2`` scores before the window)."""

    chunk_size: int = field(default=1, init=False)
    pool_kernel: int = 5
    name = "snapkv"


@dataclass
class PyramidKV(SnapKV):
    """SnapKV with PyramidKV's per-layer budgets (:func:`~triton_chunkkv.policies.
    pyramid_budgets`, ``beta = 20``): more tokens in the lower layers, the same total."""

    layer_budgets: str = field(default="pyramid", init=False)
    name = "pyramidkv"

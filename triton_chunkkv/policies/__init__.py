"""Selection policies: what one layer keeps of its prompt cache.

A policy returns a :class:`Selection` — kept chunks of a fixed size plus the dense tail
``[tail_start, T)`` — so every policy runs through the same gather and sparse-decode kernels.
Token-level policies use ``chunk_size=1`` (``chunk_idx`` then lists kept token positions).
ChunkKV (SPEC.md) is the default; the baselines of the evaluation (FullKV, StreamingLLM, H2O,
SnapKV, PyramidKV) and the ChunkKV variants are registered beside it, and the adapters take any
of them as ``policy=make_policy(name, **options)``.

What "keeps the budget" means, for a prompt of ``T`` tokens and a budget ``L < T`` tokens per
KV head (the kept length is ``n_keep * chunk_size + T - tail_start``, see :func:`kept_length`):

* token-level policies (``chunk_size=1``) keep exactly ``L`` tokens, unless ``L`` is smaller
  than what they always keep (the observation window, or StreamingLLM's sink tokens), which
  they then keep alone;
* chunk-level policies keep whole chunks: ``L - c < kept <= L`` once ``L`` covers the dense tail
  (SPEC step 5), and the tail alone otherwise;
* with per-layer budgets (``PyramidKV``, ``ChunkKV(layer_budgets="pyramid")``) each layer's own
  budget ``L_l`` plays the role of ``L``, and ``sum_l L_l = num_layers * L``.

``L >= T`` keeps everything: ``select`` returns ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import ops
from ..ops import reference
from ..ops._checks import check_chunking, check_int, check_pool_kernel

LAYER_BUDGETS = ("uniform", "pyramid")


class Selection(NamedTuple):
    chunk_idx: torch.Tensor  # int32 [B, Hkv, n_keep], sorted ascending
    chunk_size: int
    tail_start: int


class Policy:
    """Base class.

    ``window`` is how many of the last prompt queries :meth:`select` reads: ``0`` none, ``None``
    every prompt query (H2O); :func:`observation_window` resolves it for a prompt length.
    """

    name = "policy"
    window: int | None = 0

    def select(
        self, q_obs, k, *, budget: int, layer: int, num_layers: int, key_mask=None, scaling=None
    ) -> Selection | None:
        """Chunks to keep for one layer with ``budget`` tokens per KV head; ``None`` keeps all.

        ``q_obs [B, Hq, w, D]`` (``None`` when ``window == 0``), ``k [B, Hkv, T, D]``.
        """
        raise NotImplementedError

    def select_many(
        self, q_obs, k, *, budgets, layer: int, num_layers: int, key_mask=None, scaling=None
    ) -> list[Selection | None]:
        """:meth:`select` for each of ``budgets``. Scores do not depend on the budget, so the
        scoring policies compute them once here (an evaluation runs several budgets)."""
        return [
            self.select(
                q_obs,
                k,
                budget=budget,
                layer=layer,
                num_layers=num_layers,
                key_mask=key_mask,
                scaling=scaling,
            )
            for budget in budgets
        ]

    def on_prompt(self, input_ids: torch.Tensor) -> None:
        """Called with the prompt's token ids ``[B, T]`` before its prefill. Policies that look
        at the text (``PhraseChunkKV``) read it here; the others ignore it."""


def observation_window(policy: Policy, seq_len: int) -> int:
    """How many of the last prompt queries ``policy.select`` reads for a ``seq_len`` prompt."""
    return seq_len if policy.window is None else policy.window


def select_prompt(
    policy: Policy,
    queries,
    keys,
    *,
    budget: int,
    layer: int,
    num_layers: int,
    input_ids=None,
    scaling=None,
) -> Selection | None:
    """``policy.select`` on one layer's prompt cache, as the adapters call it: ``queries
    [B, Hq, T, D]`` are the prompt's queries, of which the last ``observation_window(policy, T)``
    are read; a prompt shorter than that window keeps everything. ``input_ids`` (if given) go
    to :meth:`Policy.on_prompt` first."""
    T = keys.shape[2]
    window = observation_window(policy, T)
    if T < window:  # the prompt fits in the observation window: nothing to score
        return None
    if input_ids is not None:
        policy.on_prompt(input_ids)
    q_obs = queries[:, :, T - window :] if window else None
    return policy.select(
        q_obs, keys, budget=budget, layer=layer, num_layers=num_layers, scaling=scaling
    )


def kept_length(selection: Selection | None, seq_len: int) -> int:
    """Tokens per KV head that ``selection`` keeps of a ``seq_len`` prompt."""
    if selection is None:
        return seq_len
    return selection.chunk_idx.shape[2] * selection.chunk_size + seq_len - selection.tail_start


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
    """SPEC steps 1-6 through the ``ops`` kernels.

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
        if not isinstance(self.share_heads, bool):
            raise TypeError(f"share_heads must be a bool, got {type(self.share_heads).__name__}")

    def select(self, q_obs, k, *, budget, layer, num_layers, key_mask=None, scaling=None):
        return self.select_many(
            q_obs,
            k,
            budgets=[budget],
            layer=layer,
            num_layers=num_layers,
            key_mask=key_mask,
            scaling=scaling,
        )[0]

    def select_many(self, q_obs, k, *, budgets, layer, num_layers, key_mask=None, scaling=None):
        B, _, T, _ = k.shape
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
        scores = ops.window_scores(
            q_obs, k, key_mask=key_mask, scaling=scaling, pool_kernel=self.pool_kernel
        )
        chunk_scores = ops.chunk_sum(scores, self.chunk_size, self.window)
        if self.sink_tokens:
            sinks = sink_chunk_mask(
                key_mask, B, T, self.sink_tokens, self.chunk_size, chunk_scores.shape[2], k.device
            )
            chunk_scores = chunk_scores.masked_fill(sinks, float("inf"))
        tail_start = reference.tail_start(T, self.chunk_size, self.window)
        return [
            None
            if n_keep is None
            else Selection(
                ops.select_chunks(chunk_scores, n_keep, share_heads=self.share_heads),
                self.chunk_size,
                tail_start,
            )
            for n_keep in n_keeps
        ]


from .baselines import H2O, FullKV, PyramidKV, SnapKV, StreamingLLM  # noqa: E402
from .phrase import PhraseChunkKV  # noqa: E402

POLICIES: dict[str, type[Policy]] = {
    "chunkkv": ChunkKV,
    "chunkkv_phrase": PhraseChunkKV,
    "fullkv": FullKV,
    "streamingllm": StreamingLLM,
    "h2o": H2O,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
}


def make_policy(name: str, **options) -> Policy:
    """A registered policy by name, e.g. ``make_policy("chunkkv", chunk_size=10)``."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {name!r}")
    return POLICIES[name](**options)


__all__ = [
    "H2O",
    "LAYER_BUDGETS",
    "POLICIES",
    "ChunkKV",
    "FullKV",
    "PhraseChunkKV",
    "Policy",
    "PyramidKV",
    "Selection",
    "SnapKV",
    "StreamingLLM",
    "kept_length",
    "make_policy",
    "observation_window",
    "pyramid_budgets",
    "select_prompt",
]

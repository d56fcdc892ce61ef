"""What every selection policy shares: the :class:`Policy` interface, its :class:`Selection`
result, budgets, the observation window, and layer groups for index reuse.

A policy returns a :class:`Selection` (kept chunks of a fixed size plus the dense tail
``[tail_start, T)``), so every policy runs through the same gather and sparse-decode kernels.
Token-level policies use ``chunk_size=1`` (``chunk_idx`` then lists kept token positions).

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

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ..ops import reference

# Called on the scores a policy ranks (after any sum over heads), e.g. an all-reduce across the
# tensor-parallel ranks that hold the other heads; returns scores of the same shape.
ScoreReduce = Callable[[torch.Tensor], torch.Tensor]


class Selection(NamedTuple):
    chunk_idx: torch.Tensor  # int32 [B, Hkv, n_keep], sorted ascending
    chunk_size: int
    tail_start: int


class Policy:
    """Base class: a subclass overrides :meth:`select` or :meth:`select_many` (each defaults
    to the other).

    ``window`` is how many of the last prompt queries :meth:`select` reads: ``0`` none, ``None``
    every prompt query (H2O); :func:`observation_window` resolves it for a prompt length.
    ``reads_text`` policies need the prompt's token ids (:meth:`on_prompt`) before selecting.
    """

    name = "policy"
    window: int | None = 0
    reads_text = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.select is Policy.select and cls.select_many is Policy.select_many:
            raise TypeError(f"{cls.__name__} must override select or select_many")

    def select(
        self,
        q_obs,
        k,
        *,
        budget: int,
        layer: int,
        num_layers: int,
        key_mask=None,
        scaling=None,
        reduce_scores: ScoreReduce | None = None,
    ) -> Selection | None:
        """Chunks to keep for one layer with ``budget`` tokens per KV head; ``None`` keeps all.

        ``q_obs [B, Hq, w, D]`` (``None`` when ``window == 0``), ``k [B, Hkv, T, D]``.
        """
        return self.select_many(
            q_obs,
            k,
            budgets=[budget],
            layer=layer,
            num_layers=num_layers,
            key_mask=key_mask,
            scaling=scaling,
            reduce_scores=reduce_scores,
        )[0]

    def select_many(
        self,
        q_obs,
        k,
        *,
        budgets: Sequence[int],
        layer: int,
        num_layers: int,
        key_mask=None,
        scaling=None,
        reduce_scores: ScoreReduce | None = None,
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
                reduce_scores=reduce_scores,
            )
            for budget in budgets
        ]

    def on_prompt(self, input_ids: torch.Tensor) -> None:
        """Called with the prompt's token ids ``[B, T]`` before its prefill. Policies that look
        at the text (``PhraseChunkKV``) read it here; the others ignore it."""


def observation_window(policy: Policy, seq_len: int) -> int:
    """How many of the last prompt queries ``policy.select`` reads for a ``seq_len`` prompt."""
    return seq_len if policy.window is None else policy.window


def resolve_budget(seq_len: int, budget=None, ratio=None) -> int:
    """``L`` tokens per KV head for a ``seq_len`` prompt: ``budget``, or ``floor(ratio * T)``."""
    return reference.resolve_budget(seq_len, budget, ratio)


def select_prompt(
    policy: Policy,
    queries,
    keys,
    *,
    budgets: Sequence[int],
    layer: int,
    num_layers: int,
    input_ids=None,
    scaling=None,
    reduce_scores: ScoreReduce | None = None,
) -> list[Selection | None]:
    """The policy's selections on one layer's prompt cache, one per budget, as every adapter
    and the evaluation call it: ``queries [B, Hq, T, D]`` are the prompt's queries (or only its
    last ones: at least ``observation_window(policy, T)``), ``keys [B, Hkv, T, D]``. A prompt
    shorter than the window keeps everything. ``input_ids`` (if given) go to
    :meth:`Policy.on_prompt` first. One budget goes through :meth:`Policy.select` (what a
    subclass may override), several through :meth:`Policy.select_many`."""
    T = keys.shape[2]
    window = observation_window(policy, T)
    if T < window:  # the prompt fits in the observation window: nothing to score
        return [None] * len(budgets)
    if queries is not None and queries.shape[2] < window:
        raise ValueError(
            f"{policy.name} reads the last {window} queries of the call that selects (the "
            f"prompt, or in mode='question' the question), got {queries.shape[2]}"
        )
    if input_ids is not None:
        policy.on_prompt(input_ids)
    q_obs = queries[:, :, queries.shape[2] - window :] if window else None
    options = dict(layer=layer, num_layers=num_layers, scaling=scaling)
    if reduce_scores is not None:  # policies written before the hook existed still work
        options["reduce_scores"] = reduce_scores
    if len(budgets) == 1:
        return [policy.select(q_obs, keys, budget=budgets[0], **options)]
    return list(policy.select_many(q_obs, keys, budgets=budgets, **options))


def kept_length(selection: Selection | None, seq_len: int) -> int:
    """Tokens per KV head that ``selection`` keeps of a ``seq_len`` prompt."""
    if selection is None:
        return seq_len
    return selection.chunk_idx.shape[2] * selection.chunk_size + seq_len - selection.tail_start


def group_leader(layer: int, reuse_layers: int) -> int:
    """SPEC Algorithm 2: the layer whose selection ``layer`` uses (itself when it selects)."""
    return reuse_layers * (layer // reuse_layers)

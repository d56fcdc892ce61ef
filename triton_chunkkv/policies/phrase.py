"""ChunkKV with chunk boundaries at phrase boundaries instead of every ``c`` tokens.

The ChunkKV paper names fixed-size chunks as its main limitation: a 10-token chunk may cut a
fact in two and keep half of it. Here a chunk ends after any token whose text holds a phrase
mark (``. , ; : ! ?`` or a newline), and a phrase longer than ``max_chunk`` tokens is cut into
pieces of ``max_chunk``. Chunks are ranked by their mean token score (a long chunk costs more
budget, so the sum would favour it), taken greedily while they fit, and the budget left over is
filled with the best single tokens, so exactly ``L`` tokens are kept. The result is expressed as a
one-token-chunk :class:`Selection`, so it runs through the same gather and decode kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import ops
from ..ops import reference
from ..ops._checks import check_chunking, check_int, check_pool_kernel
from .base import Policy, Selection
from .chunkkv import check_layer_budgets, layer_budget

PHRASE_MARKS = ".,;:!?\n"


@dataclass
class PhraseChunkKV(Policy):
    """Variable-length chunks that follow phrase boundaries (needs the prompt's token ids:
    call :meth:`on_prompt` before the prefill; the evaluation engine does).

    ``tokenizer``: anything with ``decode(list[int]) -> str``. ``layer_budgets="pyramid"``
    spreads the budget over the layers as PyramidKV does; ``sink_tokens`` keeps the first
    tokens (attention sinks) within the budget, as ``ChunkKV``'s option does.
    """

    tokenizer: object = field(default=None, repr=False, compare=False)
    window: int = 32
    max_chunk: int = 20
    pool_kernel: int = 1
    marks: str = PHRASE_MARKS
    layer_budgets: str = "uniform"
    sink_tokens: int = 0
    name = "chunkkv_phrase"
    reads_text = True
    _segments: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _ends_phrase: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not callable(getattr(self.tokenizer, "decode", None)):
            raise TypeError(
                "tokenizer must have a decode(list[int]) method, got "
                f"{type(self.tokenizer).__name__}"
            )
        check_chunking(1, self.window)
        check_int("max_chunk", self.max_chunk, minimum=1)
        check_pool_kernel(self.pool_kernel)
        check_layer_budgets(self.layer_budgets)
        check_int("sink_tokens", self.sink_tokens, minimum=0)

    def on_prompt(self, input_ids: torch.Tensor) -> None:
        self._segments = self.segment_ids(input_ids)

    def ends_phrase(self, token_id: int) -> bool:
        if token_id not in self._ends_phrase:
            text = self.tokenizer.decode([token_id])
            self._ends_phrase[token_id] = any(mark in text for mark in self.marks)
        return self._ends_phrase[token_id]

    def segment_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """int64 ``[B, T]``: each token's chunk number, counted from 0 in every row."""
        ids = input_ids.cpu()
        ends = torch.tensor(
            [[self.ends_phrase(int(t)) for t in row] for row in ids.tolist()], dtype=torch.bool
        ).reshape(ids.shape)
        B, T = ids.shape
        pos = torch.arange(T).expand(B, T)
        starts_phrase = torch.ones(B, T, dtype=torch.bool)
        starts_phrase[:, 1:] = ends[:, :-1]
        phrase_start = torch.where(starts_phrase, pos, 0).cummax(dim=1).values
        starts_chunk = starts_phrase | ((pos - phrase_start) % self.max_chunk == 0)
        return (starts_chunk.long().cumsum(dim=1) - 1).to(input_ids.device)

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
        B, H, T, _ = k.shape
        if self._segments is None or tuple(self._segments.shape) != (B, T):
            raise ValueError(
                "PhraseChunkKV needs the prompt's token ids: call "
                f"policy.on_prompt(input_ids [{B}, {T}]) before the prefill"
            )
        n_keeps = [
            reference.num_kept_chunks(
                T,
                layer_budget(self.layer_budgets, budget, layer, num_layers, T, self.window),
                1,
                self.window,
            )
            for budget in budgets
        ]
        if all(n_keep is None for n_keep in n_keeps):
            return [None] * len(budgets)
        scores = ops.window_scores(
            q_obs, k, key_mask=key_mask, scaling=scaling, pool_kernel=self.pool_kernel
        )
        token_scores = ops.chunk_sum(scores, 1, self.window)  # [B, H, T - window]
        if reduce_scores is not None:
            token_scores = reduce_scores(token_scores)
        segments = self._segments[:, : T - self.window]
        if self.sink_tokens:  # the sinks first, whatever the budget leaves for phrases
            sinks = torch.arange(T - self.window, device=k.device) < self.sink_tokens
            token_scores = token_scores.masked_fill(sinks, float("inf"))
        selections = []
        for n_keep in n_keeps:
            if n_keep is None:
                selections.append(None)
                continue
            kept = self.kept_whole_chunks(token_scores, segments, n_keep)
            # Whole chunks first (infinite priority), then the best single tokens fill the rest.
            priority = token_scores.masked_fill(kept, float("inf"))
            selections.append(Selection(ops.select_chunks(priority, n_keep), 1, T - self.window))
        return selections

    @staticmethod
    def kept_whole_chunks(token_scores, segments, capacity: int) -> torch.Tensor:
        """bool ``[B, H, P]``: the tokens of the chunks with the highest mean score, taken in
        that order while their total length stays within ``capacity``."""
        B, H, P = token_scores.shape
        num_chunks = int(segments.max()) + 1 if P else 0
        index = segments[:, None, :].expand(B, H, P)
        sums = token_scores.new_zeros(B, H, num_chunks).scatter_add_(2, index, token_scores)
        lengths = (
            token_scores.new_zeros(B, 1, num_chunks)
            .scatter_add_(2, segments[:, None, :], token_scores.new_ones(B, 1, P))
            .expand(B, H, num_chunks)
        )
        means = (sums / lengths.clamp(min=1)).masked_fill(lengths == 0, float("-inf"))
        order = torch.sort(means, dim=-1, descending=True, stable=True).indices
        fits = lengths.gather(2, order).cumsum(dim=-1) <= capacity
        chosen = torch.zeros_like(fits).scatter_(2, order, fits)
        return chosen.gather(2, index)

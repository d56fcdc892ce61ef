"""Selection policies: what one layer keeps of its prompt cache.

A policy returns a :class:`Selection` — kept chunks of a fixed size plus the dense tail
``[tail_start, T)`` — so every policy runs through the same gather and sparse-decode kernels.
Token-level policies use ``chunk_size=1``. ChunkKV (SPEC.md) is the default; the adapters take
any registered policy by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import ops
from ..ops import reference


class Selection(NamedTuple):
    chunk_idx: torch.Tensor  # int32 [B, Hkv, n_keep], sorted ascending
    chunk_size: int
    tail_start: int


class Policy:
    """Base class. ``window`` is how many of the last prompt queries :meth:`select` reads
    (0: none)."""

    name = "policy"
    window = 0

    def select(self, q_obs, k, *, budget: int, layer: int, num_layers: int, key_mask=None,
               scaling=None) -> Selection | None:
        """Chunks to keep for one layer with ``budget`` tokens per KV head; ``None`` keeps all.

        ``q_obs [B, Hq, window, D]`` (``None`` when ``window == 0``), ``k [B, Hkv, T, D]``.
        """
        raise NotImplementedError


@dataclass
class ChunkKV(Policy):
    """SPEC steps 1-6 through the ``ops`` kernels."""

    chunk_size: int = 10
    window: int = 32
    share_heads: bool = False
    pool_kernel: int = 1
    name = "chunkkv"

    def select(self, q_obs, k, *, budget, layer, num_layers, key_mask=None, scaling=None):
        T = k.shape[2]
        n_keep = reference.num_kept_chunks(T, budget, self.chunk_size, self.window)
        if n_keep is None:
            return None
        scores = ops.window_scores(q_obs, k, key_mask=key_mask, scaling=scaling,
                                   pool_kernel=self.pool_kernel)
        chunk_scores = ops.chunk_sum(scores, self.chunk_size, self.window)
        chunk_idx = ops.select_chunks(chunk_scores, n_keep, share_heads=self.share_heads)
        return Selection(chunk_idx, self.chunk_size,
                         reference.tail_start(T, self.chunk_size, self.window))


POLICIES: dict[str, type[Policy]] = {"chunkkv": ChunkKV}


def make_policy(name: str, **options) -> Policy:
    """A registered policy by name, e.g. ``make_policy("chunkkv", chunk_size=10)``."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {name!r}")
    return POLICIES[name](**options)

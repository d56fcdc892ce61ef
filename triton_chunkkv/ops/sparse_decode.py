"""Block-sparse decode attention over the retained chunks of an uncompacted cache."""

from __future__ import annotations

from . import reference


def sparse_decode(q, k_cache, v_cache, chunk_idx, chunk_size, tail_start, seq_lens, *,
                  scaling=None, num_splits=None, slot_map=None):
    return reference.sparse_decode(q, k_cache, v_cache, chunk_idx, chunk_size, tail_start,
                                   seq_lens, scaling=scaling, slot_map=slot_map)

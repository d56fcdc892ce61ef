"""Where the ``chunkkv`` backend keeps what decode reads: device tables indexed by request-pool
row, so that a decode step gathers its batch's selections with one indexing op per table (no
host sync, no loop over rows) and a CUDA graph can read them from fixed buffers:
:class:`RowSelections` (sparse mode: the chunks each layer group kept) and :class:`RowBounds`
(dynamic mode: each layer's per-chunk key bounds, from which every decode step picks).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ...policies import Selection


class RowSelections:
    """Per layer group and request-pool row: the kept chunks (``chunk_idx [G, rows, Hkv, n]``,
    the first ``counts[g, r]`` entries valid) and the dense tail's start (``tails [G, rows]``).

    A row with count 0 and tail 0 is dense: ``ops.sparse_decode`` then reads ``[0, seq_len)``,
    i.e. full attention. Every row starts dense, and :meth:`reset` makes it dense again when a new
    request takes it. The chunk dimension grows to the longest selection stored (up to
    ``max_chunks``, which the CUDA-graph buffers fix)."""

    def __init__(self, num_groups: int, num_rows: int, num_kv_heads: int, device):
        self.chunk_idx = torch.zeros(
            num_groups, num_rows, num_kv_heads, 1, dtype=torch.int32, device=device
        )
        self.counts = torch.zeros(num_groups, num_rows, dtype=torch.int32, device=device)
        self.tails = torch.zeros(num_groups, num_rows, dtype=torch.int32, device=device)
        self.max_chunks: int | None = None  # set when decode runs in CUDA graphs

    @property
    def capacity(self) -> int:
        return self.chunk_idx.shape[3]

    def reset(self, row: int) -> None:
        """Every group of ``row`` dense (a new request took the row)."""
        self.counts[:, row] = 0
        self.tails[:, row] = 0

    def store(self, group: int, row: int, selection: Selection | None) -> None:
        """``selection`` (batch dimension 1) for ``row`` in ``group``; ``None``: dense."""
        if selection is None:
            self.counts[group, row] = 0
            self.tails[group, row] = 0
            return
        n = selection.chunk_idx.shape[2]
        if self.max_chunks is not None and n > self.max_chunks:
            raise ValueError(
                f"a selection keeps {n} chunks per KV head, more than the {self.max_chunks} "
                "the CUDA-graph decode buffers hold (their bound assumes a layer keeps at most "
                "twice the budget): disable decode CUDA graphs for this policy"
            )
        if n > self.capacity:
            grown = self.chunk_idx.new_zeros(*self.chunk_idx.shape[:3], n)
            grown[..., : self.capacity] = self.chunk_idx
            self.chunk_idx = grown
        self.chunk_idx[group, row, :, :n] = selection.chunk_idx[0]
        self.counts[group, row] = n
        self.tails[group, row] = selection.tail_start

    def gather(self, rows: torch.Tensor) -> DecodeIndex:
        """The rows ``rows [B]`` of every table (device indexing only)."""
        return DecodeIndex(
            self.chunk_idx.index_select(1, rows),
            self.counts.index_select(1, rows),
            self.tails.index_select(1, rows),
        )

    def gather_into(self, rows: torch.Tensor, out: DecodeIndex) -> None:
        """:meth:`gather` written into ``out``'s first ``len(rows)`` rows and first
        :attr:`capacity` chunk columns (fixed buffers: later columns are never read, since they
        lie past every row's count)."""
        batch, n = rows.shape[0], self.capacity
        out.chunk_idx[:, :batch, :, :n].copy_(self.chunk_idx.index_select(1, rows))
        out.counts[:, :batch].copy_(self.counts.index_select(1, rows))
        out.tails[:, :batch].copy_(self.tails.index_select(1, rows))


class DecodeIndex(NamedTuple):
    """One decode batch's rows of :class:`RowSelections`, per layer group ``g``:
    ``chunk_idx[g] [B, Hkv, n]``, ``counts[g] [B]``, ``tails[g] [B]`` (int32)."""

    chunk_idx: torch.Tensor
    counts: torch.Tensor
    tails: torch.Tensor

    def rows(self, batch: int) -> DecodeIndex:
        return DecodeIndex(self.chunk_idx[:, :batch], self.counts[:, :batch], self.tails[:, :batch])


class RowBounds:
    """Dynamic mode: per layer and request-pool row, the per-dimension key bounds of the
    prompt's whole chunks before its SPEC tail (``kmin``/``kmax [layers, rows, Hkv, n, D]``,
    the KV cache's dtype, the first ``chunk_counts[r]`` chunks of row ``r`` valid), and per row
    the chunks a decode step reads (``keep_counts``) and the dense tail's start (``tails``),
    int32 ``[rows]``.

    Allocated once at full size: ``n = max_chunks``, the whole chunks of a prompt as long as the
    context, so a CUDA graph reads the tables at fixed addresses. That is ``2 / c`` of the keys
    of ``rows`` full-context requests (``2 * layers * rows * Hkv * n * D`` elements). A row with
    all counts 0 is dense (``ops.sparse_decode`` reads ``[0, seq_len)``); :meth:`reset` makes it
    dense again when a new request takes it (its old bounds stay, past every count: never
    read)."""

    def __init__(
        self, num_layers, num_rows, num_kv_heads, max_chunks, head_dim, dtype, device
    ) -> None:
        shape = (num_layers, num_rows, num_kv_heads, max_chunks, head_dim)
        self.kmin = torch.zeros(shape, dtype=dtype, device=device)
        self.kmax = torch.zeros(shape, dtype=dtype, device=device)
        self.chunk_counts = torch.zeros(num_rows, dtype=torch.int32, device=device)
        self.keep_counts = torch.zeros(num_rows, dtype=torch.int32, device=device)
        self.tails = torch.zeros(num_rows, dtype=torch.int32, device=device)

    @property
    def max_chunks(self) -> int:
        return self.kmin.shape[3]

    @property
    def nbytes(self) -> int:
        return 2 * self.kmin.numel() * self.kmin.element_size()

    def reset(self, row: int) -> None:
        """``row`` dense (a new request took the row)."""
        self.chunk_counts[row] = 0
        self.keep_counts[row] = 0
        self.tails[row] = 0

    def store_bounds(self, layer: int, row: int, kmin, kmax) -> None:
        """One layer's bounds ``[Hkv, n, D]`` for ``row`` (its counts are set apart)."""
        n = kmin.shape[1]
        self.kmin[layer, row, :, :n] = kmin
        self.kmax[layer, row, :, :n] = kmax

    def store_counts(self, row: int, chunks: int, keep: int, tail_start: int) -> None:
        """What decode reads of ``row`` once every layer's bounds are stored."""
        self.chunk_counts[row] = chunks
        self.keep_counts[row] = keep
        self.tails[row] = tail_start

    def gather(self, rows: torch.Tensor) -> DynamicRows:
        """The per-row tables' rows ``rows [B]`` (device indexing only)."""
        return DynamicRows(
            self.chunk_counts.index_select(0, rows),
            self.keep_counts.index_select(0, rows),
            self.tails.index_select(0, rows),
        )

    def gather_into(self, rows: torch.Tensor, out: DynamicRows) -> None:
        """:meth:`gather` written into ``out``'s first ``len(rows)`` entries."""
        batch = rows.shape[0]
        for table, buffer in zip((self.chunk_counts, self.keep_counts, self.tails), out):
            buffer[:batch].copy_(table.index_select(0, rows))

    def batch_bounds(self, layer: int, rows: torch.Tensor, width: int):
        """``(kmin, kmax)``, each ``[B, Hkv, width, D]``: layer ``layer``'s bounds of the rows
        ``rows [B]`` (int64), their first ``width`` chunks (one gather each, on the device)."""
        return (
            self.kmin[layer, :, :, :width].index_select(0, rows),
            self.kmax[layer, :, :, :width].index_select(0, rows),
        )


class DynamicRows(NamedTuple):
    """One decode batch's rows of :class:`RowBounds`' per-row tables (int32 ``[B]``)."""

    chunk_counts: torch.Tensor
    keep_counts: torch.Tensor
    tails: torch.Tensor

    def rows(self, batch: int) -> DynamicRows:
        return DynamicRows(*(t[:batch] for t in self))

"""ChunkKV ops: Triton kernels on CUDA (and on CPU under ``TRITON_INTERPRET=1``), the torch
reference otherwise. Semantics: ``SPEC.md``; the reference is :mod:`.reference`."""

from . import reference
from .chunk_sum import chunk_sum
from .compress import compress, compress_layers
from .gather import gather_chunks
from .reference import Compressed
from .select_chunks import select_chunks
from .sparse_decode import sparse_decode
from .window_scores import window_scores

__all__ = [
    "Compressed",
    "chunk_sum",
    "compress",
    "compress_layers",
    "gather_chunks",
    "reference",
    "select_chunks",
    "sparse_decode",
    "window_scores",
]

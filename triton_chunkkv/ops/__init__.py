"""ChunkKV ops: Triton kernels on CUDA (and on CPU under ``TRITON_INTERPRET=1``), the torch
reference otherwise. Semantics: ``SPEC.md``; the reference is :mod:`.reference`; one module per
kernel in :mod:`.kernels`. Every kernel op is also a PyTorch operator,
``torch.ops.triton_chunkkv.<op>`` (:mod:`.library`), so ``torch.compile`` traces the ops without a
graph break."""

from . import library, reference
from .compression import compress, compress_layers
from .kernels.chunk_sum import chunk_sum
from .kernels.decode_select import chunk_bounds, decode_chunk_scores, select_decode_chunks
from .kernels.gather import gather_chunks
from .kernels.select_chunks import select_chunks
from .kernels.sparse_decode import sparse_decode
from .kernels.window_scores import window_chunk_scores, window_scores
from .reference import Compressed

__all__ = [
    "Compressed",
    "chunk_bounds",
    "chunk_sum",
    "compress",
    "compress_layers",
    "decode_chunk_scores",
    "gather_chunks",
    "library",
    "reference",
    "select_chunks",
    "select_decode_chunks",
    "sparse_decode",
    "window_chunk_scores",
    "window_scores",
]

"""triton_chunkkv: ChunkKV KV-cache compression with Triton kernels."""

from . import ops
from .ops import Compressed, compress, compress_layers

__version__ = "0.1.0"
__all__ = ["Compressed", "compress", "compress_layers", "ops"]

"""SGLang integration: the ``chunkkv`` attention backend, registered through SGLang's plugin
entry point (group ``sglang.srt.plugins``, see ``pyproject.toml``).

Importing this package does not import SGLang; :func:`register` (the entry point) does, and the
backend class lives in :mod:`.backend`. Settings: :mod:`.settings`.
"""

from .plugin import BACKEND_NAME, create_backend, register
from .settings import ChunkKVSettings

__all__ = ["BACKEND_NAME", "ChunkKVSettings", "create_backend", "register"]

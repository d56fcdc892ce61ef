"""The ``sglang.srt.plugins`` entry point: registers the ``chunkkv`` attention backend.

SGLang runs every installed general plugin (``load_plugins``) in each of its processes before
it parses the server arguments, so after ``pip install triton-chunkkv[sglang]``,
``python -m sglang.launch_server ... --attention-backend chunkkv`` works unpatched.
"""

from __future__ import annotations

from . import hooks
from .hooks import BACKEND_NAME


def register() -> None:
    """Adds ``chunkkv`` to SGLang's attention backend registry and ``--attention-backend``
    choices, and registers the backend's SGLang hooks (:mod:`.hooks`). Idempotent."""
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    register_attention_backend(BACKEND_NAME)(create_backend)
    hooks.install()


def create_backend(model_runner):
    """SGLang calls this with its ``ModelRunner`` when ``--attention-backend chunkkv``."""
    if model_runner.model_config.is_encoder_decoder:
        raise ValueError("the chunkkv attention backend does not support encoder-decoder models")
    from .backend import ChunkKVAttnBackend  # imports SGLang's Triton kernels: only when used

    return ChunkKVAttnBackend(model_runner)

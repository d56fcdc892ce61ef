"""Policies by name: what ``make_policy``, the evaluation's ``--methods`` and the SGLang
backend's ``CHUNKKV_POLICY`` accept."""

from __future__ import annotations

from .base import Policy
from .baselines import H2O, FullKV, PyramidKV, SnapKV, StreamingLLM
from .chunkkv import ChunkKV
from .phrase import PhraseChunkKV

POLICIES: dict[str, type[Policy]] = {
    "chunkkv": ChunkKV,
    "chunkkv_phrase": PhraseChunkKV,
    "fullkv": FullKV,
    "streamingllm": StreamingLLM,
    "h2o": H2O,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
}


def make_policy(name: str, **options) -> Policy:
    """A registered policy by name, e.g. ``make_policy("chunkkv", chunk_size=10)``."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {name!r}")
    return POLICIES[name](**options)

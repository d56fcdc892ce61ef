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


def chunk_policy(policy, *, chunk_size=10, window=32, share_heads=False, pool_kernel=1) -> Policy:
    """What an adapter selects with: ``policy`` itself (a :class:`Policy`), or ``ChunkKV``
    built from the chunk options when ``policy`` is ``None``. Passing both is an error."""
    chunk_options = dict(
        chunk_size=chunk_size, window=window, share_heads=share_heads, pool_kernel=pool_kernel
    )
    if policy is None:
        return ChunkKV(**chunk_options)  # validates the options
    if not isinstance(policy, Policy):
        raise TypeError(
            f"policy must be a triton_chunkkv.policies.Policy or None, got {type(policy).__name__}"
        )
    changed = [
        name
        for name, value in chunk_options.items()
        if value != ChunkKV.__dataclass_fields__[name].default
    ]
    if changed:
        raise ValueError(
            f"pass either policy or the ChunkKV options {changed}, not both: "
            "set them on the policy instead"
        )
    return policy

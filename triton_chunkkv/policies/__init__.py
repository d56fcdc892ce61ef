"""Selection policies: what one layer keeps of its prompt cache.

ChunkKV (SPEC.md) is the default; the baselines of the evaluation (FullKV, StreamingLLM, H2O,
SnapKV, PyramidKV) and the ChunkKV variants are registered beside it, and the adapters take any
of them as ``policy=make_policy(name, **options)``. The interface and what "keeps the budget"
means: :mod:`.base`.
"""

from .base import (
    Policy,
    ScoreReduce,
    Selection,
    group_leader,
    kept_length,
    observation_window,
    resolve_budget,
    select_prompt,
)
from .baselines import H2O, FullKV, PyramidKV, SnapKV, StreamingLLM
from .chunkkv import LAYER_BUDGETS, ChunkKV, pyramid_budgets
from .phrase import PhraseChunkKV
from .registry import POLICIES, chunk_policy, make_policy

__all__ = [
    "H2O",
    "LAYER_BUDGETS",
    "POLICIES",
    "ChunkKV",
    "FullKV",
    "PhraseChunkKV",
    "Policy",
    "PyramidKV",
    "ScoreReduce",
    "Selection",
    "SnapKV",
    "StreamingLLM",
    "chunk_policy",
    "group_leader",
    "kept_length",
    "make_policy",
    "observation_window",
    "pyramid_budgets",
    "resolve_budget",
    "select_prompt",
]

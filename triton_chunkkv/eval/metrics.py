"""Scores: answer exact match, per-layer fidelity to the full cache, index overlap.

Fidelity (the paper's appendix A), per layer, for a compressed cache against the full one, on
the same continuation (the full-cache model's own greedy answer, teacher-forced):

* ``attn_output_l1``: mean absolute difference of the continuation's attention outputs
  (``softmax(q k^T) v`` before ``o_proj``, every head and dimension);
* ``kv_l1``: mean absolute difference of the keys and values the continuation writes (0 in the
  first layer, then the drift that compression causes downstream);
* ``attn_cosine``: cosine similarity of the continuation's attention distributions over the
  original positions (dropped positions count as 0 in the compressed one), averaged over query
  heads and continuation tokens.

``adjacent_jaccard``: for each pair of adjacent layers, the Jaccard similarity of the prompt
positions each KV head selects beside its dense tail (``chunk_idx`` as tokens), averaged over
heads: how much layer-wise index reuse (SPEC Algorithm 2) would change (the paper's Table 3).
"""

from __future__ import annotations

import re

import torch

from ..policies import Selection
from .engine import Trace, kept_positions
from .tasks import Example


def first_number(text: str) -> str | None:
    found = re.search(r"\d+", text)
    return found.group() if found else None


def first_candidate(text: str, candidates) -> str | None:
    """The candidate mentioned first in ``text`` (whole words, case-insensitive)."""
    hits = [
        (m.start(), c)
        for c in candidates
        for m in [re.search(rf"\b{re.escape(c)}\b", text, flags=re.IGNORECASE)]
        if m
    ]
    return min(hits)[1] if hits else None


def extracted_answer(example: Example, text: str) -> str | None:
    """What the generation ``text`` answers, read as ``example.scoring`` says."""
    if example.scoring == "first_number":
        return first_number(text)
    if example.scoring == "candidate":
        return first_candidate(text, example.candidates)
    if example.scoring == "answer_is":
        found = re.search(r"answer is\D*(\d+)", text, flags=re.IGNORECASE)
        return found.group(1) if found else None
    raise ValueError(f"unknown scoring {example.scoring!r}")


def is_correct(example: Example, text: str) -> bool:
    return extracted_answer(example, text) == example.answer


def spread_probs(probs: torch.Tensor, positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``probs [1, Hq, n, kept + n]`` over a compacted cache, put back on the original
    ``seq_len + n`` positions (zeros where a key was dropped). ``positions [1, Hkv or 1, kept]``
    are the prompt positions of the kept keys."""
    _, Hq, n, _ = probs.shape
    prompt = positions.repeat_interleave(Hq // positions.shape[1], dim=1)  # [1, Hq, kept]
    generated = torch.arange(seq_len, seq_len + n, device=probs.device).expand(1, Hq, n)
    index = torch.cat([prompt, generated], dim=-1)[:, :, None, :].expand(-1, -1, n, -1)
    return probs.new_zeros(1, Hq, n, seq_len + n).scatter_(3, index, probs)


def layer_fidelity(full: Trace, compressed: Trace, selections, seq_len: int) -> dict:
    """The three per-layer lists of the module docstring."""
    out = {"attn_output_l1": [], "kv_l1": [], "attn_cosine": []}
    for layer, selection in enumerate(selections):
        out["attn_output_l1"].append(
            (compressed.outputs[layer] - full.outputs[layer]).abs().mean().item()
        )
        out["kv_l1"].append(
            0.5
            * (
                (compressed.keys[layer] - full.keys[layer]).abs().mean()
                + (compressed.values[layer] - full.values[layer]).abs().mean()
            ).item()
        )
        positions = kept_positions(selection, seq_len, full.probs[layer].device)
        spread = spread_probs(compressed.probs[layer], positions, seq_len)
        cosine = torch.nn.functional.cosine_similarity(spread, full.probs[layer].float(), dim=-1)
        out["attn_cosine"].append(cosine.mean().item())
    return out


def selected_mask(selection: Selection, seq_len: int) -> torch.Tensor:
    """bool ``[B, Hkv, T]``: the positions of the chosen chunks (the dense tail excluded)."""
    chunk_idx = selection.chunk_idx.long()
    B, H, _ = chunk_idx.shape
    offsets = torch.arange(selection.chunk_size, device=chunk_idx.device)
    positions = (chunk_idx[..., None] * selection.chunk_size + offsets).reshape(B, H, -1)
    mask = torch.zeros(B, H, seq_len, dtype=torch.bool, device=chunk_idx.device)
    return mask.scatter_(2, positions, True)


def adjacent_jaccard(selections, seq_len: int) -> list[float | None]:
    """Per adjacent pair ``(l, l + 1)``: mean over KV heads of ``|A & B| / |A | B|`` of the
    selected positions; ``None`` when either layer keeps everything, 1.0 when both select
    nothing beside the tail."""
    out = []
    for a, b in zip(selections, selections[1:]):
        if a is None or b is None:
            out.append(None)
            continue
        mask_a, mask_b = selected_mask(a, seq_len), selected_mask(b, seq_len)
        union = (mask_a | mask_b).sum(dim=-1).float()
        inter = (mask_a & mask_b).sum(dim=-1).float()
        out.append(torch.where(union > 0, inter / union.clamp(min=1), 1.0).mean().item())
    return out

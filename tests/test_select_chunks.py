"""``ops.select_chunks`` (SPEC step 6): the selection kernel (one launch, a bitwise search for
the ``n_keep``-th largest score, no sort) against the reference's two stable sorts.

On CPU the kernel runs in the Triton interpreter with NaN-poisoned (-1) outputs (``conftest``).
Ties go to the lower chunk index, NaN ranks above every number, ``-0.0`` ties with ``0.0``.
"""

import math

import pytest
import torch

from triton_chunkkv import ops
from triton_chunkkv.ops import reference
from triton_chunkkv.ops._runtime import use_triton
from triton_chunkkv.ops.kernels import select_chunks as select_kernel


def assert_matches_reference(scores, n_keep, share_heads=False):
    assert use_triton(scores)
    out = ops.select_chunks(scores, n_keep, share_heads=share_heads)
    expected = reference.select_chunks(scores, n_keep, share_heads=share_heads)
    assert out.dtype == torch.int32 and out.is_contiguous()
    assert torch.equal(out, expected), (out, expected)
    return out


def special_values(batch=2, heads=3, n=40, seed=0):
    """Small integers (many ties), with NaN, +-inf and -0.0 in some rows."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(-2, 3, (batch, heads, n), generator=generator).float()
    scores[0, 0, [3, 17, 30]] = math.nan
    scores[0, 1, [5, 6]] = math.inf
    scores[1, 1, [0, 9, 22]] = -math.inf
    scores[1, 2, [1, 4, 8]] = -0.0
    scores[1, 2, [2, 7]] = 0.0
    return scores


@pytest.mark.parametrize("share_heads", [False, True])
@pytest.mark.parametrize("n_keep", [0, 1, 7, 20, 39, 40])
def test_special_values_and_ties(n_keep, share_heads):
    assert_matches_reference(special_values(), n_keep, share_heads)


@pytest.mark.parametrize("share_heads", [False, True])
def test_rows_longer_than_one_tile(monkeypatch, share_heads):
    """Rows past the kernel's block walk it in tiles, carrying the tie and slot counts."""
    monkeypatch.setattr(select_kernel, "INTERPRET_MAX_BLOCK", 16)
    scores = special_values(n=70, seed=1)
    for n_keep in (1, 15, 16, 17, 33, 69, 70):
        assert_matches_reference(scores, n_keep, share_heads)


def test_all_equal_and_all_nan_rows_keep_their_first_chunks():
    for value in (0.25, math.nan, -math.inf, 0.0):
        scores = torch.full((2, 2, 50), value)
        out = assert_matches_reference(scores, 12)
        assert torch.equal(out, torch.arange(12, dtype=torch.int32).expand(2, 2, 12))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_scores(dtype):
    scores = torch.rand(2, 2, 33).to(dtype)  # 16-bit: many values collide
    for n_keep in (4, 16):
        assert_matches_reference(scores, n_keep)
        assert_matches_reference(scores, n_keep, share_heads=True)


def test_strided_scores():
    scores = special_values(n=31).transpose(1, 2).contiguous().transpose(1, 2)
    assert not scores.is_contiguous()
    assert_matches_reference(scores, 9)
    assert_matches_reference(special_values(n=60)[..., ::2], 9, share_heads=True)


def test_random_scores_and_empty_shapes():
    for n, n_keep in ((1, 1), (2, 1), (100, 10), (257, 30), (5, 0)):
        assert_matches_reference(torch.randn(3, 2, n), n_keep)
    assert ops.select_chunks(torch.rand(0, 2, 5), 2).shape == (0, 2, 2)
    assert ops.select_chunks(torch.rand(2, 2, 0), 0).shape == (2, 2, 0)


def test_periodic_keys_tie_on_both_paths(monkeypatch):
    """Periodic keys give bit-equal chunk scores on the reference path (``test_bad_input``);
    both selections keep the lowest chunks from them. (The interpreter's own scores of such
    keys can miss a tie by an ulp: its float32 ``tl.dot`` is numpy's BLAS matmul,
    ``docs/DESIGN.md``, "Ties".)"""
    from test_bad_input import periodic_keys

    q_obs, k = periodic_keys(2, 4, 5, 80, seed=0)
    with monkeypatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "0")
        sums = ops.chunk_sum(ops.window_scores(q_obs, k), 5, 8)
        on_reference = ops.select_chunks(sums, 26)
    assert all(row.unique().numel() == 1 for row in sums.flatten(0, 1))
    on_kernel = ops.select_chunks(sums, 26)
    expected = torch.arange(26, dtype=torch.int32).expand(2, 4, 26)
    assert torch.equal(on_kernel, expected) and torch.equal(on_reference, expected)

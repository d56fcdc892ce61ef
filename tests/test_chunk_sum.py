"""``ops.chunk_sum`` (SPEC steps 3-4): the Triton kernel against the reference.

On CPU the kernel runs in the Triton interpreter with NaN-poisoned outputs (``conftest``).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from triton_chunkkv import ops
from triton_chunkkv.ops import reference
from triton_chunkkv.ops._runtime import use_triton


def assert_matches_reference(scores, chunk_size, window):
    assert use_triton(scores)
    out = ops.chunk_sum(scores, chunk_size, window)
    expected = reference.chunk_sum(scores, chunk_size, window)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    return out


def random_scores(batch, heads, seq_len, dtype=torch.float32, device="cpu"):
    # Positive like real token scores, with a spread of magnitudes.
    return torch.rand(batch, heads, seq_len, device=device).pow(3).mul(4).to(dtype)


# (seq_len, chunk_size, window): T - w with and without a remainder mod c, w = 1 and w = T.
CASES = [
    (100, 10, 32),
    (107, 10, 32),
    (90, 10, 1),
    (64, 16, 16),
    (75, 16, 8),
    (33, 1, 1),
    (40, 1, 40),
    (12, 10, 3),
    (9, 10, 1),
    (500, 100, 32),  # c > the kernel's column tile
]


@pytest.mark.parametrize("seq_len,chunk_size,window", CASES)
def test_matches_reference(seq_len, chunk_size, window):
    out = assert_matches_reference(random_scores(3, 2, seq_len), chunk_size, window)
    assert out.shape[-1] == (seq_len - window) // chunk_size


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_scores_sum_in_float32(dtype):
    assert_matches_reference(random_scores(2, 3, 95, dtype), 10, 16)


def test_strided_scores():
    # [B, T, H] buffer seen as [B, H, T], and every other position of a longer row.
    assert_matches_reference(random_scores(3, 57, 2).transpose(1, 2), 10, 4)
    assert_matches_reference(random_scores(2, 2, 150)[..., ::2], 16, 8)


def test_no_whole_chunk_before_the_tail():
    out = assert_matches_reference(random_scores(2, 2, 20), 10, 15)
    assert out.shape == (2, 2, 0)


def test_sums_window_scores():
    q_obs, k = torch.randn(2, 4, 8, 64), torch.randn(2, 2, 61, 64)
    assert_matches_reference(ops.window_scores(q_obs, k), 10, 8)


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(0, 3),
    heads=st.integers(1, 3),
    seq_len=st.integers(1, 300),
    chunk_size=st.integers(1, 80),
    window_fraction=st.floats(0.0, 1.0),
)
def test_property_random_shapes(batch, heads, seq_len, chunk_size, window_fraction):
    window = 1 + int(window_fraction * (seq_len - 1))
    assert_matches_reference(random_scores(batch, heads, seq_len), chunk_size, window)


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((torch.rand(2, 30), 10, 4), ValueError, "scores"),
        ((torch.rand(2, 2, 30).numpy(), 10, 4), TypeError, "scores"),
        ((torch.randint(0, 5, (2, 2, 30)), 10, 4), TypeError, "scores"),
        ((torch.rand(2, 2, 30), 0, 4), ValueError, "chunk_size"),
        ((torch.rand(2, 2, 30), 2.5, 4), TypeError, "chunk_size"),
        ((torch.rand(2, 2, 30), 10, 0), ValueError, "window"),
        ((torch.rand(2, 2, 30), 10, 31), ValueError, "window"),
        ((torch.rand(2, 2, 30), 10, None), TypeError, "window"),
    ],
)
def test_rejects_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        ops.chunk_sum(*args)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "seq_len,chunk_size,window", CASES + [(32_768, 10, 32), (100_003, 16, 64), (4096, 300, 32)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_cuda(seq_len, chunk_size, window, dtype):
    assert_matches_reference(random_scores(3, 8, seq_len, dtype, device="cuda"), chunk_size, window)

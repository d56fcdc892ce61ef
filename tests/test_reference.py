"""The torch reference against SPEC.md, on tiny examples worked out by hand."""

import math

import pytest
import torch

from triton_chunkkv.ops import reference

# ---------------------------------------------------------------------------------------------
# Steps 1-2: window attention and token scores
# ---------------------------------------------------------------------------------------------


def one_dim_keys(*values):
    """``k [1, 1, T, 1]`` with the given scalars: with ``q = 1`` and ``scaling = 1`` the logits
    are the keys themselves."""
    return torch.tensor(values).view(1, 1, -1, 1)


def test_window_probs_are_causal_softmax():
    k = one_dim_keys(0.0, math.log(2), math.log(3))
    q_obs = torch.ones(1, 1, 2, 1)  # window queries at positions 1 and 2
    probs = reference.window_probs(q_obs, k, scaling=1.0)
    expected = torch.tensor([[1 / 3, 2 / 3, 0.0], [1 / 6, 2 / 6, 3 / 6]])
    torch.testing.assert_close(probs[0, 0], expected)
    assert probs.dtype == torch.float32


def test_window_probs_of_a_query_without_keys_are_zero():
    """Left padding can hide every key a window query sees: zeros, not NaN."""
    k = one_dim_keys(1.0, 2.0, 3.0)
    key_mask = torch.tensor([[False, False, True]])
    probs = reference.window_probs(torch.ones(1, 1, 2, 1), k, key_mask=key_mask, scaling=1.0)
    assert torch.equal(probs[0, 0], torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))


def test_window_probs_default_scaling():
    """``scaling = D ** -0.5``: with D = 4, keys of ones give ``<q, k> = 4``, a logit of 2."""
    k = torch.tensor([0.0, 1.0]).view(1, 1, 2, 1).expand(1, 1, 2, 4)
    probs = reference.window_probs(torch.ones(1, 1, 1, 4), k)
    torch.testing.assert_close(probs[0, 0, 0], torch.softmax(torch.tensor([0.0, 2.0]), 0))


def test_token_scores_sum_window_and_average_group():
    # B=1, Hq=2 (one KV head, g=2), w=2, T=3.
    probs = torch.tensor([[[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]]])
    scores = reference.token_scores(probs, num_kv_heads=1)
    # head 0 sums to [0.7, 0.8, 0.5], head 1 to [1, 0, 1]; their mean:
    torch.testing.assert_close(scores, torch.tensor([[[0.85, 0.4, 0.75]]]))


def test_pooling_averages_with_zero_padding_and_divisor_p():
    probs = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    pooled = reference.token_scores(probs, num_kv_heads=1, pool_kernel=3)
    torch.testing.assert_close(pooled[0, 0], torch.tensor([1.0, 2.0, 3.0, 7 / 3]))


@pytest.mark.parametrize("pool_kernel", [3, 5, 7])
def test_pooling_equals_avg_pool1d(pool_kernel):
    probs = torch.rand(2, 6, 4, 23)
    pooled = reference.token_scores(probs, num_kv_heads=3, pool_kernel=pool_kernel)
    plain = reference.token_scores(probs, num_kv_heads=3)
    expected = torch.nn.functional.avg_pool1d(plain, pool_kernel, 1, pool_kernel // 2)
    torch.testing.assert_close(pooled, expected)
    by_hand = torch.nn.functional.pad(plain, (pool_kernel // 2,) * 2).unfold(-1, pool_kernel, 1)
    torch.testing.assert_close(pooled, by_hand.sum(-1) / pool_kernel)


# ---------------------------------------------------------------------------------------------
# Steps 3-6: tail, chunks, how many, which
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seq_len, chunk_size, window, expected",
    [
        (100, 10, 32, 60),  # T - w = 68: the 8 tokens before the window join the tail
        (42, 10, 32, 10),  # T - w = 10: the tail is exactly the window
        (40, 10, 32, 0),  # T - w = 8: no whole chunk
        (32, 10, 32, 0),  # the window is the prompt
        (50, 1, 7, 43),  # token level: the tail is the window
        (97, 16, 64, 32),
    ],
)
def test_tail_start(seq_len, chunk_size, window, expected):
    assert reference.tail_start(seq_len, chunk_size, window) == expected


def test_tail_length_bounds():
    """``tail_len`` lies in ``[w, w + c - 1]`` and ``P0`` is a whole number of chunks."""
    for chunk_size in range(1, 12):
        for window in range(1, 20):
            for seq_len in range(window, 60):
                p0 = reference.tail_start(seq_len, chunk_size, window)
                assert p0 % chunk_size == 0
                assert window <= seq_len - p0 <= window + chunk_size - 1


def test_chunk_sum():
    scores = torch.arange(12.0).view(1, 1, 12)  # T=12, c=3, w=4: P0 = 6, two chunks
    sums = reference.chunk_sum(scores, chunk_size=3, window=4)
    assert torch.equal(sums, torch.tensor([[[0.0 + 1 + 2, 3.0 + 4 + 5]]]))


@pytest.mark.parametrize(
    "budget, expected",
    [
        (1000, None),  # L > T: identity
        (100, None),  # L == T
        (99, 5),  # floor((99 - 40) / 10)
        (69, 2),
        (50, 1),
        (49, 0),
        (40, 0),  # exactly the tail
        (10, 0),  # below the tail: clamped to 0, the tail is still kept
        (0, 0),
    ],
)
def test_num_kept_chunks(budget, expected):
    # T=100, c=10, w=32: P0=60, tail_len=40, n=6 chunks.
    assert reference.num_kept_chunks(100, budget, 10, 32) == expected


def test_resolve_budget_floors_the_ratio():
    assert reference.resolve_budget(100, budget=7) == 7
    assert reference.resolve_budget(99, ratio=0.5) == 49
    assert reference.resolve_budget(10, ratio=0.29) == 2


@pytest.mark.parametrize(
    "n_keep, expected",
    [(0, []), (1, [1]), (2, [1, 2]), (3, [1, 2, 4]), (4, [1, 2, 3, 4]), (5, [0, 1, 2, 3, 4])],
)
def test_select_ties_go_to_the_lower_index(n_keep, expected):
    scores = torch.tensor([[[1.0, 3.0, 3.0, 2.0, 3.0]]])
    chunk_idx = reference.select_chunks(scores, n_keep)
    assert chunk_idx.dtype == torch.int32
    assert chunk_idx.tolist() == [[expected]]


def test_select_returns_ascending_indices():
    scores = torch.tensor([[[5.0, 1.0, 4.0, 9.0], [0.0, 2.0, 1.0, 3.0]]])
    assert reference.select_chunks(scores, 2).tolist() == [[[0, 3], [1, 3]]]


def test_select_shared_heads():
    scores = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]])  # summed: [1, 0, 2]
    assert reference.select_chunks(scores, 1, share_heads=True).tolist() == [[[2], [2]]]
    assert reference.select_chunks(scores, 1).tolist() == [[[0], [2]]]


# ---------------------------------------------------------------------------------------------
# Step 7 and the whole layer
# ---------------------------------------------------------------------------------------------


def test_kept_positions_and_gather():
    chunk_idx = torch.tensor([[[0, 2]]], dtype=torch.int32)  # T=7, c=2, tail [6, 7)
    positions = reference.kept_positions(chunk_idx, 2, 6, 7)
    assert positions.tolist() == [[[0, 1, 4, 5, 6]]]
    k = torch.arange(7.0).view(1, 1, 7, 1).expand(1, 1, 7, 2)
    k_out, v_out = reference.gather_chunks(k, -k, chunk_idx, 2, 6)
    assert k_out[0, 0, :, 0].tolist() == [0.0, 1.0, 4.0, 5.0, 6.0]
    assert torch.equal(v_out, -k_out)


def test_compress_keeps_the_attended_chunk():
    # T=13, c=3, w=2: P0 = 9, tail [9, 13), chunks [0,3) [3,6) [6,9). The window queries
    # attend to the keys of chunk 1 only; a budget of 7 keeps one chunk beside the tail.
    keys = torch.zeros(13)
    keys[3:6] = 20.0
    k = keys.view(1, 1, 13, 1)
    v = torch.arange(13.0).view(1, 1, 13, 1)
    out = reference.compress(
        torch.ones(1, 1, 2, 1), k, v, budget=7, chunk_size=3, window=2, scaling=1.0
    )
    assert out.tail_start == 9
    assert out.chunk_idx.tolist() == [[[1]]]
    assert out.values[0, 0, :, 0].tolist() == [3.0, 4.0, 5.0, 9.0, 10.0, 11.0, 12.0]


def test_compress_identity_when_budget_covers_prompt():
    q_obs, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 25, 8), torch.randn(2, 2, 25, 8)
    out = reference.compress(q_obs, k, v, budget=25, chunk_size=10, window=3)
    assert out.keys is k and out.values is v and out.tail_start == 20
    assert out.chunk_idx.tolist() == [[[0, 1]] * 2] * 2


def test_compress_layers_reuses_the_leaders_indices():
    layers = [
        (torch.randn(1, 2, 4, 8), torch.randn(1, 1, 30, 8), torch.randn(1, 1, 30, 8))
        for _ in range(3)
    ]
    layers[1] = (None, *layers[1][1:])
    out = reference.compress_layers(layers, reuse_layers=2, budget=14, chunk_size=5, window=4)
    assert torch.equal(out[1].chunk_idx, out[0].chunk_idx)
    positions = reference.kept_positions(out[0].chunk_idx, 5, out[0].tail_start, 30)
    assert torch.equal(out[1].keys[0, 0], layers[1][1][0, 0, positions[0, 0]])
    assert out[2].chunk_idx.shape == out[0].chunk_idx.shape  # layer 2 leads its own group


# ---------------------------------------------------------------------------------------------
# Decode over retained chunks
# ---------------------------------------------------------------------------------------------


def test_retained_mask():
    chunk_idx = torch.tensor([[[1], [0]]], dtype=torch.int32)  # c=2, tail [4, 6)
    mask = reference.retained_mask(chunk_idx, 2, 4, 6, max_len=8)
    assert mask.int().tolist() == [[[0, 0, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 1, 1, 0, 0]]]


def test_retained_mask_per_row_tail_and_chunk_counts():
    chunk_idx = torch.tensor([[[0, 2]], [[1, 2]]], dtype=torch.int32)
    mask = reference.retained_mask(
        chunk_idx,
        2,
        torch.tensor([6, 4]),
        torch.tensor([7, 5]),
        max_len=8,
        chunk_counts=torch.tensor([2, 1]),
    )
    assert mask.int().tolist() == [[[1, 1, 0, 0, 1, 1, 1, 0]], [[0, 0, 1, 1, 1, 0, 0, 0]]]


def test_sparse_decode_equals_attention_over_the_compacted_cache():
    """SPEC: attention over ``R(b, h)`` of the uncompacted cache equals attention over the
    step-7 cache followed by the generated tokens."""
    B, Hkv, g, T, new, D, c = 2, 2, 3, 23, 4, 8, 5
    k, v = torch.randn(B, Hkv, T + new, D), torch.randn(B, Hkv, T + new, D)
    chunk_idx = torch.tensor([[[0, 2], [1, 3]], [[2, 3], [0, 1]]], dtype=torch.int32)
    tail_start = 20
    q = torch.randn(B, Hq := g * Hkv, D)
    out = reference.sparse_decode(q, k, v, chunk_idx, c, tail_start, T + new)

    kept_k, kept_v = reference.gather_chunks(k[:, :, :T], v[:, :, :T], chunk_idx, c, tail_start)
    keys = torch.cat([kept_k, k[:, :, T:]], dim=2).repeat_interleave(g, dim=1)
    values = torch.cat([kept_v, v[:, :, T:]], dim=2).repeat_interleave(g, dim=1)
    probs = torch.softmax(torch.einsum("bhd,bhtd->bht", q, keys) * D**-0.5, dim=-1)
    torch.testing.assert_close(out, torch.einsum("bht,bhtd->bhd", probs, values))
    assert out.shape == (B, Hq, D)


def test_ratio_budget_is_the_floor_of_the_decimal_ratio():
    # The float product 0.29 * 100 is 28.999...; SPEC's floor(r * T) of the ratio as written is 29.
    assert reference.resolve_budget(100, ratio=0.29) == 29
    assert reference.resolve_budget(100, ratio=0.57) == 57
    assert reference.resolve_budget(996, ratio=0.2) == 199
    assert reference.resolve_budget(7, ratio=1) == 7


# ---------------------------------------------------------------------------------------------
# Ties and NaN (docs/DESIGN.md)
# ---------------------------------------------------------------------------------------------


def test_sum_in_order_gives_equal_sums_for_equal_inputs():
    """torch's sum over a strided dim orders a vectorized body and its remainder differently;
    adding slice by slice, every output element adds its inputs in the same order."""
    column = torch.rand(9, 1, dtype=torch.float32)
    x = column.expand(9, 1000).contiguous()  # every column holds the same nine values
    total = reference.sum_in_order(x, dim=0)
    assert total.unique().numel() == 1
    torch.testing.assert_close(total, x.sum(dim=0))
    assert reference.sum_in_order(torch.ones(2, 0, 3), dim=1).shape == (2, 3)


def test_window_probs_propagate_nan():
    """A NaN key the query sees makes its whole row NaN, as torch.softmax does; a NaN key it
    does not see (after its position) changes nothing."""
    k = one_dim_keys(0.0, 1.0, float("nan"))
    probs = reference.window_probs(torch.ones(1, 1, 2, 1), k, scaling=1.0)
    assert probs[0, 0, 0, :2].tolist() == pytest.approx(
        torch.softmax(torch.tensor([0.0, 1.0]), 0).tolist()
    )
    assert probs[0, 0, 0, 2] == 0
    assert probs[0, 0, 1].isnan().all()


def test_sparse_decode_of_an_empty_retained_set_is_zero_even_for_a_nan_query():
    q = torch.full((1, 1, 4), float("nan"))
    k = torch.randn(1, 1, 6, 4)
    chunk_idx = torch.zeros(1, 1, 0, dtype=torch.int32)
    out = reference.sparse_decode(q, k, k, chunk_idx, 2, 6, 6)
    assert torch.equal(out, torch.zeros(1, 1, 4))
    assert reference.sparse_decode(q, k, k, chunk_idx, 2, 4, 6).isnan().all()

"""Decode-time chunk selection: Quest-style key bounds, the chunk-score kernel (through the
interpreter, NaN-poisoned outputs) against a float64 formula written here, and the top chunks
handed to ``sparse_decode``."""

import pytest
import torch

from triton_chunkkv import ops
from triton_chunkkv.ops import reference

TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-4),
    torch.float16: dict(rtol=1e-3, atol=1e-2),
    torch.bfloat16: dict(rtol=1e-3, atol=1e-2),
}


def float64_scores(q, k, chunk_size, num_chunks, chunk_counts=None):
    """The bound from its definition: per query head and chunk, ``sum_d max(q_d * min_d,
    q_d * max_d)`` over the chunk's keys, then the largest over the KV head's group."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    out = torch.full((B, Hkv, num_chunks), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for h in range(Hkv):
            for j in range(num_chunks if chunk_counts is None else int(chunk_counts[b])):
                keys = k[b, h, j * chunk_size : (j + 1) * chunk_size].double()
                lo, hi = keys.min(dim=0).values, keys.max(dim=0).values
                queries = q[b, h * g : (h + 1) * g].double()
                out[b, h, j] = torch.maximum(queries * lo, queries * hi).sum(-1).max()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group, head_dim", [(1, 64), (3, 80), (4, 128)])
def test_scores_match_the_definition(dtype, group, head_dim):
    B, Hkv, T, c = 2, 2, 137, 10
    q = torch.randn(B, Hkv * group, head_dim).to(dtype)
    k = torch.randn(B, Hkv, T, head_dim).to(dtype)
    n = 11  # odd, and fewer than T // c: the tail is not a chunk
    counts = torch.tensor([11, 6], dtype=torch.int32)
    kmin, kmax = ops.chunk_bounds(k, c, n)
    assert kmin.dtype == dtype and kmin.shape == (B, Hkv, n, head_dim)
    got = ops.decode_chunk_scores(q, kmin, kmax, chunk_counts=counts)
    expected = float64_scores(q, k, c, n, counts)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite].double(), expected[finite], **TOLERANCES[dtype])


def test_scores_bound_every_logit_of_the_chunk():
    q, k = torch.randn(3, 8, 64), torch.randn(3, 2, 120, 64)
    kmin, kmax = ops.chunk_bounds(k, 8, 15)
    scores = ops.decode_chunk_scores(q, kmin, kmax).double()
    logits = torch.einsum("bhd,bhtd->bht", q.double(), k.double().repeat_interleave(4, 1))
    best = logits.view(3, 8, 15, 8).amax(-1).view(3, 2, 4, 15).amax(2)
    assert bool((best <= scores + 1e-6).all())


def test_top_chunks_are_the_best_ones_in_order():
    q, k = torch.randn(2, 4, 64), torch.randn(2, 2, 200, 64)
    kmin, kmax = ops.chunk_bounds(k, 10, 19)
    scores = float64_scores(q, k, 10, 19)
    chosen = ops.select_decode_chunks(q, kmin, kmax, 5)
    assert chosen.dtype == torch.int32
    assert torch.equal(chosen, reference.select_chunks(scores.float(), 5))
    keep = torch.tensor([5, 2], dtype=torch.int32)
    fewer = ops.select_decode_chunks(q, kmin, kmax, 5, keep_counts=keep)
    assert torch.equal(fewer[0], chosen[0])
    assert torch.equal(fewer[1, :, :2], reference.select_chunks(scores[1:].float(), 2)[0])
    assert bool((fewer[1, :, 2:] == 19).all())  # filler past the row's count


def test_sparse_decode_over_the_selected_chunks():
    """The selection is an index ``sparse_decode`` reads in place: equal to attention over the
    gathered chunks plus the tail."""
    B, Hkv, g, D, c, T = 2, 2, 3, 64, 10, 157
    q = torch.randn(B, Hkv * g, D)
    k, v = torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    tail = reference.tail_start(T, c, 32)
    kmin, kmax = ops.chunk_bounds(k, c, tail // c)
    chunk_idx = ops.select_decode_chunks(q, kmin, kmax, 4)
    seq_lens = torch.full((B,), T, dtype=torch.int32)
    out = ops.sparse_decode(q, k, v, chunk_idx, c, tail, seq_lens)
    kept_k, kept_v = reference.gather_chunks(k, v, chunk_idx, c, tail)
    logits = torch.einsum("bhd,bhtd->bht", q, kept_k.repeat_interleave(g, 1)) * D**-0.5
    expected = torch.einsum("bht,bhtd->bhd", logits.softmax(-1), kept_v.repeat_interleave(g, 1))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda q, lo, hi: ops.decode_chunk_scores(q[0], lo, hi), "q must have 3 dimensions"),
        (lambda q, lo, hi: ops.decode_chunk_scores(q, lo, hi[..., :8]), "kmax must have"),
        (lambda q, lo, hi: ops.decode_chunk_scores(q[:, :3], lo, hi), "positive multiple"),
        (lambda q, lo, hi: ops.select_decode_chunks(q, lo, hi, 99), "n_keep must be <="),
        (lambda q, lo, hi: ops.chunk_bounds(torch.randn(1, 2, 30, 64), 10, 4), "exceeds"),
    ],
)
def test_bad_arguments(call, match):
    q = torch.randn(2, 4, 64)
    kmin, kmax = ops.chunk_bounds(torch.randn(2, 2, 100, 64), 10, 9)
    with pytest.raises((ValueError, TypeError), match=match):
        call(q, kmin, kmax)

"""``ops.gather_chunks`` (SPEC step 7) against ``reference.gather_chunks``: a copy, so exact."""

import pytest
import torch

from triton_chunkkv import ops
from triton_chunkkv.ops import reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def random_chunks(batch, num_kv_heads, num_chunks, n_keep, dtype=torch.int32):
    """Distinct ascending chunk indices, different for every ``(b, h)``."""
    order = torch.rand(batch, num_kv_heads, num_chunks).argsort(dim=-1)
    return order[..., :n_keep].sort(dim=-1).values.to(dtype)


def make_kv(batch, num_kv_heads, seq_len, head_dim, dtype):
    k = torch.randn(batch, num_kv_heads, seq_len, head_dim).to(dtype)
    return k, torch.randn_like(k)


def assert_gathered(k, v, chunk_idx, chunk_size, tail_start):
    k_out, v_out = ops.gather_chunks(k, v, chunk_idx, chunk_size, tail_start)
    k_ref, v_ref = reference.gather_chunks(k, v, chunk_idx, chunk_size, tail_start)
    B, Hkv, T, D = k.shape
    expected_shape = (B, Hkv, chunk_idx.shape[2] * chunk_size + T - tail_start, D)
    for out, ref in ((k_out, k_ref), (v_out, v_ref)):
        assert out.shape == expected_shape and out.dtype == k.dtype and out.is_contiguous()
        assert not out.isnan().any(), "an output element was never written"
        assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("kept", ["none", "some", "all"])
@pytest.mark.parametrize("chunk_size", [1, 10, 16])
def test_matches_reference(chunk_size, kept, head_dim, dtype):
    seq_len, window = 59, 7
    tail_start = reference.tail_start(seq_len, chunk_size, window)
    num_chunks = tail_start // chunk_size
    n_keep = {"none": 0, "some": num_chunks // 2, "all": num_chunks}[kept]
    k, v = make_kv(3, 2, seq_len, head_dim, dtype)
    assert_gathered(k, v, random_chunks(3, 2, num_chunks, n_keep), chunk_size, tail_start)


@pytest.mark.parametrize("head_dim", [96, 128, 256])
def test_large_head_dims(head_dim):
    k, v = make_kv(2, 2, 45, head_dim, torch.bfloat16)
    assert_gathered(k, v, random_chunks(2, 2, 3, 2), 10, 30)


@pytest.mark.parametrize("n_keep", [0, 3])
def test_empty_tail(n_keep):
    k, v = make_kv(3, 2, 40, 64, torch.float32)
    assert_gathered(k, v, random_chunks(3, 2, 4, n_keep), 10, 40)


def test_int64_indices():
    k, v = make_kv(3, 2, 53, 64, torch.float16)
    assert_gathered(k, v, random_chunks(3, 2, 4, 2, dtype=torch.int64), 10, 40)


def test_non_contiguous_inputs():
    B, Hkv, T, D, c = 3, 2, 47, 80, 10
    k = torch.randn(B, T, Hkv, D).transpose(1, 2)  # the [B, T, H, D] layout viewed as HF's
    v = torch.randn(B, Hkv, T, 2 * D)[..., ::2]  # head dim stride 2
    # The identity selection is an expanded (stride 0) view.
    chunk_idx = reference.all_chunks(B, Hkv, T, c, 7, k.device)
    assert not (k.is_contiguous() or v.is_contiguous() or chunk_idx.is_contiguous())
    assert_gathered(k, v, chunk_idx, c, 40)


def test_nothing_kept():
    k, v = make_kv(2, 2, 30, 64, torch.float32)
    k_out, v_out = ops.gather_chunks(k, v, random_chunks(2, 2, 3, 0), 10, 30)
    assert k_out.shape == v_out.shape == (2, 2, 0, 64)


def test_runs_the_kernel(monkeypatch):
    """Under ``TRITON_INTERPRET=1`` the Triton path runs, not the reference."""

    def fail(*args, **kwargs):
        raise AssertionError("the reference ran instead of the kernel")

    monkeypatch.setattr(reference, "gather_chunks", fail)
    k, v = make_kv(1, 1, 25, 64, torch.float32)
    k_out, _ = ops.gather_chunks(k, v, torch.tensor([[[1]]], dtype=torch.int32), 10, 20)
    assert torch.equal(k_out, torch.cat([k[:, :, 10:20], k[:, :, 20:]], dim=2))


# (what is wrong, the change to good arguments, the error, a regex naming the argument)
BAD_ARGUMENTS = [
    (
        "index past the chunks",
        lambda a: dict(chunk_idx=a["chunk_idx"] + 4),
        ValueError,
        "chunk_idx",
    ),
    ("negative index", lambda a: dict(chunk_idx=a["chunk_idx"] - 2), ValueError, "chunk_idx"),
    ("index batch", lambda a: dict(chunk_idx=a["chunk_idx"][:1]), ValueError, "chunk_idx"),
    ("index rank", lambda a: dict(chunk_idx=a["chunk_idx"][..., 0]), ValueError, "chunk_idx"),
    ("index dtype", lambda a: dict(chunk_idx=a["chunk_idx"].float()), TypeError, "chunk_idx"),
    ("tail past T", lambda a: dict(tail_start=46), ValueError, "tail_start"),
    ("negative tail", lambda a: dict(tail_start=-1), ValueError, "tail_start"),
    ("chunk size", lambda a: dict(chunk_size=0), ValueError, "chunk_size"),
    ("v heads", lambda a: dict(v=a["v"][:, :1]), ValueError, "v must have k's shape"),
    ("v head dim", lambda a: dict(v=a["v"][..., :32]), ValueError, "v must have k's shape"),
    ("v dtype", lambda a: dict(v=a["v"].half()), ValueError, "dtype.*v=torch.float16"),
    ("k rank", lambda a: dict(k=a["k"][0]), ValueError, "k must have 4 dimensions"),
    ("integer k", lambda a: dict(k=a["k"].long(), v=a["v"].long()), TypeError, "k must have dtype"),
    ("v device", lambda a: dict(v=a["v"].to("meta")), ValueError, "device.*v=meta"),
    ("validate type", lambda a: dict(validate="False"), TypeError, "validate must be a bool"),
]


@pytest.mark.parametrize(
    "change, error, match",
    [case[1:] for case in BAD_ARGUMENTS],
    ids=[case[0] for case in BAD_ARGUMENTS],
)
def test_rejects_bad_arguments(change, error, match):
    k, v = make_kv(2, 2, 45, 64, torch.float32)
    arguments = dict(k=k, v=v, chunk_idx=random_chunks(2, 2, 4, 2), chunk_size=10, tail_start=40)
    with pytest.raises(error, match=match):
        ops.gather_chunks(**{**arguments, **change(arguments)})


# The checks that read index values on the host: the ones validate=False skips.
DATA_CHECKS = ("index past the chunks", "negative index")
NO_DATA_CHECKS = [case for case in BAD_ARGUMENTS if case[0] not in (*DATA_CHECKS, "validate type")]


@pytest.mark.parametrize(
    "change, error, match",
    [case[1:] for case in NO_DATA_CHECKS],
    ids=[case[0] for case in NO_DATA_CHECKS],
)
def test_validate_false_keeps_the_checks_that_read_no_data(change, error, match):
    k, v = make_kv(2, 2, 45, 64, torch.float32)
    arguments = dict(k=k, v=v, chunk_idx=random_chunks(2, 2, 4, 2), chunk_size=10, tail_start=40)
    with pytest.raises(error, match=match):
        ops.gather_chunks(**{**arguments, **change(arguments)}, validate=False)


def test_validate_false_skips_the_data_check():
    """An index in the tail's range (inside the keys, so the read stays in bounds) passes
    unread and is gathered as given."""
    k, v = make_kv(2, 2, 59, 64, torch.float32)
    chunk_idx = torch.tensor([[[1, 4]] * 2] * 2, dtype=torch.int32)  # 4 chunks before the tail
    with pytest.raises(ValueError, match="chunk_idx must lie in"):
        ops.gather_chunks(k, v, chunk_idx, 10, 40)
    k_out, v_out = ops.gather_chunks(k, v, chunk_idx, 10, 40, validate=False)
    k_ref, v_ref = reference.gather_chunks(k, v, chunk_idx, 10, 40)
    assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
def test_matches_reference_on_gpu(head_dim, dtype):
    B, Hkv, T, c, window = 4, 8, 4099, 10, 32
    tail_start = reference.tail_start(T, c, window)
    k, v = (t.cuda() for t in make_kv(B, Hkv, T, head_dim, dtype))
    chunk_idx = random_chunks(B, Hkv, tail_start // c, 40).cuda()
    assert_gathered(k, v, chunk_idx, c, tail_start)
    assert_gathered(k.transpose(1, 2).contiguous().transpose(1, 2), v, chunk_idx, c, tail_start)

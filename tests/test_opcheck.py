"""The ops as PyTorch operators (``triton_chunkkv/ops/library.py``): ``torch.library.opcheck``
on every operator, on both CPU paths (the kernels under the interpreter, the torch reference).

opcheck runs each operator on real and on fake tensors and compares the outputs' metadata
(shapes, dtypes, strides, devices), checks the schema (no input mutated, no output aliasing an
input) and runs it through AOTAutograd with dynamic shapes against eager. Inputs are valid
(the operators do not check), small (the interpreter), and the outputs NaN-poisoned.
"""

from __future__ import annotations

import pytest
import torch

from triton_chunkkv import ops
from triton_chunkkv.ops import library, reference

# numpy warns about the NaN the interpreter reads from poisoned buffers while merging splits.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

B, HKV, G, T, D, C, W = 2, 2, 2, 40, 16, 5, 4  # P0 = 35: 7 chunks, a tail of 5 tokens
S_MAX = T + 4


def int32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def chunk_idx(dtype=torch.int32) -> torch.Tensor:
    """``[B, Hkv, 3]``, ascending, every entry below ``P0 // C = 7`` (and below 6, row 1's)."""
    return torch.tensor([[[0, 2, 3], [1, 4, 5]], [[0, 1, 5], [2, 3, 4]]], dtype=dtype)


def decode_cache(dtype=torch.float32):
    return torch.randn(B, HKV, S_MAX, D).to(dtype), torch.randn(B, HKV, S_MAX, D).to(dtype)


def slot_layout():
    """The dense cache scattered into a shuffled slot pool: ``(k_pool, v_pool, slot_map)``."""
    k_cache, v_cache = decode_cache()
    slots = torch.randperm(B * S_MAX + 5)[: B * S_MAX].view(B, S_MAX)
    k_pool = torch.randn(B * S_MAX + 5, HKV, D)
    v_pool = torch.randn(B * S_MAX + 5, HKV, D)
    k_pool[slots] = k_cache.transpose(1, 2)
    v_pool[slots] = v_cache.transpose(1, 2)
    return k_pool, v_pool, slots.to(torch.int32)


def sparse_decode_args(
    q,
    k_cache,
    v_cache,
    idx,
    *,
    tail_start=35,
    tail_starts=None,
    seq_lens=(S_MAX, S_MAX - 3),
    scaling=None,
    num_splits=None,
    slot_map=None,
    row_offset=None,
    chunk_counts=None,
):
    """The operator's arguments in schema order (``tail_start`` an int plus a tensor)."""
    return (
        q,
        k_cache,
        v_cache,
        idx,
        C,
        tail_start,
        tail_starts,
        int32(seq_lens) if isinstance(seq_lens, tuple) else seq_lens,
        scaling,
        num_splits,
        slot_map,
        row_offset,
        chunk_counts,
    )


def keys(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(B, HKV, T, D).to(dtype)


def window_queries(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(B, HKV * G, W, D).to(dtype)


def padding_mask() -> torch.Tensor:
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :6] = False  # row 1 left padded
    return mask


def strided_keys() -> torch.Tensor:
    """``[B, Hkv, T, D]`` viewed from the ``[B, T, Hkv, D]`` layout (not contiguous)."""
    return torch.randn(B, T, HKV, D).transpose(1, 2)


def strided_cache() -> torch.Tensor:
    return torch.randn(B, S_MAX, HKV, D).transpose(1, 2)


def several_queries_case():
    k_cache, v_cache = decode_cache()
    return sparse_decode_args(
        torch.randn(B, HKV * G, 3, D),
        k_cache,
        v_cache,
        chunk_idx(),
        tail_start=0,
        tail_starts=int32([35, 30]),
        seq_lens=(S_MAX - 2, S_MAX - 4),
        scaling=0.3,
        num_splits=3,
        row_offset=int32([0, 2]),
        chunk_counts=int32([3, 2]),
    )


def slot_case():
    k_pool, v_pool, slot_map = slot_layout()
    return sparse_decode_args(
        torch.randn(B, HKV * G, D), k_pool, v_pool, chunk_idx(), slot_map=slot_map
    )


def bounds(chunk_keys):
    return reference.chunk_bounds(chunk_keys, C, 7)


# (id, operator, a function of no argument returning the operator's arguments)
CASES = [
    ("window_scores", "window_scores", lambda: (window_queries(), keys(), None, None, 1)),
    (
        "window_scores-mask-scale-pool",
        "window_scores",
        lambda: (window_queries(), strided_keys(), padding_mask(), 0.3, 3),
    ),
    (
        "window_scores-fp16",
        "window_scores",
        lambda: (window_queries(torch.float16), keys(torch.float16), None, None, 1),
    ),
    (
        "window_chunk_scores",
        "window_chunk_scores",
        lambda: (window_queries(), keys(), None, None, C),
    ),
    (
        "window_chunk_scores-mask-scale-strided",
        "window_chunk_scores",
        lambda: (window_queries(), strided_keys(), padding_mask(), 0.3, 3),
    ),
    (
        "window_chunk_scores-bf16-one-token-chunks",
        "window_chunk_scores",
        lambda: (window_queries(torch.bfloat16), keys(torch.bfloat16), None, None, 1),
    ),
    ("chunk_sum", "chunk_sum", lambda: (torch.rand(B, HKV, T), C, W)),
    (
        "chunk_sum-strided-one-token-chunks",
        "chunk_sum",
        lambda: (torch.rand(B, T, HKV).transpose(1, 2), 1, W),
    ),
    ("select_chunks", "select_chunks", lambda: (torch.rand(B, HKV, 7), 3, False)),
    ("select_chunks-share-heads", "select_chunks", lambda: (torch.rand(B, HKV, 7), 3, True)),
    ("select_chunks-none", "select_chunks", lambda: (torch.rand(B, HKV, 7), 0, False)),
    (
        "select_chunks-strided",
        "select_chunks",
        lambda: (torch.rand(B, 7, HKV).transpose(1, 2), 7, False),
    ),
    ("gather_chunks", "gather_chunks", lambda: (keys(), keys(), chunk_idx(), C, 35)),
    (
        "gather_chunks-int64-strided",
        "gather_chunks",
        lambda: (strided_keys(), strided_keys(), chunk_idx(torch.int64), C, 35),
    ),
    (
        "gather_chunks-nothing-kept",
        "gather_chunks",
        lambda: (keys(), keys(), chunk_idx()[..., :0], C, T),
    ),
    (
        "sparse_decode-one-query",
        "sparse_decode",
        lambda: sparse_decode_args(torch.randn(B, HKV * G, D), *decode_cache(), chunk_idx()),
    ),
    ("sparse_decode-several-queries", "sparse_decode", several_queries_case),
    (
        "sparse_decode-strided",
        "sparse_decode",
        lambda: sparse_decode_args(
            torch.randn(B, D, HKV * G).transpose(1, 2),
            strided_cache(),
            strided_cache(),
            chunk_idx().transpose(0, 1).contiguous().transpose(0, 1),
        ),
    ),
    ("sparse_decode-slot-map", "sparse_decode", slot_case),
    (
        "sparse_decode-fp16",
        "sparse_decode",
        lambda: sparse_decode_args(
            torch.randn(B, HKV * G, D).half(), *decode_cache(torch.float16), chunk_idx()
        ),
    ),
    (
        "sparse_decode-empty-batch",
        "sparse_decode",
        lambda: sparse_decode_args(
            torch.randn(0, HKV * G, D),
            torch.randn(0, HKV, S_MAX, D),
            torch.randn(0, HKV, S_MAX, D),
            chunk_idx()[:0],
            seq_lens=int32([]),
        ),
    ),
    (
        "decode_chunk_scores",
        "decode_chunk_scores",
        lambda: (torch.randn(B, HKV * G, D), *bounds(keys()), None),
    ),
    (
        "decode_chunk_scores-strided",
        "decode_chunk_scores",
        lambda: (torch.randn(B, D, HKV * G).transpose(1, 2), *bounds(strided_keys()), None),
    ),
    (
        "decode_chunk_scores-chunk-counts",
        "decode_chunk_scores",
        lambda: (torch.randn(B, HKV * G, D), *bounds(keys()), int32([7, 5])),
    ),
    ("chunk_bounds", "chunk_bounds", lambda: (strided_keys(), C, 7)),
    ("chunk_bounds-none", "chunk_bounds", lambda: (keys(), C, 0)),
]


def test_every_kernel_op_is_an_operator():
    public = {
        "window_scores",
        "window_chunk_scores",
        "chunk_sum",
        "select_chunks",
        "gather_chunks",
        "sparse_decode",
        "decode_chunk_scores",
        "chunk_bounds",
    }
    assert set(library.OPERATORS) == public
    assert {name for _, name, _ in CASES} == public
    for name, operator in library.OPERATORS.items():
        assert getattr(torch.ops.triton_chunkkv, name).default is operator
        assert callable(getattr(ops, name))


@pytest.mark.parametrize("name, make_args", [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_opcheck(path, name, make_args):
    torch.library.opcheck(library.OPERATORS[name], make_args())


@pytest.mark.parametrize("tail", ["int", "tensor"])
def test_sparse_decode_operator_equals_the_op(path, tail):
    """The operator's split ``tail_start`` (an int, or a tensor that wins) means what the op's
    single argument means."""
    q = torch.randn(B, HKV * G, D)
    k_cache, v_cache = decode_cache()
    seq_lens = int32([S_MAX, S_MAX - 3])
    tail_start = 35 if tail == "int" else int32([35, 30])
    expected = ops.sparse_decode(q, k_cache, v_cache, chunk_idx(), C, tail_start, seq_lens)
    split = (35, None) if tail == "int" else (7, tail_start)  # the int is ignored
    got = library.SPARSE_DECODE(
        q, k_cache, v_cache, chunk_idx(), C, *split, seq_lens, None, None, None, None, None
    )
    assert torch.equal(got, expected)


def test_ops_accept_fake_tensors():
    """Under a fake-tensor mode the dispatchers take the operators, whose fake implementations
    give the shapes without running a kernel (and without reading any data)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q_obs, k = window_queries(), keys()
        scores = ops.window_scores(q_obs, k)
        chunk_scores = ops.chunk_sum(scores, C, W)
        fused_scores = ops.window_chunk_scores(q_obs, k, C)
        idx = ops.select_chunks(chunk_scores, 3)
        k_kept, v_kept = ops.gather_chunks(k, k, idx, C, 35, validate=False)
        k_cache, v_cache = decode_cache()
        seq_lens = int32([S_MAX, S_MAX])
        out = ops.sparse_decode(
            torch.randn(B, HKV * G, 2, D), k_cache, v_cache, idx, C, 35, seq_lens, validate=False
        )
        kmin, kmax = ops.chunk_bounds(k, C, 7)
        decode_scores = ops.decode_chunk_scores(torch.randn(B, HKV * G, D), kmin, kmax)
    assert scores.shape == (B, HKV, T) and scores.dtype == torch.float32
    assert chunk_scores.shape == fused_scores.shape == (B, HKV, 7)
    assert idx.shape == (B, HKV, 3) and idx.dtype == torch.int32
    assert k_kept.shape == v_kept.shape == (B, HKV, 3 * C + T - 35, D)
    assert out.shape == (B, HKV * G, 2, D)
    assert kmin.shape == kmax.shape == (B, HKV, 7, D)
    assert decode_scores.shape == (B, HKV, 7) and decode_scores.dtype == torch.float32


def test_profiler_names_the_operator():
    """While the profiler records, an op goes through its operator, so traces name it."""
    q = torch.randn(B, HKV * G, D)
    k_cache, v_cache = decode_cache()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        ops.sparse_decode(q, k_cache, v_cache, chunk_idx(), C, 35, int32([S_MAX, S_MAX]))
    assert "triton_chunkkv::sparse_decode" in {event.name for event in profile.events()}

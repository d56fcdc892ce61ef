"""Bad input never gets past the front door (issue 13), on both CPU paths: the Triton kernels
(in the interpreter) and the torch reference. One table or test per item of the issue:

1. argument types and ranks are checked before any attribute is read;
2. a head dim of 0 (or zero heads) is a clear ValueError;
3. B = 0 gives correctly shaped empty results;
4. option types (``share_heads="False"`` is not True);
5. invalid ``scaling`` (NaN, inf, <= 0, not a number);
6. NaN and inf propagate as torch softmax attention does, the same on both paths;
7. exact ties resolve by SPEC's lower-index rule;
8. ``compress_layers`` names ``layers``;
10. two threads interpreting kernels at once.

Item 9 (the command line) is ``test_cli.py``. The float64 SPEC reference is
``test_properties``'s.
"""

import math
import threading

import pytest
import torch
from test_properties import spec_sparse_decode, spec_window_scores

from triton_chunkkv import ops
from triton_chunkkv.ops._runtime import use_triton

PATHS = ("kernels", "reference")
# numpy warns about the NaN the interpreter computes on poisoned inputs: that is the point.
IGNORE_NAN_WARNINGS = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def other_path(monkeypatch, path):
    """Switch an already running test to ``path``."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "kernels" else "0")


# The shapes: q, k, v = randn(1,2,4,16), randn(1,2,30,16), randn(1,2,30,16); budget 10,
# window 4, chunk 5 (P0 = 25: five chunks, a tail of five tokens).
def good_arguments(op: str) -> dict:
    q_obs, k, v = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    chunk_idx = torch.tensor([[[0, 2], [1, 3]]], dtype=torch.int32)
    key_mask = torch.ones(1, 30, dtype=torch.bool)
    options = dict(budget=10, window=4, chunk_size=5)
    return {
        "window_scores": lambda: dict(q_obs=q_obs, k=k, key_mask=key_mask),
        "chunk_sum": lambda: dict(scores=torch.rand(1, 2, 30), chunk_size=5, window=4),
        "select_chunks": lambda: dict(chunk_scores=torch.rand(1, 2, 5), n_keep=2),
        "gather_chunks": lambda: dict(k=k, v=v, chunk_idx=chunk_idx, chunk_size=5, tail_start=25),
        "sparse_decode": lambda: dict(
            q=torch.randn(1, 2, 16),
            k_cache=k,
            v_cache=v,
            chunk_idx=chunk_idx,
            chunk_size=5,
            tail_start=25,
            seq_lens=torch.tensor([30], dtype=torch.int32),
        ),
        "compress": lambda: dict(q_obs=q_obs, k=k, v=v, key_mask=key_mask, **options),
        "compress_layers": lambda: dict(
            layers=[(q_obs, k, v), (None, k.clone(), v.clone())], reuse_layers=2, **options
        ),
    }[op]()


def call(op: str, arguments: dict):
    return getattr(ops, op)(**arguments)


def assert_rejected(op, change, error, match):
    """``op`` with ``change(good arguments)`` applied raises ``error`` matching ``match`` and
    leaves every input tensor as it was."""
    arguments = good_arguments(op)
    arguments.update(change(arguments))
    before = {n: t.clone() for n, t in arguments.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(error, match=match):
        call(op, arguments)
    for name, t in before.items():
        assert torch.equal(arguments[name], t), f"{name} was modified"


TENSOR_ARGUMENTS = {
    "window_scores": ("q_obs", "k", "key_mask"),
    "chunk_sum": ("scores",),
    "select_chunks": ("chunk_scores",),
    "gather_chunks": ("k", "v", "chunk_idx"),
    "sparse_decode": ("q", "k_cache", "v_cache", "chunk_idx", "seq_lens"),
    "compress": ("q_obs", "k", "v", "key_mask"),
}
WRONG_DTYPE = {"key_mask": torch.float32, "chunk_idx": torch.float32, "seq_lens": torch.int64}


def bad_tensor_cases():
    """Every tensor argument of every op as a list, with a dimension too few, with a wrong
    dtype, and (if it is required) as ``None``."""
    cases = []
    for op, names in TENSOR_ARGUMENTS.items():
        for name in names:

            def changed(fn, name=name):
                return lambda a: {name: fn(a[name])}

            cases += [
                (op, f"{name} list", changed(lambda t: t.tolist()), TypeError, f"{name} must be a"),
                (op, f"{name} rank", changed(lambda t: t[0]), ValueError, f"{name} must have \\d"),
                (
                    op,
                    f"{name} dtype",
                    changed(lambda t, name=name: t.to(WRONG_DTYPE.get(name, torch.int64))),
                    TypeError,
                    f"{name} must have dtype",
                ),
            ]
            if name != "key_mask":
                cases.append(
                    (op, f"{name} None", changed(lambda t: None), TypeError, f"{name} must be a")
                )
    return cases


# Item 1, as the issue found it, then every tensor argument of every op.
TYPE_AND_RANK = [
    ("compress", "k as a list", lambda a: dict(k=a["k"].tolist()), TypeError, "k must be a"),
    ("compress", "2-D k", lambda a: dict(k=a["k"][0, 0]), ValueError, "k must have 4"),
    ("compress", "v as a list", lambda a: dict(v=a["v"].tolist()), TypeError, "v must be a"),
    *bad_tensor_cases(),
]


@pytest.mark.parametrize(
    "op, change, error, match",
    [(c[0], *c[2:]) for c in TYPE_AND_RANK],
    ids=[f"{c[0]}-{c[1]}" for c in TYPE_AND_RANK],
)
def test_types_and_ranks_are_checked_first(path, op, change, error, match):
    assert_rejected(op, change, error, match)


def strip_last(a, *names):
    return {name: a[name][..., :0] for name in names}


# Item 2: nothing divides by a head dim of 0 or a group of 0 heads.
EMPTY_DIMS = [
    ("window_scores", "head dim", lambda a: strip_last(a, "q_obs", "k"), "k has head dim 0"),
    (
        "window_scores",
        "kv heads",
        lambda a: dict(q_obs=a["q_obs"][:, :0], k=a["k"][:, :0]),
        "k has key/value heads 0",
    ),
    ("window_scores", "q heads", lambda a: dict(q_obs=a["q_obs"][:, :0]), "q_obs has 0 heads"),
    ("compress", "head dim", lambda a: strip_last(a, "q_obs", "k", "v"), "k has head dim 0"),
    (
        "compress",
        "kv heads",
        lambda a: dict(q_obs=a["q_obs"][:, :0], k=a["k"][:, :0], v=a["v"][:, :0]),
        "k has key/value heads 0",
    ),
    (
        "compress_layers",
        "head dim",
        lambda a: dict(layers=[tuple(t[..., :0] for t in a["layers"][0])]),
        r"layers\[0\]: k has head dim 0",
    ),
    ("gather_chunks", "head dim", lambda a: strip_last(a, "k", "v"), "k has head dim 0"),
    (
        "gather_chunks",
        "kv heads",
        lambda a: dict(k=a["k"][:, :0], v=a["v"][:, :0], chunk_idx=a["chunk_idx"][:, :0]),
        "k has key/value heads 0",
    ),
    (
        "sparse_decode",
        "head dim",
        lambda a: strip_last(a, "q", "k_cache", "v_cache"),
        "q has head dim 0",
    ),
    ("sparse_decode", "q heads", lambda a: dict(q=a["q"][:, :0]), "q has 0 heads"),
    (
        "sparse_decode",
        "no slots",
        lambda a: dict(
            k_cache=a["k_cache"][0, :, :0].transpose(0, 1),
            v_cache=a["v_cache"][0, :, :0].transpose(0, 1),
            slot_map=torch.zeros(1, 30, dtype=torch.int32),
        ),
        "k_cache has slots 0",
    ),
]


@pytest.mark.parametrize(
    "op, change, match",
    [(c[0], *c[2:]) for c in EMPTY_DIMS],
    ids=[f"{c[0]}-{c[1]}" for c in EMPTY_DIMS],
)
def test_empty_head_dims_are_value_errors(path, op, change, match):
    assert_rejected(op, change, ValueError, match)


def empty_batch(a, **extra):
    """The arguments with every batched tensor cut to zero rows."""
    out = {}
    for name, t in a.items():
        if name == "layers":
            out[name] = [tuple(x if x is None else x[:0] for x in layer) for layer in t]
        elif isinstance(t, torch.Tensor):
            out[name] = t[:0]
        else:
            out[name] = t
    return {**out, **extra}


def slot_layout_batch_of_zero(a):
    """Zero rows over a pool of 30 slots."""
    return empty_batch(
        a,
        k_cache=a["k_cache"][0].transpose(0, 1),
        v_cache=a["v_cache"][0].transpose(0, 1),
        slot_map=torch.zeros(0, 30, dtype=torch.int32),
    )


def shapes(result):
    if isinstance(result, torch.Tensor):
        return (tuple(result.shape), result.dtype)
    if isinstance(result, ops.Compressed):
        return (shapes(result.keys), shapes(result.values), shapes(result.chunk_idx))
    return tuple(shapes(r) for r in result)


F32, I32 = torch.float32, torch.int32
KEPT = ((0, 2, 10, 16), F32)  # budget 10: one chunk beside the five-token tail
# Item 3: (op, what, change, expected shapes and dtypes).
EMPTY_BATCH = [
    ("window_scores", "", empty_batch, ((0, 2, 30), F32)),
    ("chunk_sum", "", empty_batch, ((0, 2, 5), F32)),
    ("select_chunks", "", empty_batch, ((0, 2, 2), I32)),
    ("gather_chunks", "", empty_batch, (((0, 2, 15, 16), F32),) * 2),
    ("sparse_decode", "dense", empty_batch, ((0, 2, 16), F32)),
    (
        "sparse_decode",
        "4-D q",
        lambda a: empty_batch(a, q=a["q"][:0, :, None]),
        ((0, 2, 1, 16), F32),  # shaped like q
    ),
    ("sparse_decode", "slots", slot_layout_batch_of_zero, ((0, 2, 16), F32)),
    ("compress", "", empty_batch, (KEPT, KEPT, ((0, 2, 1), I32))),
    (
        "compress",
        "identity",
        lambda a: empty_batch(a, budget=30),
        (((0, 2, 30, 16), F32),) * 2 + (((0, 2, 5), I32),),
    ),
    ("compress_layers", "", empty_batch, ((KEPT, KEPT, ((0, 2, 1), I32)),) * 2),
]


@pytest.mark.parametrize(
    "op, change, expected",
    [(c[0], *c[2:]) for c in EMPTY_BATCH],
    ids=[f"{c[0]}-{c[1]}" if c[1] else c[0] for c in EMPTY_BATCH],
)
def test_an_empty_batch_gives_empty_results(path, op, change, expected):
    assert shapes(call(op, change(good_arguments(op)))) == expected


# Item 4: every option's type, before any work.
OPTION_TYPES = [
    ("compress", "share_heads", "False"),
    ("compress", "share_heads", 1),
    ("compress", "share_heads", None),
    ("compress_layers", "share_heads", "False"),
    ("select_chunks", "share_heads", "False"),
    ("sparse_decode", "validate", "no"),
    ("sparse_decode", "validate", None),
    ("sparse_decode", "num_splits", 1.5),
    ("sparse_decode", "chunk_size", 5.0),
    ("sparse_decode", "tail_start", 25.0),
    ("compress", "chunk_size", "5"),
    ("compress", "chunk_size", 5.0),
    ("compress", "window", 4.0),
    ("compress", "budget", "10"),
    ("compress", "budget", True),
    ("compress", "pool_kernel", 3.0),
    ("compress_layers", "reuse_layers", "2"),
    ("window_scores", "pool_kernel", True),
    ("chunk_sum", "chunk_size", 5.0),
    ("chunk_sum", "window", "4"),
    ("select_chunks", "n_keep", 2.0),
    ("gather_chunks", "tail_start", 25.0),
    ("gather_chunks", "chunk_size", None),
]


@pytest.mark.parametrize(
    "op, name, value",
    OPTION_TYPES,
    ids=[f"{op}-{name}={value!r}" for op, name, value in OPTION_TYPES],
)
def test_option_types(path, op, name, value):
    assert_rejected(op, lambda a: {name: value}, TypeError, name)


def test_a_ratio_that_is_not_a_number():
    assert_rejected("compress", lambda a: dict(budget=None, ratio="0.5"), ValueError, "ratio")


SCALING_OPS = ("window_scores", "compress", "compress_layers", "sparse_decode")
# Item 5: a NaN, infinite or non-positive scale is an error, not all-NaN (or all-zero) scores.
BAD_SCALING = [
    (math.nan, ValueError),
    (math.inf, ValueError),
    (-math.inf, ValueError),
    (0, ValueError),
    (0.0, ValueError),
    (-0.125, ValueError),
    (10**400, ValueError),  # no float holds it
    (True, TypeError),
    ("0.125", TypeError),
    (torch.tensor(0.125), TypeError),
]


@pytest.mark.parametrize("op", SCALING_OPS)
@pytest.mark.parametrize("scaling, error", BAD_SCALING, ids=[repr(s)[:12] for s, _ in BAD_SCALING])
def test_bad_scaling(path, op, scaling, error):
    assert_rejected(op, lambda a: dict(scaling=scaling), error, "scaling")


# ---------------------------------------------------------------------------------------------
# Item 6: NaN and inf
# ---------------------------------------------------------------------------------------------


def assert_same_values(got, expected, **tolerance):
    """NaN where ``expected`` is NaN, the same infinities, close elsewhere."""
    got, expected = got.double().cpu(), expected.double().cpu()
    assert torch.equal(got.isnan(), expected.isnan()), "NaN in different places"
    assert torch.equal(got.isinf() & (got > 0), expected.isinf() & (expected > 0))
    assert torch.equal(got.isinf() & (got < 0), expected.isinf() & (expected < 0))
    finite = got.isfinite()
    torch.testing.assert_close(got[finite], expected[finite], **tolerance)


def on_both_paths(monkeypatch, fn):
    """``fn()`` on the kernel path (in the interpreter), then on the reference path."""
    if not use_triton(torch.empty(0)):
        pytest.skip("the kernels on CPU tensors need TRITON_INTERPRET=1")
    results = []
    for path in PATHS:
        other_path(monkeypatch, path)
        results.append(fn())
    return results


def poison(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def window_inputs():
    """B=3, Hkv=2, g=2, T=30, w=4, D=16. Row 1 pads its first 5 keys; row 2 its first 28, so
    its window queries at positions 26 and 27 see no key."""
    q_obs, k = torch.randn(3, 4, 4, 16), torch.randn(3, 2, 30, 16)
    key_mask = torch.arange(30)[None, :] >= torch.tensor([[0], [5], [28]])
    return q_obs, k, key_mask


def all_negative_logits(q_obs, k):
    """Every logit of KV head 1 in row 0 is -inf: torch's softmax gives NaN there."""
    q_obs, k = q_obs.clone(), k.clone()
    q_obs[0, 2:4, :, 0] = -1.0
    k[0, 1, :, 0] = math.inf
    return q_obs, k


# (what, poisoned (q_obs, k), whether scores[0] / all scores stay finite)
WINDOW_POISON = [
    ("NaN query", lambda q, k: (poison(q, (0, 1, 2, 3), math.nan), k), False),
    ("inf query", lambda q, k: (poison(q, (0, 2, 0, 0), math.inf), k), False),
    ("-inf query", lambda q, k: (poison(q, (1, 0, 3, 5), -math.inf), k), False),
    ("NaN key", lambda q, k: (q, poison(k, (0, 1, 7, 0), math.nan)), False),
    ("NaN last key", lambda q, k: (q, poison(k, (0, 0, 29, 0), math.nan)), False),
    ("inf key", lambda q, k: (q, poison(k, (0, 0, 3, 0), math.inf)), None),
    ("-inf key", lambda q, k: (q, poison(k, (1, 1, 12, 4), -math.inf)), None),
    ("all logits -inf", all_negative_logits, False),
    ("NaN padding key", lambda q, k: (q, poison(k, (1, 0, 2), math.nan)), True),
    ("NaN query seeing no key", lambda q, k: (poison(q, (2, slice(None), 0), math.nan), k), True),
]


@IGNORE_NAN_WARNINGS
@pytest.mark.parametrize(
    "poisoned, finite", [c[1:] for c in WINDOW_POISON], ids=[c[0] for c in WINDOW_POISON]
)
@pytest.mark.parametrize("pool_kernel", [1, 3])
def test_window_scores_propagate_nan_as_torch_attention(monkeypatch, poisoned, finite, pool_kernel):
    q_obs, k = poisoned(*window_inputs()[:2])
    key_mask = window_inputs()[2]

    def scores():
        return ops.window_scores(q_obs, k, key_mask=key_mask, pool_kernel=pool_kernel)

    kernels, reference = on_both_paths(monkeypatch, scores)
    expected = spec_window_scores(q_obs, k, key_mask, None, pool_kernel)
    for got in (kernels, reference):
        assert_same_values(got, expected, rtol=1e-4, atol=1e-5)
    if finite is not None:
        assert bool(expected.isfinite().all()) == finite


@IGNORE_NAN_WARNINGS
def test_compress_selects_the_same_chunks_from_poisoned_inputs(monkeypatch):
    """NaN chunk scores rank above every number (torch.sort's order), ties to the lower index:
    a head whose scores are all NaN keeps its first chunks, on both paths."""
    q_obs, k = torch.randn(2, 4, 8, 16), 2 * torch.randn(2, 2, 80, 16)
    v = torch.randn(2, 2, 80, 16)
    q_obs[0, 1, 3, 0] = math.nan  # every score of row 0, KV head 0
    k[1, 1, 20, 5] = math.nan  # every score of row 1, KV head 1
    v[0, 0, 0, 0] = math.nan  # values are copied, never scored

    def compressed():
        return ops.compress(q_obs, k, v, budget=40, window=8, chunk_size=10)

    kernels, reference = on_both_paths(monkeypatch, compressed)
    assert torch.equal(kernels.chunk_idx, reference.chunk_idx)
    assert kernels.chunk_idx[0, 0].tolist() == [0, 1, 2]
    assert kernels.chunk_idx[1, 1].tolist() == [0, 1, 2]
    assert torch.equal(kernels.values.isnan(), reference.values.isnan())


def decode_inputs():
    """B=3, Hkv=2, g=2, S_max=40, D=16, chunks of 5, tail from 25; rows 0 and 1 keep chunks
    [0, 2] (head 0) and [1, 3] (head 1) and end at 40 and 30; row 2 keeps nothing (its count is
    0 and its tail empty)."""
    q = torch.randn(3, 4, 16)
    k, v = torch.randn(3, 2, 40, 16), torch.randn(3, 2, 40, 16)
    chunk_idx = torch.tensor([[[0, 2], [1, 3]]] * 3, dtype=torch.int32)
    return dict(
        q=q,
        k_cache=k,
        v_cache=v,
        chunk_idx=chunk_idx,
        chunk_size=5,
        tail_start=torch.tensor([25, 25, 25], dtype=torch.int32),
        seq_lens=torch.tensor([40, 30, 25], dtype=torch.int32),
        chunk_counts=torch.tensor([2, 2, 0], dtype=torch.int32),
    )


# (what, tensor, index, value, whether the output stays finite)
DECODE_POISON = [
    ("NaN query", "q", (0, 1, 3), math.nan, False),
    ("inf query", "q", (1, 3, 0), math.inf, None),
    ("NaN key in the tail", "k_cache", (0, 0, 27, 0), math.nan, False),
    ("NaN key in a kept chunk", "k_cache", (0, 1, 16, 2), math.nan, False),
    ("inf key in a kept chunk", "k_cache", (0, 1, 16, 0), math.inf, None),
    ("NaN key in a dropped chunk", "k_cache", (0, 0, 5), math.nan, True),
    ("NaN key past the length", "k_cache", (1, 1, 35), math.nan, True),
    ("NaN value in a kept chunk", "v_cache", (0, 1, 6, 3), math.nan, False),
    ("inf value in the tail", "v_cache", (1, 0, 26, 0), math.inf, False),
    ("NaN value in a dropped chunk", "v_cache", (1, 0, 7), math.nan, True),
    ("NaN query, empty retained set", "q", (2,), math.nan, True),
]


@IGNORE_NAN_WARNINGS
@pytest.mark.parametrize(
    "name, index, value, finite", [c[1:] for c in DECODE_POISON], ids=[c[0] for c in DECODE_POISON]
)
def test_sparse_decode_propagates_nan_as_torch_attention(monkeypatch, name, index, value, finite):
    arguments = decode_inputs()
    arguments[name] = poison(arguments[name], index, value)
    kernels, reference = on_both_paths(monkeypatch, lambda: ops.sparse_decode(**arguments))
    expected = spec_sparse_decode(**arguments)
    for got in (kernels, reference):
        assert_same_values(got, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(kernels[2], torch.zeros(4, 16)), "an empty retained set gives zeros"
    if finite is not None:
        assert bool(expected.isfinite().all()) == finite


# ---------------------------------------------------------------------------------------------
# Item 7: exact ties
# ---------------------------------------------------------------------------------------------


EQUAL_KEYS = [
    *(
        (dtype, key, False)
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
        for key in (0.0, 0.37)
    ),
    (torch.float32, 0.0, True),
    (torch.float32, 0.37, True),
]


@pytest.mark.parametrize(
    "dtype, key, share_heads",
    EQUAL_KEYS,
    ids=[f"{str(d)[6:]}-{k}" + ("-shared" if s else "") for d, k, s in EQUAL_KEYS],
)
def test_equal_keys_keep_the_lowest_chunks(path, dtype, key, share_heads):
    """The issue's case: all-equal keys make every chunk score equal; SPEC step 6 (ties: the
    lower index) keeps chunks 0..n_keep-1. T=400, w=8, c=5: P0 = 390, 78 chunks, a tail of 10;
    budget 150 keeps (150 - 10) // 5 = 28 chunks."""
    k = torch.full((2, 4, 400, 16), key).to(dtype)
    q_obs = torch.randn(2, 4, 8, 16).to(dtype)
    out = ops.compress(q_obs, k, k, budget=150, window=8, chunk_size=5, share_heads=share_heads)
    assert out.tail_start == 390
    assert torch.equal(out.chunk_idx, torch.arange(28, dtype=torch.int32).expand(2, 4, 28))


def test_equal_chunk_scores_resolve_to_the_lower_index(path):
    scores = torch.full((2, 3, 400), 0.1)
    sums = ops.chunk_sum(scores, 7, 8)
    assert sums.unique().numel() == 1, "equal scores, equal sums wherever the chunk sits"
    for share_heads in (False, True):
        chosen = ops.select_chunks(sums, 20, share_heads=share_heads)
        assert torch.equal(chosen, torch.arange(20, dtype=torch.int32).expand(2, 3, 20))


def periodic_keys(batch, heads, chunk_size, repeats, seed):
    """Keys repeating every chunk: every chunk before the window scores the same."""
    generator = torch.Generator().manual_seed(seed)
    base = 2 * torch.randn(batch, heads, chunk_size, 16, generator=generator)
    q_obs = torch.randn(batch, heads, 8, 16, generator=generator)
    return q_obs, base.repeat(1, 1, repeats, 1)


def test_periodic_keys_tie_on_the_reference_path(monkeypatch):
    """Keys equal up to their position give bit-equal scores on the reference path (float64
    logits, sums in a fixed order). The interpreter's float32 ``tl.dot`` is numpy's BLAS
    matmul, whose rounding depends on the key's column: there only bit-equal logits tie
    (``docs/DESIGN.md``, "Ties")."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for seed, (batch, heads, repeats) in enumerate([(2, 4, 80), (1, 8, 67), (3, 2, 101)]):
        q_obs, k = periodic_keys(batch, heads, 5, repeats, seed)
        T = 5 * repeats
        n = (T - 8) // 5
        sums = ops.chunk_sum(ops.window_scores(q_obs, k), 5, 8)
        assert all(row.unique().numel() == 1 for row in sums.flatten(0, 1))
        out = ops.compress(q_obs, k, k, budget=T - 5 * n + 5 * (n // 3), window=8, chunk_size=5)
        assert torch.equal(
            out.chunk_idx, torch.arange(n // 3, dtype=torch.int32).expand_as(out.chunk_idx)
        )


def test_periodic_keys_tie_with_shared_heads(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q_obs, k = periodic_keys(3, 32, 5, 100, seed=4)  # T = 500: 98 chunks, a tail of 10
    sums = ops.chunk_sum(ops.window_scores(q_obs, k), 5, 8)
    assert all(row.unique().numel() == 1 for row in sums.flatten(0, 1)), "each head ties"
    out = ops.compress(q_obs, k, k, budget=10 + 5 * 32, window=8, chunk_size=5, share_heads=True)
    assert torch.equal(out.chunk_idx, torch.arange(32, dtype=torch.int32).expand(3, 32, 32))


# ---------------------------------------------------------------------------------------------
# Item 8: compress_layers names layers
# ---------------------------------------------------------------------------------------------


def layer_list(a, layers):
    return dict(layers=layers(a["layers"]))


BAD_LAYERS = [
    ("None", lambda layers: None, TypeError, "layers must be a sequence"),
    ("a string", lambda layers: "qkv", TypeError, "layers must be a sequence"),
    ("[q, k]", lambda layers: [layers[0][0], layers[0][1]], TypeError, r"layers\[0\] must be a"),
    ("a pair", lambda layers: [layers[0][:2]], ValueError, r"layers\[0\] must be a .* 2 items"),
    (
        "k as a list",
        lambda layers: [(layers[0][0], layers[0][1].tolist(), layers[0][2])],
        TypeError,
        r"layers\[0\]: k must be a torch.Tensor",
    ),
    (
        "leader without q_obs",
        lambda layers: [(None, *layers[0][1:]), layers[1]],
        TypeError,
        r"layers\[0\]: q_obs must be a torch.Tensor",
    ),
    (
        "reused layer's v",
        lambda layers: [layers[0], (None, layers[1][1], layers[1][2][0])],
        ValueError,
        r"layers\[1\] \(q_obs of layers\[0\]\): v must have 4",
    ),
]


@pytest.mark.parametrize(
    "layers, error, match", [c[1:] for c in BAD_LAYERS], ids=[c[0] for c in BAD_LAYERS]
)
def test_compress_layers_names_layers(path, layers, error, match):
    assert_rejected("compress_layers", lambda a: layer_list(a, layers), error, match)


# ---------------------------------------------------------------------------------------------
# Item 10: threads
# ---------------------------------------------------------------------------------------------


def test_two_threads_decode_at_once(path):
    """The interpreter is not thread-safe; interpreted launches take turns (``_runtime``)."""
    arguments = decode_inputs()
    expected = ops.sparse_decode(**arguments)
    errors = []

    def decode():
        try:
            for _ in range(3):
                torch.testing.assert_close(ops.sparse_decode(**arguments), expected)
        except Exception as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=decode) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors

"""``ops.compress`` / ``ops.compress_layers`` (SPEC steps 1-7 and Algorithm 2) against the
reference. Chunk indices must match exactly; kept keys/values are copies, so they match exactly
too. Under ``TRITON_INTERPRET=1`` every kernel launch is slow: shapes stay small."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from triton_chunkkv import ops
from triton_chunkkv.ops import reference
from triton_chunkkv.policies import chunkkv as chunkkv_policy


def make_layer(
    batch, num_kv_heads, group, seq_len, window, head_dim, dtype=torch.float32, device="cpu"
):
    """Random ``(q_obs, k, v)``; the keys are scaled up so the window attention is peaked and
    the chunk scores are far from ties."""
    q_obs = torch.randn(batch, num_kv_heads * group, window, head_dim)
    k = 2 * torch.randn(batch, num_kv_heads, seq_len, head_dim)
    v = torch.randn(batch, num_kv_heads, seq_len, head_dim)
    return tuple(t.to(device=device, dtype=dtype) for t in (q_obs, k, v))


def expected_kept_len(seq_len, budget, chunk_size, window):
    tail_start = reference.tail_start(seq_len, chunk_size, window)
    n_keep = reference.num_kept_chunks(seq_len, budget, chunk_size, window)
    return n_keep * chunk_size + seq_len - tail_start


def assert_same_compressed(out, ref):
    assert out.tail_start == ref.tail_start
    assert out.chunk_idx.dtype == torch.int32
    assert torch.equal(out.chunk_idx, ref.chunk_idx)
    for kept, expected in ((out.keys, ref.keys), (out.values, ref.values)):
        assert kept.dtype == expected.dtype and kept.shape == expected.shape
        assert not kept.isnan().any(), "an output element was never written"
        assert torch.equal(kept, expected)


def compare(q_obs, k, v, **options):
    out = ops.compress(q_obs, k, v, **options)
    assert_same_compressed(out, reference.compress(q_obs, k, v, **options))
    return out


# (batch, kv heads, GQA group, T, window, chunk size, head dim, dtype, options)
CASES = [
    (1, 2, 1, 70, 8, 10, 64, torch.float32, dict(budget=40)),  # T - w = 62: a partial chunk
    (1, 1, 3, 77, 16, 10, 80, torch.float16, dict(budget=45)),
    (1, 2, 4, 64, 1, 1, 64, torch.bfloat16, dict(budget=20)),  # token level, window of one
    (1, 1, 8, 97, 64, 16, 64, torch.float32, dict(budget=90)),  # T - w = 33 = 2 * 16 + 1
    (1, 1, 4, 80, 16, 16, 80, torch.bfloat16, dict(budget=60)),  # T - w = 64: no remainder
    (2, 1, 4, 100, 32, 10, 64, torch.float16, dict(ratio=0.5)),  # L = 50
    (1, 2, 3, 91, 5, 10, 64, torch.float32, dict(ratio=0.37)),  # L = floor(33.67) = 33
]


@pytest.mark.parametrize(
    "batch, num_kv_heads, group, seq_len, window, chunk_size, head_dim, dtype, options",
    CASES,
    ids=[f"g{c[2]}-T{c[3]}-w{c[4]}-c{c[5]}-D{c[6]}-{str(c[7])[6:]}" for c in CASES],
)
def test_matches_reference(
    batch, num_kv_heads, group, seq_len, window, chunk_size, head_dim, dtype, options
):
    layer = make_layer(batch, num_kv_heads, group, seq_len, window, head_dim, dtype)
    out = compare(*layer, chunk_size=chunk_size, window=window, **options)
    budget = reference.resolve_budget(seq_len, **options)
    assert out.keys.shape[2] == expected_kept_len(seq_len, budget, chunk_size, window)


@pytest.mark.parametrize("budget", [0, 25, 39, 55, 69])
def test_budget_regimes(budget):
    """Budgets below the tail (40 tokens here) keep only the tail; up to T - 1 keep n - 1 of
    the n = 3 chunks at most."""
    q_obs, k, v = make_layer(1, 2, 2, 70, 32, 64)
    out = compare(q_obs, k, v, budget=budget, chunk_size=10, window=32)
    assert out.chunk_idx.shape[2] == max(0, (budget - 40) // 10)
    assert torch.equal(out.keys[:, :, -40:], k[:, :, 30:])


@pytest.mark.parametrize(
    "options",
    [dict(budget=70), dict(budget=10**6), dict(ratio=1.0)],
    ids=["budget=T", "budget>T", "ratio=1"],
)
def test_identity_when_budget_covers_prompt(options):
    q_obs, k, v = make_layer(2, 2, 2, 70, 8, 64)
    out = ops.compress(q_obs, k, v, chunk_size=10, window=8, **options)
    assert out.keys is k and out.values is v
    assert out.tail_start == 60
    assert torch.equal(out.chunk_idx, torch.arange(6, dtype=torch.int32).expand(2, 2, 6))


@pytest.mark.parametrize(
    "dtype, head_dim", [(torch.float32, 64), (torch.float16, 80), (torch.bfloat16, 64)], ids=str
)
def test_left_padding_batch(dtype, head_dim):
    B, T, window = 3, 66, 8
    q_obs, k, v = make_layer(B, 1, 2, T, window, head_dim, dtype)
    padding = torch.tensor([0, 5, 23])
    key_mask = torch.arange(T)[None, :] >= padding[:, None]
    compare(q_obs, k, v, budget=30, chunk_size=10, window=window, key_mask=key_mask)


@pytest.mark.parametrize("share_heads, pool_kernel", [(True, 1), (False, 3), (True, 3)])
def test_share_heads_and_pooling(share_heads, pool_kernel):
    q_obs, k, v = make_layer(1, 3, 2, 75, 8, 64)
    out = compare(
        q_obs,
        k,
        v,
        budget=40,
        chunk_size=10,
        window=8,
        share_heads=share_heads,
        pool_kernel=pool_kernel,
    )
    if share_heads:
        assert torch.equal(out.chunk_idx, out.chunk_idx[:, :1].expand_as(out.chunk_idx))


def test_scores_match_reference():
    """The token scores behind the selection, to float32 rounding."""
    q_obs, k, _ = make_layer(2, 2, 3, 67, 16, 80)
    key_mask = torch.arange(67)[None, :] >= torch.tensor([[0], [9]])
    torch.testing.assert_close(
        ops.window_scores(q_obs, k, key_mask=key_mask, pool_kernel=3),
        reference.window_scores(q_obs, k, key_mask=key_mask, pool_kernel=3),
        rtol=1e-3,
        atol=1e-6,
    )


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_shapes(data):
    draw = data.draw
    seq_len = draw(st.integers(2, 60), label="T")
    window = draw(st.integers(1, seq_len), label="window")
    chunk_size = draw(st.integers(1, 12), label="chunk_size")
    budget = draw(st.integers(0, seq_len + 2), label="budget")
    layer = make_layer(
        draw(st.integers(1, 2), label="B"),
        draw(st.integers(1, 2), label="Hkv"),
        draw(st.integers(1, 3), label="g"),
        seq_len,
        window,
        draw(st.sampled_from([16, 80]), label="D"),
    )
    out = compare(*layer, budget=budget, chunk_size=chunk_size, window=window)
    num_chunks = out.tail_start // chunk_size
    if budget >= seq_len:
        assert out.keys is layer[1]
        return
    assert out.keys.shape[2] == expected_kept_len(seq_len, budget, chunk_size, window)
    idx = out.chunk_idx.long()
    assert ((idx >= 0) & (idx < num_chunks)).all()
    assert (idx.diff(dim=-1) > 0).all()  # sorted and unique


@pytest.fixture
def scoring_calls(monkeypatch):
    """Counts the window-score computations ``ops.compress_layers`` runs (token scores, or the
    fused chunk scores that ChunkKV computes without pooling)."""
    calls = []
    for name in ("_window_scores", "_window_chunk_scores"):
        original = getattr(chunkkv_policy, name)

        def counting(*args, original=original, **kwargs):
            calls.append(args)
            return original(*args, **kwargs)

        monkeypatch.setattr(chunkkv_policy, name, counting)
    return calls


@pytest.mark.parametrize("reuse_layers", [1, 2, 3])
def test_layer_reuse(reuse_layers, scoring_calls):
    num_layers, c, window = 5, 10, 8
    layers = [list(make_layer(1, 2, 2, 50, window, 64)) for _ in range(num_layers)]
    for layer in range(num_layers):
        if layer % reuse_layers:
            layers[layer][0] = None  # a reused layer's queries are never read
    options = dict(budget=25, chunk_size=c, window=window)
    out = ops.compress_layers(layers, reuse_layers=reuse_layers, **options)
    expected = reference.compress_layers(layers, reuse_layers=reuse_layers, **options)

    assert len(scoring_calls) == math.ceil(num_layers / reuse_layers)
    for layer, (got, ref) in enumerate(zip(out, expected)):
        assert_same_compressed(got, ref)
        leader = out[reuse_layers * (layer // reuse_layers)]
        assert torch.equal(got.chunk_idx, leader.chunk_idx)
        _, k, v = layers[layer]
        kept = reference.gather_chunks(k, v, leader.chunk_idx, c, leader.tail_start)
        assert torch.equal(got.keys, kept[0]) and torch.equal(got.values, kept[1])


def test_layer_reuse_identity(scoring_calls):
    layers = [make_layer(1, 2, 2, 40, 8, 64) for _ in range(3)]
    layers[1] = (None, *layers[1][1:])
    out = ops.compress_layers(layers, reuse_layers=2, ratio=1.0, chunk_size=10, window=8)
    assert not scoring_calls
    for (_, k, v), got in zip(layers, out):
        assert got.keys is k and got.values is v


def good_layer():
    """B=2, Hkv=2, g=2, T=50, w=8, D=64, float32, with a key mask."""
    q_obs, k, v = make_layer(2, 2, 2, 50, 8, 64)
    return dict(
        q_obs=q_obs,
        k=k,
        v=v,
        key_mask=torch.ones(2, 50, dtype=torch.bool),
        budget=30,
        chunk_size=10,
        window=8,
    )


# (what is wrong, the change to good arguments, the error, a regex naming the argument)
BAD_ARGUMENTS = [
    ("budget and ratio", lambda a: dict(ratio=0.5), ValueError, "budget and ratio"),
    ("neither", lambda a: dict(budget=None), ValueError, "budget and ratio"),
    ("negative budget", lambda a: dict(budget=-1), ValueError, "budget"),
    ("float budget", lambda a: dict(budget=3.0), TypeError, "budget"),
    ("zero ratio", lambda a: dict(budget=None, ratio=0.0), ValueError, "ratio"),
    ("ratio > 1", lambda a: dict(budget=None, ratio=1.5), ValueError, "ratio"),
    ("chunk size 0", lambda a: dict(chunk_size=0), ValueError, "chunk_size"),
    ("window 0", lambda a: dict(window=0), ValueError, "window"),
    (
        "window > T",
        lambda a: dict(window=51, q_obs=a["q_obs"][:, :, :1].expand(-1, -1, 51, -1)),
        ValueError,
        "window",
    ),
    ("q_obs window", lambda a: dict(window=4), ValueError, "q_obs"),
    ("q_obs rank", lambda a: dict(q_obs=a["q_obs"][0]), ValueError, "q_obs"),
    ("k rank", lambda a: dict(k=a["k"][0]), ValueError, "k must have 4"),
    ("v rank", lambda a: dict(v=a["v"][0]), ValueError, "v must have 4"),
    ("q_obs batch", lambda a: dict(q_obs=a["q_obs"][:1]), ValueError, "q_obs.*batch"),
    ("q_obs head dim", lambda a: dict(q_obs=a["q_obs"][..., :32]), ValueError, "q_obs.*head dim"),
    ("GQA", lambda a: dict(q_obs=a["q_obs"][:, :3]), ValueError, "q_obs has 3 heads"),
    ("v heads", lambda a: dict(v=a["v"][:, :1]), ValueError, "v must have k's shape"),
    ("v length", lambda a: dict(v=a["v"][:, :, :40]), ValueError, "v must have k's shape"),
    ("k dtype", lambda a: dict(k=a["k"].half()), ValueError, "dtype.*k=torch.float16"),
    ("v dtype", lambda a: dict(v=a["v"].half()), ValueError, "dtype.*v=torch.float16"),
    ("integer q_obs", lambda a: dict(q_obs=a["q_obs"].long()), TypeError, "q_obs"),
    ("k device", lambda a: dict(k=a["k"].to("meta")), ValueError, "device.*k=meta"),
    ("v device", lambda a: dict(v=a["v"].to("meta")), ValueError, "device.*v=meta"),
    (
        "key_mask device",
        lambda a: dict(key_mask=a["key_mask"].to("meta")),
        ValueError,
        "device.*key_mask=meta",
    ),
    ("key_mask shape", lambda a: dict(key_mask=a["key_mask"][:, :40]), ValueError, "key_mask"),
    ("key_mask dtype", lambda a: dict(key_mask=a["key_mask"].float()), TypeError, "key_mask"),
    ("even pool kernel", lambda a: dict(pool_kernel=2), ValueError, "pool_kernel"),
    ("scaling type", lambda a: dict(scaling="0.1"), TypeError, "scaling"),
]


@pytest.mark.parametrize(
    "change, error, match",
    [case[1:] for case in BAD_ARGUMENTS],
    ids=[case[0] for case in BAD_ARGUMENTS],
)
def test_rejects_bad_arguments(change, error, match):
    arguments = good_layer()
    arguments.update(change(arguments))
    before = {
        name: t.clone()
        for name, t in arguments.items()
        if isinstance(t, torch.Tensor) and t.device.type != "meta"
    }
    with pytest.raises(error, match=match):
        ops.compress(**arguments)
    for name, t in before.items():
        assert torch.equal(arguments[name], t), f"{name} was modified"


def replace_layer(layers, index, **tensors):
    q_obs, k, v = layers[index]
    layers[index] = (tensors.get("q_obs", q_obs), tensors.get("k", k), tensors.get("v", v))
    return layers


# (what is wrong, the change to two good layers, compress_layers options, error, regex)
BAD_LAYERS = [
    ("reuse_layers 0", lambda layers: layers, dict(reuse_layers=0), ValueError, "reuse_layers"),
    (
        "layer shapes",
        lambda layers: replace_layer(
            layers, 1, k=layers[1][1][:, :, :40], v=layers[1][2][:, :, :40]
        ),
        {},
        ValueError,
        r"layers\[1\]",
    ),
    (
        "layer dtype",
        lambda layers: replace_layer(layers, 1, v=layers[1][2].half()),
        {},
        ValueError,
        "dtype.*v=torch.float16",
    ),
    (
        "leader without queries",
        lambda layers: replace_layer(layers, 0, q_obs=None),
        dict(reuse_layers=2),
        TypeError,
        "q_obs",
    ),
]


@pytest.mark.parametrize(
    "change, options, error, match",
    [case[1:] for case in BAD_LAYERS],
    ids=[case[0] for case in BAD_LAYERS],
)
def test_compress_layers_rejects_bad_arguments(change, options, error, match, scoring_calls):
    layers = change([make_layer(1, 2, 2, 50, 8, 64) for _ in range(2)])
    with pytest.raises(error, match=match):
        ops.compress_layers(layers, **{"budget": 30, "chunk_size": 10, "window": 8, **options})
    assert not scoring_calls, "validation must come before any work"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "group, num_kv_heads, head_dim",
    [(4, 8, 128), (7, 4, 128), (3, 2, 80)],
    ids=["llama3-8b", "qwen2-7b", "gqa3-D80"],
)
def test_matches_reference_on_gpu(group, num_kv_heads, head_dim, dtype):
    B, T, window = 3, 3001, 32
    q_obs, k, v = make_layer(B, num_kv_heads, group, T, window, head_dim, dtype, "cuda")
    key_mask = torch.arange(T, device="cuda")[None, :] >= torch.tensor(
        [[0], [17], [900]], device="cuda"
    )
    for options in (
        dict(ratio=0.1),
        dict(budget=700, key_mask=key_mask),
        dict(budget=300, share_heads=True, pool_kernel=3),
    ):
        compare(q_obs, k, v, chunk_size=10, window=window, **options)
    layers = [
        make_layer(B, num_kv_heads, group, T, window, head_dim, dtype, "cuda") for _ in range(4)
    ]
    out = ops.compress_layers(layers, reuse_layers=2, ratio=0.2, window=window)
    for got, ref in zip(
        out, reference.compress_layers(layers, reuse_layers=2, ratio=0.2, window=window)
    ):
        assert_same_compressed(got, ref)

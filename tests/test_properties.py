"""Property-based tests: every public op on random valid configurations, on both paths (the
Triton kernels, through the interpreter on CPU, and the torch reference), against a float64
reference written here from SPEC.md alone (it shares no code with ``ops/reference.py``).

Hypothesis runs derandomized (the same examples every run, no example database), with
``max_examples`` set per test: ``EXAMPLES`` sums to over 500 configurations per run across
both paths. Shapes stay small, since every interpreted launch is slow.
"""

import contextlib
import itertools
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from triton_chunkkv import ops
from triton_chunkkv.ops._runtime import use_triton

PATHS = ("kernels", "reference")
# The kernels run on CUDA tensors where there is a GPU, else on CPU tensors in the interpreter
# (conftest sets TRITON_INTERPRET=1 there).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Examples per test and path: 310 x 2 paths = 620 configurations per run (25 to 40 s on two
# shared CPU cores, nearly all of it in the interpreter).
EXAMPLES = {
    "window_scores": 70,
    "window_chunk_scores": 20,
    "chunk_sum": 30,
    "select_chunks": 30,
    "gather_chunks": 30,
    "compress": 60,
    "sparse_decode": 70,
}


def examples(name):
    return settings(
        max_examples=EXAMPLES[name],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@contextlib.contextmanager
def on_path(path):
    """Run the ops on ``path``; yields the device its tensors live on."""
    with pytest.MonkeyPatch.context() as patch:
        if path == "reference":
            patch.setenv("TRITON_INTERPRET", "0")
            device = "cpu"
        else:
            device = KERNEL_DEVICE
        assert use_triton(torch.empty(0, device=device)) == (path == "kernels")
        yield device


# ---------------------------------------------------------------------------------------------
# SPEC in float64
# ---------------------------------------------------------------------------------------------


def spec_tail_start(seq_len, chunk_size, window):
    """Step 3: ``P0 = c * floor((T - w) / c)``."""
    return chunk_size * ((seq_len - window) // chunk_size)


def spec_window_scores(q_obs, k, key_mask=None, scaling=None, pool_kernel=1):
    """Steps 1-2 in float64: ``[B, Hkv, T]``. A query that sees no key adds nothing."""
    q, k = q_obs.detach().cpu().double(), k.detach().cpu().double()
    B, Hq, w, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    g = Hq // Hkv
    scaling = D**-0.5 if scaling is None else scaling
    scores = torch.zeros(B, Hkv, T, dtype=torch.float64)
    for b in range(B):
        for hq in range(Hq):
            for i in range(w):
                visible = torch.arange(T) <= T - w + i
                if key_mask is not None:
                    visible &= key_mask[b].cpu()
                if not visible.any():
                    continue
                logits = scaling * (k[b, hq // g] @ q[b, hq, i])
                logits[~visible] = -math.inf
                scores[b, hq // g] += torch.softmax(logits, dim=0) / g
    if pool_kernel > 1:
        padded = torch.nn.functional.pad(scores, (pool_kernel // 2, pool_kernel // 2))
        scores = padded.unfold(-1, pool_kernel, 1).sum(-1) / pool_kernel
    return scores


def spec_chunk_sum(scores, chunk_size, window):
    """Step 4: float64 ``[B, H, n]``."""
    B, H, T = scores.shape
    p0 = spec_tail_start(T, chunk_size, window)
    return (
        scores.detach().cpu().double()[..., :p0].reshape(B, H, p0 // chunk_size, chunk_size).sum(-1)
    )


def spec_num_kept(seq_len, budget, chunk_size, window):
    """Step 5; ``None`` when nothing is dropped."""
    if budget >= seq_len:
        return None
    p0 = spec_tail_start(seq_len, chunk_size, window)
    return min(max((budget - (seq_len - p0)) // chunk_size, 0), p0 // chunk_size)


def spec_select(chunk_scores, n_keep, share_heads=False):
    """Step 6 as lists: the ``n_keep`` highest, ties to the lower index, ascending."""
    scores = chunk_scores.detach().cpu().double()
    if share_heads:
        scores = scores.sum(dim=1, keepdim=True).expand_as(scores)
    B, H, n = scores.shape
    return [
        [sorted(sorted(range(n), key=lambda j: (-scores[b, h, j], j))[:n_keep]) for h in range(H)]
        for b in range(B)
    ]


def spec_positions(chunks, chunk_size, tail_start, seq_len):
    """Step 7's kept positions of one head, in order."""
    kept = [j * chunk_size + o for j in chunks for o in range(chunk_size)]
    return kept + list(range(tail_start, seq_len))


def spec_gather(k, chunk_idx, chunk_size, tail_start):
    """Step 7 for one tensor and int ``chunk_idx [B, H, n_keep]``: ``[B, H, kept, D]``."""
    k = k.detach().cpu()
    B, H, T, D = k.shape
    n_keep = chunk_idx.shape[2]
    out = k.new_zeros(B, H, n_keep * chunk_size + T - tail_start, D)
    for b in range(B):
        for h in range(H):
            chunks = chunk_idx[b, h].tolist()
            out[b, h] = k[b, h, spec_positions(chunks, chunk_size, tail_start, T)]
    return out


def spec_sparse_decode(
    q,
    k_cache,
    v_cache,
    chunk_idx,
    chunk_size,
    tail_start,
    seq_lens,
    scaling=None,
    slot_map=None,
    row_offset=None,
    chunk_counts=None,
):
    """Decode over ``R(b, h)`` in float64, shaped like ``q``: exact softmax attention over the
    retained positions, zeros where ``R`` is empty. With ``q [B, Hq, n, D]`` query ``i`` is the
    token at ``seq_len - n + i``: it sees the chunks and the dense range up to itself."""
    q = q.detach().cpu().double()
    one_query = q.dim() == 3
    q = q[:, :, None] if one_query else q
    k_cache, v_cache = k_cache.detach().cpu().double(), v_cache.detach().cpu().double()
    B, Hq, n, D = q.shape
    Hkv = k_cache.shape[1]
    g = Hq // Hkv
    scaling = D**-0.5 if scaling is None else scaling
    out = torch.zeros(B, Hq, n, D, dtype=torch.float64)
    for b, i in itertools.product(range(B), range(n)):
        tail = int(tail_start[b]) if isinstance(tail_start, torch.Tensor) else tail_start
        count = int(chunk_counts[b]) if chunk_counts is not None else chunk_idx.shape[2]
        seq_len = int(seq_lens[b]) - n + 1 + i  # this query's own position, plus one
        for h in range(Hkv):
            chunks = [int(j) for j in chunk_idx[b, h, :count]]
            positions = spec_positions(chunks, chunk_size, tail, seq_len)
            if not positions:
                continue
            if slot_map is not None:
                slots = [int(slot_map[b, p]) for p in positions]
                keys, values = k_cache[slots, h], v_cache[slots, h]
            else:
                shift = int(row_offset[b]) if row_offset is not None else 0
                rows = [shift + p for p in positions]
                keys, values = k_cache[b, h, rows], v_cache[b, h, rows]
            for hq in range(h * g, (h + 1) * g):
                probs = torch.softmax(scaling * (keys @ q[b, hq, i]), dim=0)
                out[b, hq, i] = probs @ values
    return out[:, :, 0] if one_query else out


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


def random_tensor(generator, shape, dtype, scale=1.0):
    return (scale * torch.randn(shape, generator=generator)).to(dtype)


def draw_common(draw, max_len=40):
    """A seeded generator, batch, KV heads, GQA group, prompt length, window, head dim and
    dtype."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1), label="seed"))
    batch = draw(st.sampled_from([0, 1, 1, 2, 2, 3]), label="B")
    seq_len = draw(st.integers(1, max_len), label="T")
    return dict(
        generator=generator,
        batch=batch,
        kv_heads=draw(st.integers(1, 2), label="Hkv"),
        group=draw(st.integers(1, 3), label="g"),
        seq_len=seq_len,
        window=draw(st.integers(1, min(seq_len, 10)), label="w"),
        head_dim=draw(st.sampled_from([1, 5, 16, 24]), label="D"),
        dtype=draw(st.sampled_from(DTYPES), label="dtype"),
    )


def draw_key_mask(draw, batch, seq_len):
    """``None`` or a left-padding mask (a row may be all padding)."""
    if not draw(st.booleans(), label="padded"):
        return None
    pads = [draw(st.integers(0, seq_len), label="padding") for _ in range(batch)]
    return torch.arange(seq_len)[None, :] >= torch.tensor(pads, dtype=torch.long)[:, None]


def draw_scaling(draw):
    return draw(st.one_of(st.none(), st.floats(0.05, 2.0), st.integers(1, 2)), label="scaling")


def score_tolerance(window):
    """Scores are sums of ``g * w`` probabilities averaged over ``g``: up to ``w``."""
    return dict(rtol=1e-4, atol=2e-5 * window)


# ---------------------------------------------------------------------------------------------
# The properties
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@examples("window_scores")
@given(data=st.data())
def test_window_scores(path, data):
    draw = data.draw
    c = draw_common(draw)
    B, Hkv, T, w, D = c["batch"], c["kv_heads"], c["seq_len"], c["window"], c["head_dim"]
    scale = draw(st.sampled_from([0.5, 2.0]), label="input scale")
    q_obs = random_tensor(c["generator"], (B, Hkv * c["group"], w, D), c["dtype"], scale)
    k = random_tensor(c["generator"], (B, Hkv, T, D), c["dtype"], scale)
    key_mask = draw_key_mask(draw, B, T)
    scaling = draw_scaling(draw)
    pool_kernel = draw(st.sampled_from([1, 1, 3, 5]), label="pool_kernel")
    with on_path(path) as device:
        scores = ops.window_scores(
            q_obs.to(device),
            k.to(device),
            key_mask=None if key_mask is None else key_mask.to(device),
            scaling=scaling,
            pool_kernel=pool_kernel,
        )
    assert scores.dtype == torch.float32 and scores.shape == (B, Hkv, T)
    expected = spec_window_scores(q_obs, k, key_mask, scaling, pool_kernel)
    torch.testing.assert_close(scores.cpu().double(), expected, **score_tolerance(w))


@pytest.mark.parametrize("path", PATHS)
@examples("window_chunk_scores")
@given(data=st.data())
def test_window_chunk_scores(path, data):
    """The fused steps 1-4 (no pooling) against the float64 steps 2 and 4."""
    draw = data.draw
    c = draw_common(draw)
    B, Hkv, T, w, D = c["batch"], c["kv_heads"], c["seq_len"], c["window"], c["head_dim"]
    chunk_size = draw(st.integers(1, 10), label="c")
    q_obs = random_tensor(c["generator"], (B, Hkv * c["group"], w, D), c["dtype"])
    k = random_tensor(c["generator"], (B, Hkv, T, D), c["dtype"])
    key_mask = draw_key_mask(draw, B, T)
    scaling = draw_scaling(draw)
    with on_path(path) as device:
        sums = ops.window_chunk_scores(
            q_obs.to(device),
            k.to(device),
            chunk_size,
            key_mask=None if key_mask is None else key_mask.to(device),
            scaling=scaling,
        )
    expected = spec_chunk_sum(spec_window_scores(q_obs, k, key_mask, scaling), chunk_size, w)
    assert sums.dtype == torch.float32 and sums.shape == expected.shape
    tolerance = score_tolerance(w)
    torch.testing.assert_close(
        sums.cpu().double(), expected, rtol=tolerance["rtol"], atol=tolerance["atol"] * chunk_size
    )


@pytest.mark.parametrize("path", PATHS)
@examples("chunk_sum")
@given(data=st.data())
def test_chunk_sum(path, data):
    draw = data.draw
    c = draw_common(draw, max_len=80)
    chunk_size = draw(st.integers(1, 12), label="c")
    scores = torch.rand((c["batch"], c["kv_heads"], c["seq_len"]), generator=c["generator"])
    with on_path(path) as device:
        sums = ops.chunk_sum(scores.to(device), chunk_size, c["window"])
    expected = spec_chunk_sum(scores, chunk_size, c["window"])
    assert sums.dtype == torch.float32
    torch.testing.assert_close(sums.cpu().double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
@examples("select_chunks")
@given(data=st.data())
def test_select_chunks(path, data):
    """Scores from a few small integers: many exact ties, and sums over heads stay exact."""
    draw = data.draw
    c = draw_common(draw)
    n = draw(st.integers(0, 30), label="n")
    n_keep = draw(st.integers(0, n), label="n_keep")
    share_heads = draw(st.booleans(), label="share_heads")
    values = torch.randint(0, 4, (c["batch"], c["kv_heads"], n), generator=c["generator"])
    with on_path(path) as device:
        chunk_idx = ops.select_chunks(values.float().to(device), n_keep, share_heads=share_heads)
    assert chunk_idx.dtype == torch.int32 and chunk_idx.shape == (c["batch"], c["kv_heads"], n_keep)
    assert chunk_idx.tolist() == spec_select(values, n_keep, share_heads)


def draw_chunks(draw, generator, batch, kv_heads, num_chunks):
    """Sorted distinct chunk indices ``[B, Hkv, n_keep]`` below ``num_chunks``."""
    n_keep = draw(st.integers(0, num_chunks), label="n_keep")
    rows = [
        [sorted(torch.randperm(num_chunks, generator=generator)[:n_keep].tolist())]
        for _ in range(batch * kv_heads)
    ]
    return torch.tensor(rows, dtype=torch.int32).reshape(batch, kv_heads, n_keep)


@pytest.mark.parametrize("path", PATHS)
@examples("gather_chunks")
@given(data=st.data())
def test_gather_chunks(path, data):
    draw = data.draw
    c = draw_common(draw)
    B, Hkv, T, D = c["batch"], c["kv_heads"], c["seq_len"], c["head_dim"]
    chunk_size = draw(st.integers(1, 8), label="c")
    tail_start = draw(st.integers(0, T), label="tail_start")
    chunk_idx = draw_chunks(draw, c["generator"], B, Hkv, tail_start // chunk_size)
    k = random_tensor(c["generator"], (B, Hkv, T, D), c["dtype"])
    v = random_tensor(c["generator"], (B, Hkv, T, D), c["dtype"])
    with on_path(path) as device:
        kept_k, kept_v = ops.gather_chunks(
            k.to(device), v.to(device), chunk_idx.to(device), chunk_size, tail_start
        )
    for kept, source in ((kept_k, k), (kept_v, v)):
        assert kept.dtype == source.dtype
        assert torch.equal(kept.cpu(), spec_gather(source, chunk_idx, chunk_size, tail_start))


@pytest.mark.parametrize("path", PATHS)
@examples("compress")
@given(data=st.data())
def test_compress(path, data):
    """Indices: a top-``n_keep`` of the float64 chunk scores up to float32 rounding (exactly
    SPEC's choice wherever the scores are apart); kept keys/values: exact copies."""
    draw = data.draw
    c = draw_common(draw, max_len=48)
    B, Hkv, T, w, D = c["batch"], c["kv_heads"], c["seq_len"], c["window"], c["head_dim"]
    chunk_size = draw(st.integers(1, 10), label="c")
    if draw(st.booleans(), label="by ratio"):
        options = dict(ratio=draw(st.sampled_from([0.1, 0.25, 0.5, 0.9, 1.0]), label="ratio"))
        budget = math.floor(Fraction(str(options["ratio"])) * T)
    else:
        budget = draw(st.integers(0, T + 2), label="budget")
        options = dict(budget=budget)
    share_heads = draw(st.booleans(), label="share_heads")
    pool_kernel = draw(st.sampled_from([1, 3]), label="pool_kernel")
    q_obs = random_tensor(c["generator"], (B, Hkv * c["group"], w, D), c["dtype"], 2.0)
    k = random_tensor(c["generator"], (B, Hkv, T, D), c["dtype"], 2.0)
    v = random_tensor(c["generator"], (B, Hkv, T, D), c["dtype"])
    key_mask = draw_key_mask(draw, B, T)
    scaling = draw_scaling(draw)
    with on_path(path) as device:
        k_in, v_in = k.to(device), v.to(device)
        out = ops.compress(
            q_obs.to(device),
            k_in,
            v_in,
            chunk_size=chunk_size,
            window=w,
            key_mask=None if key_mask is None else key_mask.to(device),
            scaling=scaling,
            share_heads=share_heads,
            pool_kernel=pool_kernel,
            **options,
        )
    p0 = spec_tail_start(T, chunk_size, w)
    assert out.tail_start == p0 and out.chunk_idx.dtype == torch.int32
    n_keep = spec_num_kept(T, budget, chunk_size, w)
    if n_keep is None:  # identity: the inputs themselves, every chunk
        assert out.keys is k_in and out.values is v_in
        assert out.chunk_idx.tolist() == [[list(range(p0 // chunk_size))] * Hkv] * B
        return
    assert out.chunk_idx.shape == (B, Hkv, n_keep)
    chunk_idx = out.chunk_idx.tolist()
    scores = spec_chunk_sum(
        spec_window_scores(q_obs, k, key_mask, scaling, pool_kernel), chunk_size, w
    )
    if share_heads:
        scores = scores.sum(dim=1, keepdim=True).expand_as(scores)
    tolerance = 1e-4 * w * chunk_size * Hkv
    for b in range(B):
        for h in range(Hkv):
            kept = chunk_idx[b][h]
            assert kept == sorted(set(kept)), "sorted and distinct"
            dropped = [j for j in range(p0 // chunk_size) if j not in kept]
            if kept and dropped:
                assert min(scores[b, h, kept]) >= max(scores[b, h, dropped]) - tolerance
    assert torch.equal(out.keys.cpu(), spec_gather(k, out.chunk_idx.cpu(), chunk_size, p0))
    assert torch.equal(out.values.cpu(), spec_gather(v, out.chunk_idx.cpu(), chunk_size, p0))


DECODE_TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}


@pytest.mark.parametrize("path", PATHS)
@examples("sparse_decode")
@given(data=st.data())
def test_sparse_decode(path, data):
    """Rows of their own lengths, per-row tails and chunk counts, in the dense layout (with or
    without row offsets) or the slot layout."""
    draw = data.draw
    c = draw_common(draw)
    B, Hkv, D, dtype, gen = c["batch"], c["kv_heads"], c["head_dim"], c["dtype"], c["generator"]
    Hq = Hkv * c["group"]
    chunk_size = draw(st.integers(1, 8), label="c")
    queries = draw(st.integers(1, 3), label="queries")  # the newest tokens at once
    tails = [draw(st.integers(0, 30), label="tail_start") for _ in range(B)]
    seq_lens = [tail + draw(st.integers(queries - 1, 6), label="dense tokens") for tail in tails]
    min_chunks = min((t // chunk_size for t in tails), default=0)
    n_keep = draw(st.integers(0, min_chunks), label="n_keep")
    chunk_idx = torch.tensor(
        [
            [sorted(torch.randperm(t // chunk_size, generator=gen)[:n_keep].tolist())]
            for t in tails
            for _ in range(Hkv)
        ],
        dtype=torch.int32,
    ).reshape(B, Hkv, n_keep)
    if len(set(tails)) == 1 and not draw(st.booleans(), label="per-row tail"):
        tail_start = tails[0]
    else:
        tail_start = torch.tensor(tails, dtype=torch.int32)
    chunk_counts = None
    if draw(st.booleans(), label="chunk counts"):
        chunk_counts = torch.tensor(
            [draw(st.integers(0, n_keep), label="count") for _ in range(B)], dtype=torch.int32
        )
    layout = draw(st.sampled_from(["dense", "row offset", "slots"]), label="layout")
    s_max = max(seq_lens, default=0) + draw(st.integers(0, 4), label="spare")
    options = dict(scaling=draw_scaling(draw), chunk_counts=chunk_counts)
    if layout == "slots":
        num_slots = max(1, B * s_max)
        options["slot_map"] = (
            torch.randperm(num_slots, generator=gen)[: B * s_max].reshape(B, s_max).to(torch.int32)
        )
        cache_shape = (num_slots, Hkv, D)
    else:
        if layout == "row offset":
            offsets = [draw(st.integers(0, s_max - n), label="offset") for n in seq_lens]
            options["row_offset"] = torch.tensor(offsets, dtype=torch.int32)
        cache_shape = (B, Hkv, s_max, D)
    q = random_tensor(gen, (B, Hq, queries, D), dtype)
    if queries == 1 and not draw(st.booleans(), label="4-D q"):
        q = q[:, :, 0]
    k_cache = random_tensor(gen, cache_shape, dtype)
    v_cache = random_tensor(gen, cache_shape, dtype)
    seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
    num_splits = draw(st.sampled_from([None, 1, 3]), label="num_splits")

    def moved(t, device):
        return t.to(device) if isinstance(t, torch.Tensor) else t

    with on_path(path) as device:
        out = ops.sparse_decode(
            moved(q, device),
            moved(k_cache, device),
            moved(v_cache, device),
            moved(chunk_idx, device),
            chunk_size,
            moved(tail_start, device),
            moved(seq_lens, device),
            num_splits=num_splits,
            **{name: moved(t, device) for name, t in options.items()},
        )
    assert out.dtype == dtype and out.shape == q.shape
    expected = spec_sparse_decode(
        q, k_cache, v_cache, chunk_idx, chunk_size, tail_start, seq_lens, **options
    )
    torch.testing.assert_close(out.cpu().double(), expected, **DECODE_TOLERANCES[dtype])

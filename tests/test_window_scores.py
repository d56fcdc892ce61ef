"""``ops.window_scores`` (SPEC steps 1-2): the fused two-pass Triton kernels against the reference.

On CPU the kernels run in the Triton interpreter (``conftest`` sets ``TRITON_INTERPRET=1`` and
NaN-poisons the outputs) with 128 x 128 blocks (``INTERPRET_CONFIG``). ``key_splits`` is forced
to several values so that the merge of the per-split softmax statistics is exercised on small
prompts, including splits with no key block.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from triton_chunkkv import ops
from triton_chunkkv.ops import reference
from triton_chunkkv.ops._runtime import use_triton
from triton_chunkkv.ops.kernels import window_scores as window_scores_kernel

TOLERANCES = {  # (rtol, atol); 16-bit inputs are compared with the reference on the same values
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1e-3, 1e-5),
}


def force_splits(monkeypatch, splits):
    monkeypatch.setattr(window_scores_kernel, "key_splits", lambda *_: splits)


def left_padding_mask(batch, seq_len, window, device="cpu"):
    """Row 0 unpadded, row 1 padded over a third, the last row so short (fewer valid keys than
    window queries) that its first window queries see no key at all."""
    mask = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    if batch > 1:
        mask[1, : seq_len // 3] = False
    if batch > 2:
        mask[-1, : seq_len - max(1, window // 2)] = False
    return mask


def make_inputs(
    batch, kv_heads, group, seq_len, window, head_dim, dtype, device="cpu", strided=False
):
    """Random ``q_obs``, ``k``. ``strided``: ``q_obs`` is the window slice of all the prompt's
    queries and ``k`` a transposed view of a ``[B, T, Hkv, D]`` buffer."""
    if strided:
        queries = torch.randn(batch, kv_heads * group, seq_len, head_dim, device=device)
        q_obs = queries.to(dtype)[:, :, seq_len - window :]
        k = torch.randn(batch, seq_len, kv_heads, head_dim, device=device).to(dtype).transpose(1, 2)
    else:
        q_obs = torch.randn(batch, kv_heads * group, window, head_dim, device=device).to(dtype)
        k = torch.randn(batch, kv_heads, seq_len, head_dim, device=device).to(dtype)
    return q_obs, k


def assert_matches_reference(q_obs, k, key_mask=None, scaling=None, pool_kernel=1):
    assert use_triton(k)
    out = ops.window_scores(q_obs, k, key_mask=key_mask, scaling=scaling, pool_kernel=pool_kernel)
    expected = reference.window_scores(
        q_obs, k, key_mask=key_mask, scaling=scaling, pool_kernel=pool_kernel
    )
    assert out.dtype == torch.float32 and out.shape == expected.shape
    rtol, atol = TOLERANCES[q_obs.dtype]
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    return out


# (kv_heads, group, seq_len, window, head_dim, dtype, pool_kernel, padded, splits)
EDGE_CASES = [
    (2, 1, 37, 1, 64, torch.float32, 1, True, 1),  # w = 1
    (1, 8, 64, 64, 80, torch.float32, 5, True, 1),  # w = T, g * w = 512 rows
    (1, 4, 129, 16, 64, torch.float16, 5, True, 4),  # splits without a key block
    (1, 2, 300, 8, 64, torch.float32, 1, True, 1),  # several key blocks in one split
    (2, 2, 7, 7, 80, torch.bfloat16, 3, True, 2),  # w = T, shorter than one key block
    (3, 1, 90, 5, 64, torch.float32, 1, False, 2),
    (1, 4, 33, 10, 80, torch.float32, 3, True, 5),  # more splits than key blocks
]
# Every GQA group x dtype x head dim, cycling through lengths, windows, pooling and splits.
LENGTHS_AND_WINDOWS = [(37, 1), (50, 8), (100, 32), (64, 64), (75, 3), (23, 23), (41, 12)]
GRID = [
    (
        1 + i % 2,
        group,
        *LENGTHS_AND_WINDOWS[i % len(LENGTHS_AND_WINDOWS)],
        head_dim,
        dtype,
        (1, 3, 5)[i % 3],
        i % 4 != 3,
        1 + i % 3,
    )
    for i, (group, dtype, head_dim) in enumerate(
        (group, dtype, head_dim)
        for group in (1, 3, 4, 8)
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
        for head_dim in (64, 80)
    )
]
CASES = EDGE_CASES + GRID
CASE_NAMES = "kv_heads,group,seq_len,window,head_dim,dtype,pool_kernel,padded,splits"


def case_id(case):
    kv_heads, group, seq_len, window, head_dim, dtype, pool_kernel, padded, splits = case
    return (
        f"hkv{kv_heads}-g{group}-T{seq_len}-w{window}-D{head_dim}-{str(dtype)[6:]}"
        f"-pool{pool_kernel}-{'padded' if padded else 'unpadded'}-splits{splits}"
    )


@pytest.mark.parametrize(CASE_NAMES, CASES, ids=[case_id(case) for case in CASES])
def test_matches_reference(
    monkeypatch, kv_heads, group, seq_len, window, head_dim, dtype, pool_kernel, padded, splits
):
    force_splits(monkeypatch, splits)
    q_obs, k = make_inputs(3, kv_heads, group, seq_len, window, head_dim, dtype)
    key_mask = left_padding_mask(3, seq_len, window) if padded else None
    assert_matches_reference(q_obs, k, key_mask=key_mask, pool_kernel=pool_kernel)


@pytest.mark.parametrize(
    "head_dim,dtype", [(96, torch.float16), (128, torch.bfloat16), (256, torch.float32)]
)
def test_large_head_dims(monkeypatch, head_dim, dtype):
    force_splits(monkeypatch, 2)
    q_obs, k = make_inputs(2, 1, 2, 20, 4, head_dim, dtype)
    assert_matches_reference(q_obs, k, key_mask=left_padding_mask(2, 20, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_inputs_and_scaling(monkeypatch, dtype):
    force_splits(monkeypatch, 2)
    q_obs, k = make_inputs(3, 2, 3, 70, 12, 80, dtype, strided=True)
    assert not q_obs.is_contiguous() and not k.is_contiguous()
    key_mask = torch.ones(3, 140, dtype=torch.bool)[:, ::2]  # a strided view of a wider mask
    key_mask[1, :20] = False
    assert_matches_reference(q_obs, k, key_mask=key_mask, scaling=0.3, pool_kernel=3)


def test_integer_scaling(monkeypatch):
    force_splits(monkeypatch, 1)
    q_obs, k = make_inputs(1, 1, 2, 30, 6, 64, torch.float32)
    assert_matches_reference(q_obs * 0.1, k, scaling=1)


def test_default_split_policy_on_long_prompt():
    # With one KV head, one row block and no forced split, a 600-token prompt is split 3 ways.
    assert window_scores_kernel.key_splits(600, 1, torch.device("cpu")) == 3
    q_obs, k = make_inputs(1, 1, 1, 600, 4, 64, torch.float16)
    assert_matches_reference(q_obs, k, key_mask=left_padding_mask(1, 600, 4))


def test_key_splits_policy():
    cpu = torch.device("cpu")
    assert window_scores_kernel.key_splits(100, 1, cpu) == 1  # too short to split
    assert window_scores_kernel.key_splits(100_000, 1000, cpu) == 1  # enough programs already
    assert window_scores_kernel.key_splits(100_000, 1, cpu) == window_scores_kernel.PROGRAMS_PER_SM


def test_rows_without_visible_keys_score_zero():
    q_obs, k = make_inputs(1, 1, 2, 12, 6, 64, torch.float32)
    key_mask = torch.zeros(1, 12, dtype=torch.bool)
    key_mask[0, -2:] = True  # only the last two window queries see a key
    out = assert_matches_reference(q_obs, k, key_mask=key_mask)
    assert torch.all(out[..., :-2] == 0)
    # Each of the two queries that sees a key contributes one unit of probability per head.
    torch.testing.assert_close(out.sum(), torch.tensor(2.0), rtol=1e-5, atol=1e-6)


def test_empty_batch():
    q_obs, k = make_inputs(0, 1, 2, 9, 3, 64, torch.float32)
    assert ops.window_scores(q_obs, k).shape == (0, 1, 9)


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 4),
    seq_len=st.integers(1, 80),
    window_fraction=st.floats(0.0, 1.0),
    head_dim=st.sampled_from([8, 32, 64, 80]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    pool_kernel=st.sampled_from([1, 3, 5]),
    splits=st.integers(1, 4),
    valid_lengths=st.lists(st.integers(0, 80), min_size=3, max_size=3),
)
def test_property_random_shapes(
    batch,
    kv_heads,
    group,
    seq_len,
    window_fraction,
    head_dim,
    dtype,
    pool_kernel,
    splits,
    valid_lengths,
):
    window = 1 + int(window_fraction * (min(seq_len, 20) - 1))
    key_mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    for row in range(batch):  # left padding; a row may even have no valid key at all
        key_mask[row, seq_len - min(valid_lengths[row], seq_len) :] = True
    q_obs, k = make_inputs(batch, kv_heads, group, seq_len, window, head_dim, dtype)
    with pytest.MonkeyPatch.context() as monkeypatch:
        force_splits(monkeypatch, splits)
        assert_matches_reference(q_obs, k, key_mask=key_mask, pool_kernel=pool_kernel)


def bad_inputs():
    q_obs = torch.randn(2, 4, 3, 64)
    k = torch.randn(2, 2, 10, 64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    return [
        (dict(q_obs=q_obs[0]), ValueError, "q_obs"),
        (dict(k=k[0]), ValueError, "k must have 4"),
        (dict(q_obs=q_obs.numpy()), TypeError, "q_obs"),
        (dict(q_obs=q_obs.long()), TypeError, "q_obs"),
        (dict(q_obs=q_obs[:1]), ValueError, "q_obs has batch size"),
        (dict(q_obs=q_obs[..., :32]), ValueError, "q_obs has head dim"),
        (dict(q_obs=torch.randn(2, 3, 3, 64)), ValueError, "q_obs has 3 heads"),
        (dict(q_obs=torch.randn(2, 4, 11, 64)), ValueError, "q_obs holds a window of 11"),
        (dict(q_obs=q_obs.half()), ValueError, "dtype for q_obs, k"),
        (dict(key_mask=mask[:, :9]), ValueError, "key_mask must have shape"),
        (dict(key_mask=mask[0]), ValueError, "key_mask must have 2"),
        (dict(key_mask=mask.float()), TypeError, "key_mask"),
        (dict(key_mask=mask.to("meta")), ValueError, "key_mask=meta"),
        (dict(scaling="0.1"), TypeError, "scaling"),
        (dict(scaling=True), TypeError, "scaling"),
        (dict(pool_kernel=2), ValueError, "pool_kernel"),
        (dict(pool_kernel=0), ValueError, "pool_kernel"),
        (dict(pool_kernel=3.0), TypeError, "pool_kernel"),
    ], dict(q_obs=q_obs, k=k, key_mask=mask)


@pytest.mark.parametrize("case", range(len(bad_inputs()[0])))
def test_rejects_bad_inputs(case):
    cases, good = bad_inputs()
    override, error, match = cases[case]
    args = {**good, **override}
    with pytest.raises(error, match=match):
        ops.window_scores(args.pop("q_obs"), args.pop("k"), **args)


CUDA_CASES = CASES + [
    (2, 4, 5000, 32, 128, torch.bfloat16, 1, True, 1),
    (1, 8, 3001, 64, 96, torch.float16, 3, True, 7),
    (2, 2, 1000, 16, 256, torch.bfloat16, 1, True, 3),
]


@pytest.mark.gpu
@pytest.mark.parametrize(CASE_NAMES, CUDA_CASES, ids=[case_id(case) for case in CUDA_CASES])
def test_matches_reference_cuda(
    monkeypatch, kv_heads, group, seq_len, window, head_dim, dtype, pool_kernel, padded, splits
):
    force_splits(monkeypatch, splits)
    q_obs, k = make_inputs(
        3, kv_heads, group, seq_len, window, head_dim, dtype, device="cuda", strided=splits % 2 == 1
    )
    key_mask = left_padding_mask(3, seq_len, window, device="cuda") if padded else None
    assert_matches_reference(q_obs, k, key_mask=key_mask, pool_kernel=pool_kernel)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_default_split_policy_cuda(dtype):
    q_obs, k = make_inputs(1, 2, 4, 20_000, 32, 128, dtype, device="cuda")
    assert window_scores_kernel.key_splits(20_000, 2, k.device) > 1
    assert_matches_reference(q_obs, k, key_mask=left_padding_mask(1, 20_000, 32, device="cuda"))


# ---------------------------------------------------------------------------------------------
# The fused chunk scores (what ChunkKV runs without pooling) and the split policy behind them
# ---------------------------------------------------------------------------------------------

# (kv_heads, group, seq_len, window, chunk_size, dtype, padded, splits)
CHUNK_CASES = [
    (2, 2, 100, 8, 10, torch.float32, True, 1),
    (1, 4, 300, 16, 10, torch.float16, True, 3),  # splits of 160 keys (lcm(10, 16))
    (2, 1, 129, 4, 1, torch.float32, True, 4),  # one-token chunks
    (1, 3, 257, 5, 7, torch.bfloat16, False, 5),  # more splits than the keys need: empty ones
    (3, 2, 90, 30, 17, torch.float32, True, 2),
    (1, 2, 40, 8, 64, torch.float32, True, 2),  # T - w < c: no chunk at all
    (2, 8, 600, 32, 10, torch.float32, True, 3),  # g * w = 256 rows: two row blocks
]
CHUNK_NAMES = "kv_heads,group,seq_len,window,chunk_size,dtype,padded,splits"


@pytest.mark.parametrize(CHUNK_NAMES, CHUNK_CASES)
def test_chunk_scores_equal_the_two_steps(
    monkeypatch, kv_heads, group, seq_len, window, chunk_size, dtype, padded, splits
):
    force_splits(monkeypatch, splits)
    q_obs, k = make_inputs(3, kv_heads, group, seq_len, window, 64, dtype, strided=splits == 3)
    key_mask = left_padding_mask(3, seq_len, window) if padded else None
    out = ops.window_chunk_scores(q_obs, k, chunk_size, key_mask=key_mask, scaling=0.2)
    scores = reference.window_scores(q_obs, k, key_mask=key_mask, scaling=0.2)
    expected = reference.chunk_sum(scores, chunk_size, window)
    assert out.dtype == torch.float32 and out.shape == expected.shape and out.is_contiguous()
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol * chunk_size)
    # The token scores of the same kernels, summed by the chunk-sum kernel, agree too.
    summed = ops.chunk_sum(
        ops.window_scores(q_obs, k, key_mask=key_mask, scaling=0.2), chunk_size, window
    )
    torch.testing.assert_close(out, summed, rtol=1e-5, atol=1e-6)


def test_chunk_scores_of_equal_keys_tie_across_splits(monkeypatch):
    """All-equal keys: every chunk's sum is bit-equal wherever it sits (the fused kernel adds a
    chunk's token scores in position order), across split boundaries too."""
    force_splits(monkeypatch, 3)
    k = torch.full((2, 2, 500, 16), 0.37)
    q_obs = torch.randn(2, 4, 8, 16)
    out = ops.window_chunk_scores(q_obs, k, 5)
    assert all(row.unique().numel() == 1 for row in out.flatten(0, 1))


def test_chunk_scores_reject_bad_chunking():
    q_obs, k = make_inputs(1, 1, 2, 30, 6, 64, torch.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        ops.window_chunk_scores(q_obs, k, 0)
    with pytest.raises(TypeError, match="chunk_size"):
        ops.window_chunk_scores(q_obs, k, 5.0)
    with pytest.raises(ValueError, match="q_obs has batch size"):
        ops.window_chunk_scores(q_obs[:0], k, 5)


def test_key_splits_cap_the_merge_cost(monkeypatch):
    """At the Llama-3-8B shape (g * w = 128 rows, D 128 bf16: 256-byte keys), B 1, 132 SMs:
    the merge each pass-2 program runs stays within 1/8 of its key bytes."""
    monkeypatch.setattr(window_scores_kernel, "multiprocessor_count", lambda device: 132)
    cuda = torch.device("cuda")
    splits = window_scores_kernel.key_splits
    assert splits(32768, 8, cuda) == 66  # 4 programs per SM, without the cap
    assert splits(32768, 8, cuda, 128, 256) == 32
    assert splits(8192, 8, cuda, 128, 256) == 16
    assert splits(131072, 8, cuda, 128, 256) == 64
    assert splits(131072, 256, cuda, 128, 256) == 3  # B 32: the rows fill the GPU
    for seq_len, count in ((32768, 32), (8192, 16), (131072, 64)):
        merge_bytes = count * 128 * 8
        key_bytes = seq_len / count * 256
        assert merge_bytes <= key_bytes * window_scores_kernel.MERGE_BYTES_PER_KEY_BYTE


@pytest.mark.parametrize("seq_len, splits, align", [(32768, 32, 80), (129, 4, 16), (40, 2, 1200)])
def test_split_length_is_aligned_and_covers_the_keys(seq_len, splits, align):
    length = window_scores_kernel.split_length(seq_len, splits, align)
    assert length % align == 0 and length * splits >= seq_len
    assert length - align < -(-seq_len // splits)  # the smallest such length

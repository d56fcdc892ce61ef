"""Selection policies: ChunkKV (SPEC), its variants and the baselines.

Every policy must return a well-formed ``Selection`` and keep the budget as the policies module
defines it; each baseline is also checked against a direct torch computation of its rule. Under
``TRITON_INTERPRET=1`` the ops run their Triton kernels in the interpreter: shapes stay small.
"""

import pytest
import torch
import torch.nn.functional as F

from triton_chunkkv.ops import reference
from triton_chunkkv.policies import (
    H2O,
    POLICIES,
    ChunkKV,
    FullKV,
    PhraseChunkKV,
    PyramidKV,
    Selection,
    SnapKV,
    StreamingLLM,
    kept_length,
    make_policy,
    observation_window,
    pyramid_budgets,
)

WINDOW = 8


class CharTokenizer:
    """Token ``i`` is character ``chr(i)``: phrase boundaries are visible in the ids."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def make_inputs(
    batch=1,
    num_kv_heads=2,
    group=2,
    seq_len=61,
    head_dim=16,
    window=WINDOW,
    dtype=torch.float32,
    seed=0,
):
    """Random queries (all ``seq_len`` of them) and keys; peaked attention, no ties."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_kv_heads * group, seq_len, head_dim, generator=generator)
    k = 2 * torch.randn(batch, num_kv_heads, seq_len, head_dim, generator=generator)
    return q.to(dtype), k.to(dtype)


def run(policy, q, k, budget, layer=0, num_layers=1, key_mask=None):
    window = observation_window(policy, k.shape[2])
    q_obs = q[:, :, k.shape[2] - window :] if window else None
    return policy.select(
        q_obs, k, budget=budget, layer=layer, num_layers=num_layers, key_mask=key_mask
    )


def check_well_formed(selection: Selection, batch, num_kv_heads, seq_len):
    idx = selection.chunk_idx
    assert idx.dtype == torch.int32 and idx.shape[:2] == (batch, num_kv_heads)
    assert 0 <= selection.tail_start <= seq_len
    if idx.numel():
        assert (idx[..., 1:] > idx[..., :-1]).all(), "indices must be unique and ascending"
        assert idx.min() >= 0
        assert (idx.max() + 1) * selection.chunk_size <= selection.tail_start


def token_policies():
    return [
        StreamingLLM(),
        H2O(recent=WINDOW),
        SnapKV(window=WINDOW),
        PhraseChunkKV(tokenizer=CharTokenizer(), window=WINDOW, max_chunk=6),
    ]


def prepared(policy, seq_len, batch=1, seed=0):
    """``policy`` after ``on_prompt`` with random text of letters, spaces and full stops."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([ord(c) for c in "abc de.fg "])[
        torch.randint(0, 10, (batch, seq_len), generator=generator)
    ]
    policy.on_prompt(ids)
    return policy


# ---------------------------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", range(4), ids=["streamingllm", "h2o", "snapkv", "phrase"])
@pytest.mark.parametrize("seq_len,budget", [(61, 20), (61, 9), (40, 39)])
def test_token_policies_keep_exactly_the_budget(make, seq_len, budget):
    policy = prepared(token_policies()[make], seq_len, batch=2)
    q, k = make_inputs(batch=2, seq_len=seq_len)
    selection = run(policy, q, k, budget)
    check_well_formed(selection, 2, 2, seq_len)
    assert selection.chunk_size == 1
    assert kept_length(selection, seq_len) == budget


@pytest.mark.parametrize("make", range(4), ids=["streamingllm", "h2o", "snapkv", "phrase"])
def test_budget_covering_the_prompt_keeps_everything(make):
    policy = prepared(token_policies()[make], 30)
    q, k = make_inputs(seq_len=30)
    assert run(policy, q, k, budget=30) is None
    assert run(FullKV(), q, k, budget=3) is None


def test_budget_below_the_window_keeps_the_window_alone():
    q, k = make_inputs()
    for policy in (SnapKV(window=WINDOW), H2O(recent=WINDOW), ChunkKV(chunk_size=4, window=WINDOW)):
        selection = run(policy, q, k, budget=3)
        assert selection.chunk_idx.shape[2] == 0
        assert kept_length(selection, 61) == 61 - selection.tail_start >= WINDOW


@pytest.mark.parametrize("make", range(4), ids=["streamingllm", "h2o", "snapkv", "phrase"])
def test_select_many_is_select_per_budget(make):
    policy = prepared(token_policies()[make], 61)
    q, k = make_inputs(seq_len=61)
    for candidate in (policy, PyramidKV(window=WINDOW), ChunkKV(chunk_size=4, window=WINDOW)):
        window = observation_window(candidate, 61)
        many = candidate.select_many(
            q[:, :, 61 - window :] if window else None,
            k,
            budgets=[12, 30, 61],
            layer=1,
            num_layers=3,
        )
        assert many[2] is None
        for budget, selection in zip((12, 30), many):
            expected = run(candidate, q, k, budget, layer=1, num_layers=3)
            assert torch.equal(selection.chunk_idx, expected.chunk_idx)
            assert selection.tail_start == expected.tail_start


@pytest.mark.parametrize("seq_len,budget,chunk_size", [(61, 30, 4), (61, 31, 10), (50, 20, 3)])
def test_chunkkv_keeps_whole_chunks_within_the_budget(seq_len, budget, chunk_size):
    q, k = make_inputs(seq_len=seq_len)
    selection = run(ChunkKV(chunk_size=chunk_size, window=WINDOW), q, k, budget)
    check_well_formed(selection, 1, 2, seq_len)
    assert budget - chunk_size < kept_length(selection, seq_len) <= budget


@pytest.mark.parametrize(
    "budget,num_layers,seq_len,window",
    [
        (100, 30, 1000, 32),
        (104, 30, 1044, 32),
        (20, 4, 61, 8),
        (7, 5, 100, 4),
        (50, 3, 60, 8),
        (33, 7, 40, 1),
    ],
)
def test_pyramid_budgets_sum_to_the_uniform_total(budget, num_layers, seq_len, window):
    budgets = pyramid_budgets(budget, num_layers, seq_len, window)
    assert len(budgets) == num_layers
    assert sum(budgets) == num_layers * budget
    assert all(a >= b for a, b in zip(budgets, budgets[1:])), "budgets decrease with depth"
    assert max(budgets) <= seq_len and min(budgets) >= window


@pytest.mark.parametrize(
    "budget,num_layers,seq_len", [(8, 4, 100), (5, 4, 100), (20, 1, 100), (100, 4, 100)]
)
def test_pyramid_budgets_fall_back_to_uniform(budget, num_layers, seq_len):
    assert pyramid_budgets(budget, num_layers, seq_len, window=8) == [budget] * num_layers


def test_pyramidkv_keeps_each_layers_budget():
    q, k = make_inputs(seq_len=61)
    budgets = pyramid_budgets(20, 4, 61, WINDOW)
    assert budgets[0] > budgets[-1]
    for layer, expected in enumerate(budgets):
        selection = run(PyramidKV(window=WINDOW), q, k, 20, layer=layer, num_layers=4)
        assert kept_length(selection, 61) == expected


def test_chunkkv_pyramid_budgets_apply_per_layer():
    q, k = make_inputs(seq_len=61)
    policy = ChunkKV(chunk_size=4, window=WINDOW, layer_budgets="pyramid")
    budgets = pyramid_budgets(30, 3, 61, WINDOW)
    for layer, layer_budget in enumerate(budgets):
        kept = kept_length(run(policy, q, k, 30, layer=layer, num_layers=3), 61)
        assert layer_budget - 4 < kept <= layer_budget


# ---------------------------------------------------------------------------------------------
# Each policy's rule against a direct torch computation
# ---------------------------------------------------------------------------------------------


def attention_scores(q, k, first_query):
    """float32 ``[B, Hkv, T]``: causal attention of queries ``first_query..T-1`` summed over
    the queries, averaged over each KV head's query heads."""
    B, Hq, T, D = q.shape
    g = Hq // k.shape[1]
    logits = q[:, :, first_query:].float() @ k.float().repeat_interleave(g, 1).transpose(-1, -2)
    logits = logits * D**-0.5
    causal = torch.arange(T)[None, :] <= torch.arange(first_query, T)[:, None]
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    return probs.sum(dim=2).view(B, k.shape[1], g, T).mean(dim=2)


def top_positions(scores, count):
    return scores.topk(count, dim=-1).indices.sort(dim=-1).values.int()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_chunkkv_default_is_spec(dtype):
    q, k = make_inputs(batch=2, seq_len=67, dtype=dtype)
    v = torch.randn_like(k)
    selection = run(ChunkKV(), q, k, budget=50)
    expected = reference.compress(q[:, :, -32:], k, v, budget=50)
    assert torch.equal(selection.chunk_idx, expected.chunk_idx)
    assert selection.tail_start == expected.tail_start


def test_snapkv_is_pooled_token_level_chunkkv():
    q, k = make_inputs(seq_len=61)
    selection = run(SnapKV(window=WINDOW, pool_kernel=5), q, k, budget=25)
    pooled = F.avg_pool1d(attention_scores(q, k, 61 - WINDOW), 5, 1, 2)
    assert torch.equal(selection.chunk_idx, top_positions(pooled[..., : 61 - WINDOW], 25 - WINDOW))
    assert selection.tail_start == 61 - WINDOW
    chunkkv = run(ChunkKV(chunk_size=1, window=WINDOW, pool_kernel=5), q, k, budget=25)
    assert torch.equal(selection.chunk_idx, chunkkv.chunk_idx)


@pytest.mark.parametrize("query_block", [512, 20])
def test_h2o_accumulates_attention_over_every_prompt_query(query_block):
    q, k = make_inputs(seq_len=61)
    selection = run(H2O(recent=WINDOW, query_block=query_block), q, k, budget=25)
    scores = attention_scores(q, k, 0)[..., : 61 - WINDOW]
    assert torch.equal(selection.chunk_idx, top_positions(scores, 25 - WINDOW))
    assert selection.tail_start == 61 - WINDOW


def test_h2o_without_every_query_raises():
    q, k = make_inputs(seq_len=61)
    with pytest.raises(ValueError, match="every prompt query"):
        H2O().select(q[:, :, -32:], k, budget=20, layer=0, num_layers=1)


def test_streamingllm_keeps_the_first_real_tokens_and_the_recent_ones():
    q, k = make_inputs(batch=2, seq_len=40)
    key_mask = torch.ones(2, 40, dtype=torch.bool)
    key_mask[1, :5] = False  # row 1 is left padded by 5
    selection = run(StreamingLLM(sink_tokens=4), q, k, budget=12, key_mask=key_mask)
    assert selection.tail_start == 40 - 8
    assert selection.chunk_idx[0].tolist() == [[0, 1, 2, 3]] * 2
    assert selection.chunk_idx[1].tolist() == [[5, 6, 7, 8]] * 2


def test_chunkkv_sink_tokens_keep_the_first_chunks():
    q, k = make_inputs(batch=2, seq_len=61)
    k[:, :, :12] *= 0.01  # the first tokens draw almost no attention
    key_mask = torch.ones(2, 61, dtype=torch.bool)
    key_mask[1, :6] = False
    plain = run(ChunkKV(chunk_size=4, window=WINDOW), q, k, 24, key_mask=key_mask)
    sinks = run(ChunkKV(chunk_size=4, window=WINDOW, sink_tokens=4), q, k, 24, key_mask=key_mask)
    assert not (plain.chunk_idx == 0).any()
    assert (sinks.chunk_idx[0, :, 0] == 0).all()  # tokens 0-3: chunk 0
    assert (sinks.chunk_idx[1, :, :2] == torch.tensor([1, 2], dtype=torch.int32)).all()  # 6-9
    assert sinks.chunk_idx.shape == plain.chunk_idx.shape


def test_phrase_chunks_follow_phrase_marks_and_max_chunk():
    policy = PhraseChunkKV(tokenizer=CharTokenizer(), window=WINDOW, max_chunk=4)
    ids = torch.tensor([[ord(c) for c in "ab. cdefghij, k"]])
    assert policy.segment_ids(ids)[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4]


def test_phrase_chunks_are_kept_whole_by_mean_score():
    scores = torch.tensor([[[1.0, 1.0, 9.0, 0.0, 0.0, 5.0, 5.0, 0.1]]])
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 3]])
    # Means: 11/3, 0, 5, 0.1. Chunk 2 (2 tokens) then chunk 0 (3 tokens) fit in 5.
    kept = PhraseChunkKV.kept_whole_chunks(scores, segments, 5)
    assert kept[0, 0].tolist() == [True, True, True, False, False, True, True, False]
    # With room for 4: chunk 2, then chunk 0 no longer fits.
    kept = PhraseChunkKV.kept_whole_chunks(scores, segments, 4)
    assert kept[0, 0].tolist() == [False] * 5 + [True, True, False]


def test_phrase_policy_per_layer_budgets_and_sinks():
    q, k = make_inputs(seq_len=90)
    pyramid = PhraseChunkKV(tokenizer=CharTokenizer(), window=WINDOW, layer_budgets="pyramid")
    kept = [
        kept_length(run(prepared(pyramid, 90), q, k, 30, layer=layer, num_layers=4), 90)
        for layer in range(4)
    ]
    assert kept == pyramid_budgets(30, 4, 90, WINDOW) and kept[0] > kept[-1]
    sinks = prepared(PhraseChunkKV(tokenizer=CharTokenizer(), window=WINDOW, sink_tokens=2), 90)
    selection = run(sinks, q, k, 30)
    assert kept_length(selection, 90) == 30
    assert selection.chunk_idx[0, :, :2].tolist() == [[0, 1], [0, 1]]  # the first two tokens


def test_phrase_policy_needs_the_prompt():
    q, k = make_inputs(seq_len=40)
    policy = PhraseChunkKV(tokenizer=CharTokenizer(), window=WINDOW)
    with pytest.raises(ValueError, match="on_prompt"):
        run(policy, q, k, budget=20)


# ---------------------------------------------------------------------------------------------
# Registry and arguments
# ---------------------------------------------------------------------------------------------


def test_registry_builds_every_policy():
    assert set(POLICIES) == {
        "chunkkv",
        "chunkkv_phrase",
        "fullkv",
        "streamingllm",
        "h2o",
        "snapkv",
        "pyramidkv",
    }
    for name in POLICIES:
        options = {"tokenizer": CharTokenizer()} if name == "chunkkv_phrase" else {}
        assert make_policy(name, **options).name == name
    assert observation_window(make_policy("h2o"), 77) == 77
    assert observation_window(make_policy("streamingllm"), 77) == 0


@pytest.mark.parametrize(
    "name,options,error,match",
    [
        ("nope", {}, ValueError, "policy must be one of"),
        ("chunkkv", {"layer_budgets": "steep"}, ValueError, "layer_budgets"),
        ("chunkkv", {"sink_tokens": -1}, ValueError, "sink_tokens"),
        ("chunkkv", {"chunk_size": 0}, ValueError, "chunk_size"),
        ("chunkkv", {"pool_kernel": 4}, ValueError, "pool_kernel"),
        ("snapkv", {"chunk_size": 10}, TypeError, "chunk_size"),
        ("h2o", {"recent": 0}, ValueError, "recent"),
        ("h2o", {"query_block": 0}, ValueError, "query_block"),
        ("streamingllm", {"sink_tokens": 1.5}, TypeError, "sink_tokens"),
        ("chunkkv_phrase", {}, TypeError, "tokenizer"),
        ("chunkkv_phrase", {"tokenizer": CharTokenizer(), "max_chunk": 0}, ValueError, "max_chunk"),
    ],
)
def test_bad_options_name_the_argument(name, options, error, match):
    with pytest.raises(error, match=match):
        make_policy(name, **options)


def test_chunkkv_refuses_a_window_other_than_its_own():
    q_obs, k = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 100, 16)
    with pytest.raises(ValueError, match="window=32"):
        ChunkKV(window=32).select(q_obs, k, budget=50, layer=0, num_layers=1)

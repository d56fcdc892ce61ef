"""The hand-written-model adapter: ChunkKVCache + chunkkv_attention on random tensors.

conftest sets TRITON_INTERPRET=1 and NaN-poisons kernel outputs; the truth is float32 softmax
attention over SPEC step 7's compacted cache followed by the generated tokens.
"""

import pytest
import torch

from triton_chunkkv import ops
from triton_chunkkv.integrations.torch_attention import ChunkKVCache, chunkkv_attention
from triton_chunkkv.ops import reference
from triton_chunkkv.policies import H2O, ChunkKV, Policy

TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
B, HQ, HKV, D = 2, 6, 2, 64
POLICY = dict(chunk_size=5, window=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def qkv(length, dtype=torch.float32):
    return (
        torch.randn(B, HQ, length, D).to(dtype),
        torch.randn(B, HKV, length, D).to(dtype),
        torch.randn(B, HKV, length, D).to(dtype),
    )


def attention(query, key, value):
    """float32 causal attention; query ``i`` sits at key index ``kv - q + i``."""
    group = HQ // HKV
    key, value = key.float().repeat_interleave(group, 1), value.float().repeat_interleave(group, 1)
    logits = torch.einsum("bhqd,bhkd->bhqk", query.float(), key) * D**-0.5
    q_len, kv_len = query.shape[2], key.shape[2]
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bhkd->bhqd", probs, value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["evict", "sparse"])
def test_prefill_compresses_and_decode_attends_to_the_kept_tokens(mode, dtype):
    T = 97  # odd: the dense tail holds a partial chunk
    query, key, value = qkv(T, dtype)
    cache = ChunkKVCache(budget=30, policy=ChunkKV(**POLICY), mode=mode)
    out = chunkkv_attention(query, key, value, cache)
    torch.testing.assert_close(out.float(), attention(query, key, value), **TOLERANCES[dtype])

    expected = ops.compress(query[:, :, -8:], key, value, budget=30, **POLICY)
    assert torch.equal(cache.selection.chunk_idx, expected.chunk_idx)
    assert cache.seq_len == T
    if mode == "evict":
        assert torch.equal(cache.keys, expected.keys) and torch.equal(cache.values, expected.values)
    else:
        assert cache.keys is key

    kept_k, kept_v = expected.keys, expected.values
    for step in range(3):  # one token, then two at once (causal between them), then one
        q_len = 2 if step == 1 else 1
        q_new, k_new, v_new = qkv(q_len, dtype)
        out = chunkkv_attention(q_new, k_new, v_new, cache)
        kept_k, kept_v = torch.cat([kept_k, k_new], 2), torch.cat([kept_v, v_new], 2)
        assert out.shape == q_new.shape and out.dtype == dtype
        torch.testing.assert_close(
            out.float(), attention(q_new, kept_k, kept_v), **TOLERANCES[dtype]
        )
    assert cache.seq_len == T + 4


def test_question_mode_selects_again_on_a_question():
    """A several-token call on a question-mode cache attends to everything so far and selects
    as a prefill of everything so far would; the steps after it read that selection. A call
    shorter than the policy's window selects with all of its queries."""
    T = 97
    query, key, value = qkv(T)
    cache = ChunkKVCache(budget=30, policy=ChunkKV(**POLICY), mode="question")
    chunkkv_attention(query, key, value, cache)
    q_new, k_new, v_new = qkv(11)  # the question
    out = chunkkv_attention(q_new, k_new, v_new, cache)
    keys, values = torch.cat([key, k_new], 2), torch.cat([value, v_new], 2)
    torch.testing.assert_close(out, attention(q_new, keys, values), **TOLERANCES[torch.float32])
    expected = ops.compress(q_new[:, :, -8:], keys, values, budget=30, **POLICY)
    assert torch.equal(cache.selection.chunk_idx, expected.chunk_idx)
    assert cache.seq_len == T + 11 and cache.keys.shape[2] == T + 11
    q_step, k_step, v_step = qkv(1)
    out = chunkkv_attention(q_step, k_step, v_step, cache)
    kept_k, kept_v = torch.cat([expected.keys, k_step], 2), torch.cat([expected.values, v_step], 2)
    torch.testing.assert_close(out, attention(q_step, kept_k, kept_v), **TOLERANCES[torch.float32])
    q_short, k_short, v_short = qkv(3)  # shorter than the window: it scores with its 3 queries
    chunkkv_attention(q_short, k_short, v_short, cache)
    keys = torch.cat([keys, k_step, k_short], 2)
    shrunk = ops.compress(q_short, keys, keys, budget=30, chunk_size=5, window=3)
    assert torch.equal(cache.selection.chunk_idx, shrunk.chunk_idx)
    assert cache.selection.tail_start == shrunk.tail_start and cache.seq_len == T + 15


def test_question_mode_question_shorter_than_a_fixed_window_raises():
    """A policy whose window cannot be shrunk (not a dataclass field) refuses a question
    shorter than its window with a ValueError naming both, and the cache is left as it was."""

    class FixedWindow(Policy):
        window = 8
        name = "fixed"

        def select(self, q_obs, k, *, budget, layer, num_layers, **kwargs):
            return ChunkKV(**POLICY).select(
                q_obs, k, budget=budget, layer=layer, num_layers=num_layers
            )

    cache = ChunkKVCache(budget=30, policy=FixedWindow(), mode="question")
    chunkkv_attention(*qkv(97), cache)
    selection = cache.selection
    with pytest.raises(ValueError, match="3 tokens is shorter than fixed's window 8"):
        chunkkv_attention(*qkv(3), cache)
    assert cache.selection is selection and cache.seq_len == 97


def test_budget_covering_the_prompt_keeps_everything():
    query, key, value = qkv(60)
    cache = ChunkKVCache(ratio=1.0, policy=ChunkKV(**POLICY), mode="sparse")
    chunkkv_attention(query, key, value, cache)
    assert cache.selection is None and cache.keys is key
    q_new, k_new, v_new = qkv(1)
    out = chunkkv_attention(q_new, k_new, v_new, cache)
    full_k, full_v = torch.cat([key, k_new], 2), torch.cat([value, v_new], 2)
    torch.testing.assert_close(out, attention(q_new, full_k, full_v), **TOLERANCES[torch.float32])


def test_prompt_shorter_than_the_window_is_kept_whole():
    cache = ChunkKVCache(budget=2, policy=ChunkKV(**POLICY))
    chunkkv_attention(*qkv(5), cache)
    assert cache.selection is None and cache.keys.shape[2] == 5


def test_leader_selection_is_reused_without_scoring():
    leader = ChunkKVCache(ratio=0.3, policy=ChunkKV(**POLICY), layer=0, num_layers=2)
    follower = ChunkKVCache(
        ratio=0.3, policy=ChunkKV(**POLICY), layer=1, num_layers=2, leader=leader
    )
    chunkkv_attention(*qkv(81), leader)
    query, key, value = qkv(81)
    chunkkv_attention(query.fill_(float("nan")), key, value, follower)  # queries never read
    assert follower.selection is leader.selection
    s = leader.selection
    expected_k, _ = ops.gather_chunks(key, value, s.chunk_idx, s.chunk_size, s.tail_start)
    assert torch.equal(follower.keys, expected_k)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: ChunkKVCache(budget=3, ratio=0.1), ValueError, "exactly one of budget and ratio"),
        (lambda: ChunkKVCache(budget=3, mode="dense"), ValueError, "mode"),
        (lambda: ChunkKVCache(budget=3, mode="question", policy=H2O()), ValueError, "window"),
        (lambda: ChunkKVCache(budget=3, policy="chunkkv"), TypeError, "policy"),
        (lambda: ChunkKVCache(budget=3, layer=2, num_layers=2), ValueError, "num_layers"),
        (lambda: ChunkKVCache(budget=3, leader=object()), TypeError, "leader"),
        (lambda: chunkkv_attention(*qkv(4), cache=None), TypeError, "cache"),
        (
            lambda: chunkkv_attention(torch.randn(B, 5, 4, D), *qkv(4)[1:], ChunkKVCache(budget=3)),
            ValueError,
            "query has 5 heads",
        ),
        (
            lambda: chunkkv_attention(qkv(4)[0], *qkv(3)[1:], ChunkKVCache(budget=3)),
            ValueError,
            "key and value",
        ),
        (
            lambda: chunkkv_attention(qkv(4)[0].int(), *qkv(4)[1:], ChunkKVCache(budget=3)),
            TypeError,
            "query must have dtype",
        ),
    ],
)
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_a_refused_call_leaves_the_cache_as_it_was():
    """A call with a wrong dtype must not append to the cache first (it once did: the next good
    call then saw the prompt twice and compressed nothing)."""
    cache = ChunkKVCache(budget=30, policy=ChunkKV(**POLICY))
    query, key, value = qkv(60)
    with pytest.raises(ValueError, match="dtype"):
        chunkkv_attention(query.half(), key, value, cache)
    assert cache.seq_len == 0 and cache.keys is None
    chunkkv_attention(query, key, value, cache)
    assert cache.seq_len == 60 and cache.selection is not None
    q_new, k_new, v_new = qkv(1)
    with pytest.raises(ValueError, match="dtype"):
        chunkkv_attention(q_new, k_new.half(), v_new, cache)
    assert cache.seq_len == 60 and cache.keys.shape[2] == 30


def test_for_layers_wires_the_group_leaders():
    caches = ChunkKVCache.for_layers(5, reuse_layers=2, ratio=0.3, policy=ChunkKV(**POLICY))
    assert [c.leader for c in caches] == [None, caches[0], None, caches[2], None]
    for cache in caches:
        chunkkv_attention(*qkv(81), cache)
    assert caches[1].selection is caches[0].selection
    assert caches[3].selection is caches[2].selection


def test_dynamic_mode_reads_each_steps_best_chunks():
    """Every step picks the chunks whose key bounds score highest against its own query
    (float64 bounds computed here), and attends to them plus the tail and the new tokens."""
    T, budget, c, w = 97, 30, 5, 8
    query, key, value = qkv(T)
    cache = ChunkKVCache(budget=budget, policy=ChunkKV(chunk_size=c, window=w), mode="dynamic")
    chunkkv_attention(query, key, value, cache)
    assert cache.keys is key and cache.selection is None
    tail = reference.tail_start(T, c, w)
    n_keep = reference.num_kept_chunks(T, budget, c, w)
    keys, values = key, value
    for _ in range(3):
        q_new, k_new, v_new = qkv(1)
        out = chunkkv_attention(q_new, k_new, v_new, cache)
        keys, values = torch.cat([keys, k_new], 2), torch.cat([values, v_new], 2)
        chunks = key[:, :, :tail].double().reshape(B, HKV, tail // c, c, D)
        lo, hi = chunks.amin(3), chunks.amax(3)
        q = q_new[:, :, 0].double().view(B, HKV, HQ // HKV, 1, D)
        bound = torch.maximum(q * lo[:, :, None], q * hi[:, :, None]).sum(-1).amax(2)
        chosen = reference.select_chunks(bound.float(), n_keep)
        kept_k, kept_v = reference.gather_chunks(keys, values, chosen, c, tail)
        torch.testing.assert_close(out, attention(q_new, kept_k, kept_v), rtol=1e-4, atol=1e-5)


def test_dynamic_mode_with_a_prompt_shorter_than_the_window():
    cache = ChunkKVCache(budget=3, policy=ChunkKV(chunk_size=5, window=8), mode="dynamic")
    query, key, value = qkv(6)
    chunkkv_attention(query, key, value, cache)
    q_new, k_new, v_new = qkv(1)
    out = chunkkv_attention(q_new, k_new, v_new, cache)  # everything is the dense tail
    full_k, full_v = torch.cat([key, k_new], 2), torch.cat([value, v_new], 2)
    torch.testing.assert_close(out, attention(q_new, full_k, full_v), rtol=1e-4, atol=1e-5)

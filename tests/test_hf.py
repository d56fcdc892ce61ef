"""The HuggingFace adapter on tiny random Llama / Qwen2 / Mistral models (CPU, fp32, greedy).

conftest sets TRITON_INTERPRET=1, so the ops inside the adapter run the Triton kernels through
the interpreter. Prompts are short and the observation window small (``WINDOW=8``,
``CHUNK=4``) so that a 10 % budget still keeps whole chunks beside the dense tail.
"""

import inspect

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import (
    AttentionInterface,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from triton_chunkkv import ops
from triton_chunkkv.integrations.hf import ATTENTION_NAME, CompressedLayer, cache_kwargs, chunkkv
from triton_chunkkv.ops import reference
from triton_chunkkv.policies import H2O, ChunkKV, Policy, Selection

WINDOW, CHUNK = 8, 4
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(family="llama", num_layers=2, dtype=torch.float32, **overrides):
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        initializer_range=0.1,
        **overrides,
    )
    torch.manual_seed(0)
    return model_cls(config).to(dtype).eval()


def prompt(length, seed=1, batch=1):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, input_ids, new_tokens=6, **kwargs):
    with torch.no_grad():
        out = model.generate(
            input_ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs
        )
    return out[:, input_ids.shape[1] :]


def capture_prefill(model, input_ids):
    """Each layer's prefill ``(query, key, value)`` (RoPE applied), from a plain SDPA run."""
    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        captured[module.layer_idx] = (query.clone(), key.clone(), value.clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("capture_qkv", capture)
    previous = model.config._attn_implementation
    model.set_attn_implementation("capture_qkv")
    try:
        with torch.no_grad():
            model(
                input_ids, **cache_kwargs(model, DynamicCache(config=model.config)), use_cache=True
            )
    finally:
        model.set_attn_implementation(previous)
    return [captured[layer] for layer in range(len(captured))]


def spec_kept_length(seq_len, budget):
    p0 = reference.tail_start(seq_len, CHUNK, WINDOW)
    n_keep = reference.num_kept_chunks(seq_len, budget, CHUNK, WINDOW)
    return n_keep * CHUNK + seq_len - p0


# ---------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("mode", ["evict", "sparse", "dynamic", "question"])
def test_budget_covering_prompt_is_plain_generate(family, mode):
    model = tiny_model(family)
    input_ids = prompt(77)
    expected = greedy(model, input_ids, new_tokens=8)
    with chunkkv(model, budget=77, mode=mode) as state:  # an all-ones mask masks nothing
        got = greedy(model, input_ids, new_tokens=8, attention_mask=torch.ones_like(input_ids))
    assert torch.equal(got, expected)
    assert state.selections == [None, None]
    assert state.kept_lengths == [[77], [77]]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_evicted_cache_is_ops_compress_of_the_prefill(family):
    model = tiny_model(family)
    input_ids = prompt(203)  # odd length: a partial chunk joins the dense tail
    layers = capture_prefill(model, input_ids)
    cache = DynamicCache(config=model.config)
    with chunkkv(model, ratio=0.1, chunk_size=CHUNK, window=WINDOW) as state, torch.no_grad():
        model(input_ids, **cache_kwargs(model, cache), use_cache=True)
    kept = spec_kept_length(203, 20)
    assert kept < 203
    for layer, (query, key, value) in enumerate(layers):
        expected = ops.compress(
            query[:, :, -WINDOW:],
            key,
            value,
            ratio=0.1,
            chunk_size=CHUNK,
            window=WINDOW,
            scaling=model.config.head_dim**-0.5,
        )
        stored = cache.layers[layer]
        assert isinstance(stored, CompressedLayer)
        assert stored.keys.shape[2] == kept
        torch.testing.assert_close(stored.keys, expected.keys, rtol=0, atol=0)
        torch.testing.assert_close(stored.values, expected.values, rtol=0, atol=0)
        assert torch.equal(state.selections[layer].chunk_idx, expected.chunk_idx)
        assert state.kept_lengths[layer] == [kept]
    assert cache.get_seq_length() == 203  # true positions: the next token is position 203


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_evict_and_sparse_decode_the_same_tokens(family):
    model = tiny_model(family)
    input_ids = prompt(150)
    with chunkkv(model, ratio=0.1, chunk_size=CHUNK, window=WINDOW, mode="evict") as state:
        evicted = greedy(model, input_ids, new_tokens=8)
    assert state.kept_lengths == [[spec_kept_length(150, 15)]] * 2
    with chunkkv(model, ratio=0.1, chunk_size=CHUNK, window=WINDOW, mode="sparse"):
        sparse = greedy(model, input_ids, new_tokens=8)
    assert torch.equal(evicted, sparse)
    assert not torch.equal(evicted, greedy(model, input_ids, new_tokens=8))  # it did drop tokens


def test_generate_at_ratio_0_2_keeps_spec_lengths_in_both_modes():
    """The environments check (transformers 5.17 to the newest): a tiny GQA Llama keeps SPEC's
    lengths, the evict cache holds them plus the generated tokens, and both modes agree."""
    model = tiny_model()
    input_ids = prompt(180)
    tokens = {}
    for mode in ("evict", "sparse"):
        with chunkkv(model, ratio=0.2, chunk_size=CHUNK, window=WINDOW, mode=mode) as state:
            with torch.no_grad():
                out = model.generate(
                    input_ids,
                    max_new_tokens=5,
                    do_sample=False,
                    pad_token_id=0,
                    return_dict_in_generate=True,
                )
        kept = spec_kept_length(180, 36)
        assert state.prefills == 1
        assert state.kept_lengths == [[kept], [kept]]
        stored = out.past_key_values.layers[0].keys.shape[2]
        # generate writes the last generated token's KV only if it runs one more step
        assert stored in (kept + 4, kept + 5) if mode == "evict" else stored in (184, 185)
        tokens[mode] = out.sequences[:, 180:]
    assert torch.equal(tokens["evict"], tokens["sparse"])


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_keep_ratio_is_the_fraction_kept():
    model = tiny_model()
    input_ids = prompt(180)
    with chunkkv(model, keep_ratio=0.2, chunk_size=CHUNK, window=WINDOW) as named:
        expected = greedy(model, input_ids)
    with chunkkv(model, ratio=0.2, chunk_size=CHUNK, window=WINDOW) as older:
        assert torch.equal(greedy(model, input_ids), expected)
    assert named.kept_lengths == older.kept_lengths == [[spec_kept_length(180, 36)]] * 2
    with pytest.raises(ValueError, match="keep_ratio or its older name ratio"):
        with chunkkv(model, keep_ratio=0.2, ratio=0.2):
            pass


@pytest.mark.parametrize("how", ["past_key_values", "cache", "positional"])
def test_the_cache_is_found_however_it_is_passed(how):
    """transformers renamed ``past_key_values`` to ``cache`` in 5.24; the adapter finds the
    cache object by type."""
    model = tiny_model()
    parameters = inspect.signature(model.forward).parameters
    if how == "cache" and how not in parameters:
        pytest.skip(f"transformers {transformers.__version__} has no {how!r} argument")
    input_ids = prompt(120)
    cache = DynamicCache(config=model.config)
    with chunkkv(model, ratio=0.2, chunk_size=CHUNK, window=WINDOW) as state, torch.no_grad():
        if how == "positional":  # (input_ids, attention_mask, position_ids, cache)
            model(input_ids, None, None, cache, use_cache=True)
        else:
            model(input_ids, **{how: cache}, use_cache=True)
    assert state.prefills == 1
    assert isinstance(cache.layers[0], CompressedLayer)
    assert cache.layers[0].keys.shape[2] == spec_kept_length(120, 24)


def test_a_prefill_without_a_cache_raises_instead_of_compressing_nothing():
    model = tiny_model()
    with chunkkv(model, ratio=0.2) as state, torch.no_grad():
        with pytest.raises(RuntimeError, match=r"no KV cache .*transformers \d"):
            model(prompt(100), use_cache=False)
    with pytest.raises(RuntimeError, match="compressed no prefill"):
        state.require_prefill()


def test_attention_function_takes_sdpa_arguments_positionally():
    """Third-party patches (kvpress) wrap every registered attention function and pass
    ``dropout`` and ``scaling`` positionally, in ``sdpa_attention_forward``'s order."""
    registered = ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME]

    def positional_wrapper(
        module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
    ):
        return registered(module, query, key, value, attention_mask, dropout, scaling, **kwargs)

    model = tiny_model()
    input_ids = prompt(150)
    with chunkkv(model, ratio=0.1, chunk_size=CHUNK, window=WINDOW):
        expected = greedy(model, input_ids)
    AttentionInterface.register(ATTENTION_NAME, positional_wrapper)
    try:
        with chunkkv(model, ratio=0.1, chunk_size=CHUNK, window=WINDOW) as state:
            got = greedy(model, input_ids)
    finally:
        AttentionInterface.register(ATTENTION_NAME, registered)
    assert state.prefills == 1
    assert torch.equal(got, expected)


def attention_over_retained(selections, prompt_len, group):
    """A reference attention function for a whole-sequence forward: prompt queries attend
    densely and causally; every later query attends causally to the appended tokens and, of
    the prompt, only to its layer's and KV head's retained set (SPEC ``R(b, h)``)."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **_):
        S = key.shape[2]
        selection = selections[module.layer_idx]
        pos = torch.arange(S)
        allowed = (pos[None, :] <= pos[:, None])[None, None]  # [1, 1, S, S] causal
        if selection is not None:
            kept = reference.retained_mask(
                selection.chunk_idx, selection.chunk_size, selection.tail_start, prompt_len, S
            )  # [B, Hkv, S]: kept prompt positions (positions >= prompt_len are False)
            visible = kept | (pos >= prompt_len)
            late_query = (pos >= prompt_len)[:, None]
            allowed = allowed & (~late_query | visible.repeat_interleave(group, 1)[:, :, None])
        keys = key.repeat_interleave(group, 1)
        values = value.repeat_interleave(group, 1)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=allowed, scale=scaling)
        return out.transpose(1, 2), None

    return attention


@pytest.mark.parametrize("mode", ["evict", "sparse"])
def test_context_then_question_then_a_second_turn(mode):
    """Several-token calls on a compressed cache (a question after the context, a second user
    turn after the answer) attend to the retained set plus everything appended since, causally:
    the same logits as a dense forward over the whole sequence with the dropped prompt tokens
    masked out for the later queries."""
    model = tiny_model()
    context, question, turn = prompt(150), prompt(7, seed=2), prompt(5, seed=3)
    cache = DynamicCache(config=model.config)
    logits, tokens = [], []
    with chunkkv(model, budget=40, chunk_size=CHUNK, window=WINDOW, mode=mode) as state:
        with torch.no_grad():
            model(context, **cache_kwargs(model, cache))
            for segment in (question, None, None, turn, None):
                step = segment if segment is not None else tokens[-1][:, -1:]
                out = model(step, **cache_kwargs(model, cache)).logits
                logits.append(out)
                tokens.append(torch.cat([step, out[:, -1:].argmax(-1)], dim=1)[:, -1:])
    assert state.prefills == 1 and state.kept_lengths[0][0] < 150
    assert cache.get_seq_length() == 150 + 7 + 2 + 5 + 1
    fed = [question, tokens[0], tokens[1], turn, tokens[3]]
    sequence = torch.cat([context, *fed], dim=1)
    AttentionInterface.register(
        "retained_reference", attention_over_retained(state.selections, 150, group=2)
    )
    previous = model.config._attn_implementation
    model.set_attn_implementation("retained_reference")
    try:
        with torch.no_grad():
            expected = model(sequence, use_cache=False).logits
    finally:
        model.set_attn_implementation(previous)
    start = 150
    for got, segment in zip(logits, fed):
        n = segment.shape[1]
        torch.testing.assert_close(got, expected[:, start : start + n], rtol=1e-4, atol=1e-4)
        start += n


def sparse_run(model, sequence, steps, **options):
    """``(state, logits of each of steps)`` of a sparse-mode prefill of ``sequence`` followed
    by the one-token ``steps``: what question mode must give after a question."""
    cache = DynamicCache(config=model.config)
    with chunkkv(model, mode="sparse", **options) as state, torch.no_grad():
        model(sequence, **cache_kwargs(model, cache))
        logits = [model(step, **cache_kwargs(model, cache)).logits for step in steps]
    return state, logits


def test_question_mode_selects_again_on_each_question():
    """``mode="question"``: a several-token call after the prefill attends to the whole cache
    (the full model's logits), then selects as a sparse-mode prefill of everything so far
    would (same chunks); the one-token steps after it read that selection (the same logits as
    that sparse-mode run). A second question selects again, the policy shown the whole
    sequence's ids (decoded tokens included)."""
    model = tiny_model()
    context, question, second = prompt(150), prompt(12, seed=2), prompt(9, seed=3)
    steps = [prompt(1, seed=10 + i) for i in range(3)]
    policy = RecordingChunkKV(chunk_size=CHUNK, window=WINDOW)
    options = dict(budget=40, policy=policy)
    cache = DynamicCache(config=model.config)
    with chunkkv(model, mode="question", **options) as state, torch.no_grad():
        model(context, **cache_kwargs(model, cache))
        question_logits = model(question, **cache_kwargs(model, cache)).logits
        logits = [model(step, **cache_kwargs(model, cache)).logits for step in steps]
        selections = list(state.selections)
        model(second, **cache_kwargs(model, cache))
    sequence = torch.cat([context, question], dim=1)
    whole = torch.cat([sequence, *steps, second], dim=1)
    assert state.prefills == 3 and cache.get_seq_length() == whole.shape[1]
    assert [ids.shape[1] for ids in policy.prompts[::2]] == [150, 162, whole.shape[1]]
    assert torch.equal(policy.prompts[-1], whole)
    assert state.selections[0].tail_start == reference.tail_start(whole.shape[1], CHUNK, WINDOW)
    with torch.no_grad():
        dense = model(sequence, use_cache=False).logits
    torch.testing.assert_close(question_logits, dense[:, 150:], rtol=1e-4, atol=1e-4)
    alone, expected = sparse_run(model, sequence, steps, **options)
    for got, want in zip(selections, alone.selections):
        assert torch.equal(got.chunk_idx, want.chunk_idx) and got.tail_start == want.tail_start
    for got, want in zip(logits, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_question_mode_padded_rows_equal_rows_alone():
    model = tiny_model("qwen2")
    lengths = (141, 118, 97)
    rows = [prompt(n, seed=n) for n in lengths]
    question = prompt(10, seed=5)
    width = max(lengths)
    context = torch.cat([F.pad(r, (width - r.shape[1], 0)) for r in rows])
    mask = torch.ones(len(rows), width + question.shape[1], dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, : width - n] = 0
    options = dict(keep_ratio=0.15, chunk_size=CHUNK, window=WINDOW, mode="question")

    def ask(context, mask):
        cache = DynamicCache(config=model.config)
        with chunkkv(model, **options) as state, torch.no_grad():
            T = context.shape[1]
            positions = (mask[:, :T].cumsum(-1) - 1).clamp(min=0)  # as generate counts them
            model(
                context,
                attention_mask=mask[:, :T],
                position_ids=positions,
                **cache_kwargs(model, cache),
            )
            batch = len(context)
            full = torch.cat([context, question.expand(batch, -1)], dim=1)
            out = model.generate(
                full,
                attention_mask=mask,
                **cache_kwargs(model, cache),
                max_new_tokens=5,
                do_sample=False,
                pad_token_id=0,
            )
        return state, out[:, full.shape[1] :]

    state, batch = ask(context, mask)
    assert state.prefills == 2
    assert state.prompt_lengths == [n + question.shape[1] for n in lengths]
    for row, ids in enumerate(rows):
        alone, tokens = ask(ids, torch.ones(1, ids.shape[1] + question.shape[1], dtype=torch.long))
        assert torch.equal(batch[row : row + 1], tokens)
        for layer in range(2):
            assert torch.equal(
                state.row_selection(layer, row).chunk_idx, alone.row_selection(layer, 0).chunk_idx
            )


def test_padding_after_the_compressed_prompt_is_refused():
    model = tiny_model()
    cache = DynamicCache(config=model.config)
    input_ids = prompt(100, batch=2)
    with chunkkv(model, budget=40, chunk_size=CHUNK, window=WINDOW), torch.no_grad():
        model(input_ids, **cache_kwargs(model, cache))
        mask = torch.ones(2, 104, dtype=torch.long)
        mask[1, 100:102] = 0  # the second row's question is two tokens shorter
        with pytest.raises(ValueError, match="padding after the compressed prompt"):
            model(prompt(4, batch=2), attention_mask=mask, **cache_kwargs(model, cache))


def test_forward_calls_keep_true_positions():
    """A hand-written decode loop (no position_ids: the model reads them off the cache length)
    gives what generate gives."""
    model = tiny_model()
    input_ids = prompt(150)
    with chunkkv(model, ratio=0.1, chunk_size=CHUNK, window=WINDOW) as state, torch.no_grad():
        expected = greedy(model, input_ids, new_tokens=5)
        cache = DynamicCache(config=model.config)
        logits = model(input_ids, **cache_kwargs(model, cache), use_cache=True).logits
        tokens = []
        for _ in range(5):
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
            logits = model(tokens[-1], **cache_kwargs(model, cache), use_cache=True).logits
    assert torch.equal(torch.cat(tokens, dim=1), expected)
    assert cache.layers[0].keys.shape[2] == state.kept_lengths[0][0] + 5
    assert cache.get_seq_length() == 155


def test_half_precision_cache_is_ops_compress():
    model = tiny_model(dtype=torch.bfloat16)
    input_ids = prompt(123)
    query, key, value = capture_prefill(model, input_ids)[1]
    cache = DynamicCache(config=model.config)
    with chunkkv(model, budget=40, chunk_size=CHUNK, window=WINDOW), torch.no_grad():
        model(input_ids, **cache_kwargs(model, cache), use_cache=True)
    expected = ops.compress(
        query[:, :, -WINDOW:],
        key,
        value,
        budget=40,
        chunk_size=CHUNK,
        window=WINDOW,
        scaling=16**-0.5,
    )
    assert cache.layers[1].keys.dtype == torch.bfloat16
    assert torch.equal(cache.layers[1].keys, expected.keys)


# ---------------------------------------------------------------------------------------------
# Layer reuse, batches, policies
# ---------------------------------------------------------------------------------------------


class RecordingChunkKV(ChunkKV):
    """ChunkKV that records which layers it scored and the prompts it was shown."""

    def __post_init__(self):
        super().__post_init__()
        self.scored_layers, self.prompts = [], []

    def on_prompt(self, input_ids):
        self.prompts.append(input_ids)

    def select(self, q_obs, k, *, layer, **kwargs):
        self.scored_layers.append(layer)
        return super().select(q_obs, k, layer=layer, **kwargs)


def test_reused_layers_hold_their_group_leaders_indices():
    model = tiny_model(num_layers=4)
    input_ids = prompt(130)
    layers = capture_prefill(model, input_ids)
    policy = RecordingChunkKV(chunk_size=CHUNK, window=WINDOW)
    cache = DynamicCache(config=model.config)
    with chunkkv(model, ratio=0.2, reuse_layers=2, policy=policy) as state, torch.no_grad():
        model(input_ids, **cache_kwargs(model, cache), use_cache=True)
    assert policy.scored_layers == [0, 2]  # reused layers never compute scores
    for layer in (1, 3):
        leader = state.selections[layer - 1]
        assert state.selections[layer] is leader
        _, key, value = layers[layer]
        keys, _ = ops.gather_chunks(key, value, leader.chunk_idx, CHUNK, leader.tail_start)
        assert torch.equal(cache.layers[layer].keys, keys)
    assert not torch.equal(state.selections[0].chunk_idx, state.selections[2].chunk_idx)


@pytest.mark.parametrize("mode", ["evict", "sparse", "question"])
def test_left_padded_batch_rows_equal_rows_alone(mode):
    model = tiny_model("qwen2")
    lengths = (141, 118, 97)
    rows = [prompt(n, seed=n) for n in lengths]
    width = max(lengths)
    input_ids = torch.cat([torch.nn.functional.pad(r, (width - r.shape[1], 0)) for r in rows])
    attention_mask = (input_ids != 0).long()
    for row, n in enumerate(lengths):
        attention_mask[row, : width - n] = 0
    policy = RecordingChunkKV(chunk_size=CHUNK, window=WINDOW)
    with chunkkv(model, ratio=0.15, mode=mode, policy=policy) as state:
        batch = greedy(model, input_ids, new_tokens=6, attention_mask=attention_mask)
    assert state.prompt_lengths == list(lengths)
    assert all(kept < n for kept, n in zip(state.kept_lengths[0], lengths))
    # each row is selected on its own unpadded prompt, shown to the policy first
    assert [ids.shape[1] for ids in policy.prompts] == list(lengths) * 2
    assert all(torch.equal(seen, rows[i % 3]) for i, seen in enumerate(policy.prompts))
    options = dict(ratio=0.15, chunk_size=CHUNK, window=WINDOW, mode=mode)
    for row, ids in enumerate(rows):
        with chunkkv(model, **options) as alone:
            assert torch.equal(batch[row : row + 1], greedy(model, ids, new_tokens=6))
        for layer in range(2):
            assert torch.equal(
                state.row_selection(layer, row).chunk_idx, alone.row_selection(layer, 0).chunk_idx
            )
            assert state.kept_lengths[layer][row] == alone.kept_lengths[layer][0]


def test_dynamic_mode_padded_rows_equal_rows_alone():
    """Dynamic mode selects at every decode step on each row's own chunk grid: a left-padded
    batch decodes what each row decodes alone, and the budget is what a step reads."""
    model = tiny_model("qwen2")
    lengths = (141, 118, 97)
    rows = [prompt(n, seed=n) for n in lengths]
    width = max(lengths)
    input_ids = torch.cat([torch.nn.functional.pad(r, (width - r.shape[1], 0)) for r in rows])
    attention_mask = (
        torch.arange(width)[None, :] >= torch.tensor([width - n for n in lengths])[:, None]
    ).long()
    options = dict(ratio=0.15, chunk_size=CHUNK, window=WINDOW, mode="dynamic")
    with chunkkv(model, **options) as state:
        batch = greedy(model, input_ids, new_tokens=6, attention_mask=attention_mask)
    assert state.kept_lengths[0] == [spec_kept_length(n, int(0.15 * n)) for n in lengths]
    for row, ids in enumerate(rows):
        with chunkkv(model, **options):
            assert torch.equal(batch[row : row + 1], greedy(model, ids, new_tokens=6))
    assert not torch.equal(batch[0:1], greedy(model, rows[0], new_tokens=6))  # it did drop


class RecentChunks(Policy):
    """A policy that reads no queries: keep the last chunks before the tail."""

    name, window, chunk_size = "recent", 0, 5

    def select(self, q_obs, k, *, budget, layer, num_layers, key_mask=None, scaling=None):
        assert q_obs is None
        B, Hkv, T, _ = k.shape
        if budget >= T:
            return None
        tail_start = T - T % self.chunk_size
        n_keep = max(budget - (T - tail_start), 0) // self.chunk_size
        first = tail_start // self.chunk_size - n_keep
        chunk_idx = torch.arange(first, first + n_keep, dtype=torch.int32)
        return Selection(chunk_idx.expand(B, Hkv, n_keep).contiguous(), self.chunk_size, tail_start)


@pytest.mark.parametrize("mode", ["evict", "sparse"])
def test_any_policy_drives_the_cache(mode):
    model = tiny_model()
    input_ids = prompt(103)
    cache = DynamicCache(config=model.config)
    with chunkkv(model, budget=33, policy=RecentChunks(), mode=mode) as state, torch.no_grad():
        model(input_ids, **cache_kwargs(model, cache), use_cache=True)
        logits = model(prompt(1, seed=9), **cache_kwargs(model, cache), use_cache=True).logits
    assert state.kept_lengths == [[33], [33]]  # chunks 14..19 then the 3-token tail
    assert state.selections[0].chunk_idx[0, 0].tolist() == list(range(14, 20))
    if mode == "evict":
        assert cache.layers[0].keys.shape[2] == 34
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------
# Arguments, unsupported models, leaving the model untouched
# ---------------------------------------------------------------------------------------------


def hooks_of(model):
    return sum(len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(budget=10, ratio=0.1), ValueError, "exactly one of budget and ratio"),
        (dict(), ValueError, "exactly one of budget and ratio"),
        (dict(ratio=1.5), ValueError, "ratio"),
        (dict(budget=10, mode="dense"), ValueError, "mode"),
        (dict(budget=10, mode="question", policy=H2O()), ValueError, "window=None"),
        (dict(budget=10, reuse_layers=0), ValueError, "reuse_layers"),
        (dict(budget=10, chunk_size=0), ValueError, "chunk_size"),
        (dict(budget=10, pool_kernel=2), ValueError, "pool_kernel"),
        (dict(budget=10, policy=ChunkKV(), window=16), ValueError, "window"),
        (dict(budget=10, policy="chunkkv"), TypeError, "policy"),
    ],
)
def test_bad_arguments_raise_before_touching_the_model(options, error, match):
    model = tiny_model()
    with pytest.raises(error, match=match):
        with chunkkv(model, **options):
            pass
    assert model.config._attn_implementation == "sdpa"
    assert hooks_of(model) == 0


class NoAttentionConfig(LlamaConfig):
    model_type = "no_attention_test"


class NoAttentionModel(PreTrainedModel):
    """A PreTrainedModel with no attention layer at all."""

    config_class = NoAttentionConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(4, 4)


def test_unsupported_models_raise():
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel"):
        with chunkkv(torch.nn.Linear(4, 4), budget=10):
            pass
    with pytest.raises(ValueError, match="no causal self-attention"):
        with chunkkv(NoAttentionModel(NoAttentionConfig(num_hidden_layers=1)), budget=10):
            pass


def test_sliding_window_beyond_its_window_raises():
    model = tiny_model("mistral", sliding_window=64)
    with chunkkv(model, budget=40, chunk_size=CHUNK, window=WINDOW):
        with pytest.raises(ValueError, match="sliding window"):
            greedy(model, prompt(80))


def test_qwen2_sliding_layers_raise_at_layer_zero_before_any_change():
    # Only layer 1 slides: the check must still fire before layer 0 is compressed.
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=1)
    cache = DynamicCache(config=model.config)
    with chunkkv(model, budget=40, chunk_size=CHUNK, window=WINDOW):
        with pytest.raises(ValueError, match="sliding window"), torch.no_grad():
            model(prompt(80), **cache_kwargs(model, cache), use_cache=True)
    assert not any(isinstance(layer, CompressedLayer) for layer in cache.layers)


def test_static_cache_is_refused():
    model = tiny_model()
    with chunkkv(model, budget=40, chunk_size=CHUNK, window=WINDOW):
        with pytest.raises(ValueError, match="DynamicCache"):
            greedy(model, prompt(100), cache_implementation="static")


@pytest.mark.parametrize("budget", [10, 40])  # the first chunk compressed / kept whole
def test_chunked_prefill_is_refused(budget):
    model = tiny_model()
    with chunkkv(model, budget=budget, chunk_size=CHUNK, window=WINDOW):
        with pytest.raises(ValueError, match="chunked prefill"):
            greedy(model, prompt(100), prefill_chunk_size=32)


@pytest.mark.parametrize("mode", ["evict", "sparse", "dynamic", "question"])
def test_repeated_rows_keep_their_row_state(mode):
    model = tiny_model()
    input_ids = prompt(100, batch=2)
    input_ids[1] = prompt(100, seed=2)
    mask = torch.ones_like(input_ids)
    mask[1, :7] = 0  # left padding: per-row state that must be repeated with the rows
    cache = DynamicCache(config=model.config)
    with chunkkv(model, ratio=0.3, chunk_size=CHUNK, window=WINDOW, mode=mode), torch.no_grad():
        model(input_ids, attention_mask=mask, **cache_kwargs(model, cache), use_cache=True)
        cache.batch_repeat_interleave(2)
        step = torch.tensor([[5], [5], [9], [9]])
        full_mask = torch.cat(
            [mask.repeat_interleave(2, dim=0), torch.ones(4, 1, dtype=mask.dtype)], dim=1
        )
        logits = model(
            step, attention_mask=full_mask, **cache_kwargs(model, cache), use_cache=True
        ).logits
    torch.testing.assert_close(logits[0], logits[1])
    torch.testing.assert_close(logits[2], logits[3])


class FailsAtLayer(ChunkKV):
    """ChunkKV that raises when it reaches ``fail_layer``."""

    fail_layer = 1

    def select(self, q_obs, k, *, layer, **kwargs):
        if layer == self.fail_layer:
            raise RuntimeError(f"policy failed at layer {layer}")
        return super().select(q_obs, k, layer=layer, **kwargs)


def test_a_policy_error_leaves_the_cache_and_state_as_they_were():
    """All or nothing: layer 0's compression is not swapped in when layer 1's selection fails
    (it once left [CompressedLayer, DynamicLayer, DynamicLayer])."""
    model = tiny_model(num_layers=3)
    input_ids = prompt(60)
    with chunkkv(model, ratio=0.4, policy=FailsAtLayer(chunk_size=CHUNK, window=WINDOW)) as state:
        first = DynamicCache(config=model.config)
        FailsAtLayer.fail_layer = 99
        with torch.no_grad():
            model(input_ids, **cache_kwargs(model, first), use_cache=True)
        before = (list(state.kept_lengths), state.prefills)
        FailsAtLayer.fail_layer = 1
        cache = DynamicCache(config=model.config)
        with pytest.raises(RuntimeError, match="policy failed at layer 1"), torch.no_grad():
            model(input_ids, **cache_kwargs(model, cache), use_cache=True)
        assert not any(isinstance(layer, CompressedLayer) for layer in cache.layers)
        assert (state.kept_lengths, state.prefills) == before
        FailsAtLayer.fail_layer = 99  # the next prefill runs normally
        with torch.no_grad():
            model(input_ids, **cache_kwargs(model, DynamicCache(config=model.config)))
    assert state.prefills == 2


def test_exit_restores_the_model_even_after_an_error():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="boom"):
        with chunkkv(model, budget=10):
            assert model.config._attn_implementation == ATTENTION_NAME
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert hooks_of(model) == 0
    input_ids = prompt(50)
    with chunkkv(model, budget=10):  # a second context starts clean
        greedy(model, input_ids, new_tokens=2)
    with pytest.raises(RuntimeError, match="only works inside"):
        model.set_attn_implementation(ATTENTION_NAME)
        try:
            greedy(model, input_ids, new_tokens=1)
        finally:
            model.set_attn_implementation("sdpa")

"""The ``chunkkv`` SGLang backend against SGLang's own Triton backend and the SPEC reference.

Small shapes (chunk size 4, window 8, 2 layers): SGLang's and our Triton kernels run under the
interpreter. Prompts have different, odd lengths, some prefilled in two chunks, and their KV
slots are shuffled, so positions and slots never coincide.
"""

import pytest
import torch

from triton_chunkkv.ops import reference

CHUNK, WINDOW = 4, 8


def chunkkv_backend(harness, monkeypatch, **options):
    """The backend as a server creates it: settings from CHUNKKV_* variables."""
    for name in ("BUDGET", "RATIO", "CHUNK_SIZE", "WINDOW", "REUSE_LAYERS", "SHARE_HEADS"):
        monkeypatch.delenv(f"CHUNKKV_{name}", raising=False)
    monkeypatch.delenv("CHUNKKV_CONFIG", raising=False)
    for name, value in options.items():
        monkeypatch.setenv(f"CHUNKKV_{name.upper()}", str(value))
    monkeypatch.setenv("CHUNKKV_CHUNK_SIZE", str(CHUNK))
    monkeypatch.setenv("CHUNKKV_WINDOW", str(WINDOW))
    return harness.backend("chunkkv")


def expected_decode(
    harness, request, layer, *, budget=None, ratio=None, share_heads=False, leader=None
):
    """SPEC: select on the prompt (layer ``leader``'s queries and keys, default ``layer``),
    then exact attention of the last query over the retained set of ``layer``'s cache."""
    leader = layer if leader is None else leader
    prompt_len = harness.prompt_lens[request]
    q_obs = harness.seen(harness.queries, leader, request)[:, prompt_len - WINDOW : prompt_len]
    keys = harness.seen(harness.keys, leader, request)[:, :prompt_len]
    selected = reference.compress(
        q_obs[None],
        keys[None],
        keys[None],
        budget=budget,
        ratio=ratio,
        chunk_size=CHUNK,
        window=WINDOW,
        share_heads=share_heads,
    )
    k_cache = harness.seen(harness.keys, layer, request)[None]
    v_cache = harness.seen(harness.values, layer, request)[None]
    query = harness.seen(harness.queries, layer, request)[:, -1][None]
    out = reference.sparse_decode(
        query,
        k_cache,
        v_cache,
        selected.chunk_idx,
        CHUNK,
        selected.tail_start,
        torch.tensor([k_cache.shape[2]]),
    )
    return out.reshape(-1), selected


def prefill(harness, backend, lens, chunked):
    """Whole prompts, or each prompt in two extend passes (the second one shorter than the
    window for some requests, so the window spans both passes)."""
    harness.add_requests(lens)
    if chunked:
        first = [n - min(n // 2, 5 + 7 * i) for i, n in enumerate(lens)]
        harness.extend(backend, first)
        harness.extend(backend, [n - m for n, m in zip(lens, first)])
    else:
        harness.extend(backend, lens)


def test_plugin_registers_the_backend_name(sglang_runtime):
    import argparse
    from importlib.metadata import entry_points

    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, ServerArgs

    declared = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert declared.get("chunkkv") == "triton_chunkkv.integrations.sglang:register", (
        "the installed triton-chunkkv metadata lacks the entry point: reinstall it "
        "(a stale triton_chunkkv.egg-info in the checkout shadows the installed one)"
    )
    load_plugins()  # what every SGLang process does at start-up: runs our entry point

    assert "chunkkv" in ATTENTION_BACKENDS
    assert "chunkkv" in ATTENTION_BACKEND_CHOICES
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(["--model-path", "m", "--attention-backend", "chunkkv"])
    assert args.attention_backend == "chunkkv"


def test_budget_covering_every_prompt_decodes_exactly_like_triton(make_harness, monkeypatch):
    harness = make_harness()
    chunkkv = chunkkv_backend(harness, monkeypatch, budget=500)
    triton = harness.backend("triton")
    prefill(harness, chunkkv, [37, 21, 50], chunked=True)
    for _ in range(2):
        ours, theirs = harness.decode([chunkkv, triton])
        for layer in range(harness.num_layers):
            assert not ours[layer].isnan().any()
            assert torch.equal(ours[layer], theirs[layer])
    assert all(state.selections is None for state in chunkkv.requests.values())


@pytest.mark.parametrize(
    "dtype, chunked, mode",
    [
        (torch.float16, True, {"ratio": 0.1}),
        (torch.float16, False, {"budget": 40}),  # the 37-token prompt stays dense
        (torch.bfloat16, False, {"budget": 40}),
    ],
)
def test_decode_attends_to_the_spec_retained_set(make_harness, monkeypatch, dtype, chunked, mode):
    harness = make_harness(dtype=dtype)
    chunkkv = chunkkv_backend(harness, monkeypatch, **mode)
    triton = harness.backend("triton")
    lens = [203, 37, 97] if "ratio" in mode else [37, 103, 61]
    prefill(harness, chunkkv, lens, chunked)
    tolerance = (
        dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=2e-3, rtol=2e-3)
    )
    for _ in range(2):
        ours, theirs = harness.decode([chunkkv, triton])
        for layer in range(harness.num_layers):
            for request, row in enumerate(harness.rows):
                expected, selected = expected_decode(harness, request, layer, **mode)
                state = chunkkv.requests[row]
                if selected.keys.shape[2] == lens[request]:
                    assert state.selections is None  # identity: decode stays dense
                    # SGLang's decode kernel runs tl.dot on bf16 operands, which the Triton
                    # interpreter gets wrong: compare with it in float16 only.
                    if dtype == torch.float16:
                        torch.testing.assert_close(
                            ours[layer][request], theirs[layer][request], **tolerance
                        )
                else:
                    assert torch.equal(state.selections[layer].chunk_idx, selected.chunk_idx)
                    assert state.selections[layer].tail_start == selected.tail_start
                torch.testing.assert_close(ours[layer][request], expected, **tolerance)


def test_one_token_set_per_request_returns_dropped_slots(make_harness, monkeypatch):
    harness = make_harness()
    chunkkv = chunkkv_backend(
        harness, monkeypatch, budget=24, share_heads=1, reuse_layers=harness.num_layers
    )
    assert chunkkv.frees_slots
    lens = [61, 45, 23]  # the last one fits the budget: nothing to free
    prefill(harness, chunkkv, lens, chunked=False)
    free_before = harness.allocator.available_size()
    (ours,) = harness.decode([chunkkv])  # selects (and frees), then decodes one token each

    kept = []
    for request, row in enumerate(harness.rows):
        expected, selected = expected_decode(harness, request, 0, budget=24, share_heads=True)
        kept.append(selected.keys.shape[2])
        for layer in range(harness.num_layers):  # every layer reuses layer 0's chunks
            expected, _ = expected_decode(
                harness, request, layer, budget=24, share_heads=True, leader=0
            )
            torch.testing.assert_close(ours[layer][request], expected, atol=2e-3, rtol=2e-3)
        state = chunkkv.requests[row]
        assert state.freed_slots == lens[request] - kept[request]
        prompt_row = harness.req_to_token_pool.req_to_token[row, : lens[request]]
        assert int((prompt_row == 0).sum()) == state.freed_slots
    assert kept[2] == lens[2]
    # The decode step took one slot per request; selection gave the dropped ones back.
    freed = sum(n - m for n, m in zip(lens, kept))
    assert harness.allocator.available_size() == free_before - len(lens) + freed

    # Finishing: SGLang frees the whole row (dropped positions name slot 0), then the row.
    for request, row in enumerate(harness.rows):
        length = harness.lens[request]
        harness.allocator.free(harness.req_to_token_pool.req_to_token[row, :length].long())
        harness.req_to_token_pool.free_rows([row])
        assert row not in chunkkv.requests
    free_pages = harness.allocator.free_pages
    assert harness.allocator.available_size() == harness.allocator.size
    assert 0 not in free_pages.tolist() and free_pages.unique().numel() == free_pages.numel()


def test_finishing_a_request_clears_its_entry(make_harness, monkeypatch):
    harness = make_harness(num_layers=1)
    chunkkv = chunkkv_backend(harness, monkeypatch, ratio=0.5)
    prefill(harness, chunkkv, [29, 33], chunked=False)
    harness.decode([chunkkv])
    finished, running = harness.rows
    assert chunkkv.requests[finished].selections is not None
    harness.req_to_token_pool.free_rows([finished])
    assert finished not in chunkkv.requests and running in chunkkv.requests
    # The row's next request starts a fresh entry.
    assert harness.req_to_token_pool.alloc_rows(1) == [finished]


def test_shared_heads_sum_chunk_scores_across_tensor_parallel_ranks(make_harness, monkeypatch):
    """This rank holds KV head 0 of 2; the other rank's chunk scores come in through the
    all-reduce, which the backend calls once per request and layer group."""
    from types import SimpleNamespace

    from triton_chunkkv.integrations.sglang import backend as backend_module

    harness = make_harness(num_layers=1, q_heads=2, kv_heads=1)
    chunkkv = chunkkv_backend(harness, monkeypatch, budget=20, share_heads=1)
    lens = [57]
    prefill(harness, chunkkv, lens, chunked=False)
    prompt_len = lens[0]
    other_q = torch.randn(1, 2, WINDOW, harness.head_dim, dtype=harness.dtype)
    other_k = torch.randn(1, 1, prompt_len, harness.head_dim, dtype=harness.dtype)
    other_scores = reference.chunk_sum(reference.window_scores(other_q, other_k), CHUNK, WINDOW)
    reduced = []

    def all_reduce(partial):
        reduced.append(partial.shape)
        return partial + other_scores.sum(dim=1, keepdim=True)

    parallel = SimpleNamespace(attn_tp_size=2, attn_tp_group=SimpleNamespace(all_reduce=all_reduce))
    monkeypatch.setattr(backend_module, "get_parallel", lambda: parallel)
    harness.decode([chunkkv])

    n_chunks = other_scores.shape[-1]
    assert reduced == [torch.Size([1, 1, n_chunks])]
    own_q = harness.seen(harness.queries, 0, 0)[:, prompt_len - WINDOW : prompt_len]
    own_k = harness.seen(harness.keys, 0, 0)[:, :prompt_len]
    own_scores = reference.chunk_sum(
        reference.window_scores(own_q[None], own_k[None]), CHUNK, WINDOW
    )
    n_keep = reference.num_kept_chunks(prompt_len, 20, CHUNK, WINDOW)
    both_ranks = torch.cat([own_scores, other_scores], dim=1)
    expected = reference.select_chunks(both_ranks, n_keep, share_heads=True)[:, :1]
    assert torch.equal(chunkkv.requests[harness.rows[0]].selections[0].chunk_idx, expected)


def test_unsupported_configurations_fail_clearly(make_harness, monkeypatch):
    harness = make_harness(num_layers=1)
    chunkkv = chunkkv_backend(harness, monkeypatch, ratio=0.2)
    with pytest.raises(ValueError, match="--disable-cuda-graph"):
        chunkkv.init_cuda_graph_state(max_bs=4, max_num_tokens=4)
    harness.model_runner.kv_cache_dtype = torch.float8_e4m3fn
    with pytest.raises(ValueError, match="KV cache dtype"):
        harness.backend("chunkkv")

"""The ``chunkkv`` SGLang backend against SGLang's own Triton backend and the SPEC reference.

Small shapes (chunk size 4, window 8, 2 layers): SGLang's and our Triton kernels run under the
interpreter. Prompts have different, odd lengths, some prefilled in two chunks, and their KV
slots are shuffled, so positions and slots never coincide.
"""

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from chunkkv_checks import (
    CHUNK,
    WINDOW,
    chunkkv_backend,
    clear_settings,
    expected_decode,
    prefill,
)

from triton_chunkkv.ops import reference


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
    assert not any(state.compressed for state in chunkkv.requests.values())


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
                    assert not state.compressed  # identity: decode stays dense
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


def test_selection_happens_in_the_prefill_pass_that_ends_the_prompt(make_harness, monkeypatch):
    """Chunked prefill: nothing is selected before the last chunk; the decode tables hold the
    selection as soon as that chunk's forward is done."""
    harness = make_harness(num_layers=1)
    chunkkv = chunkkv_backend(harness, monkeypatch, ratio=0.25, record_selections=4)
    harness.add_requests([90])
    row = harness.rows[0]
    harness.extend(chunkkv, [50])
    assert not chunkkv.requests[row].done and not chunkkv.requests[row].compressed
    harness.extend(chunkkv, [40])
    _, selected = expected_decode(harness, 0, 0, ratio=0.25)
    state = chunkkv.requests[row]
    assert state.done and not state.window_queries
    n = selected.chunk_idx.shape[2]
    assert torch.equal(chunkkv.table.chunk_idx[0, row, :, :n], selected.chunk_idx[0])
    assert int(chunkkv.table.counts[0, row]) == n
    assert int(chunkkv.table.tails[0, row]) == selected.tail_start
    report = chunkkv.report()
    assert report["requests_compressed"] == 1 and report["prompt_tokens"] == 90
    recorded = report["selections"][harness.rids[0]]
    assert recorded["chunk_idx"] == [selected.chunk_idx[0].tolist()]
    assert recorded["kept"] == [selected.keys.shape[2]]


def test_decode_metadata_is_the_batch_rows_of_the_tables(make_harness, monkeypatch):
    """A decode step's metadata is the batch's rows of the tables, in batch order (indexing ops
    only); a batch without a compressed request runs Triton's decode."""
    harness = make_harness(num_layers=1)
    chunkkv = chunkkv_backend(harness, monkeypatch, budget=40)
    prefill(harness, chunkkv, [103, 37, 61], chunked=False)
    harness.decode([chunkkv])
    batch = harness.last_decode[0]
    sparse = chunkkv._sparse_batch
    rows = batch.req_pool_indices
    assert torch.equal(sparse.index.counts, chunkkv.table.counts[:, rows])
    assert torch.equal(sparse.index.tails, chunkkv.table.tails[:, rows])
    assert torch.equal(
        sparse.slot_map, harness.req_to_token_pool.req_to_token[rows, : max(harness.lens)]
    )
    assert sparse.index.counts[0, 1] == 0 and sparse.index.tails[0, 1] == 0  # the dense one

    dense_only = SimpleNamespace(**vars(batch))
    dense_only.rids = [harness.rids[1]]
    assert chunkkv._prepare_decode(dense_only) is None


def test_one_token_set_per_request_returns_dropped_slots(make_harness, monkeypatch):
    harness = make_harness()
    chunkkv = chunkkv_backend(
        harness, monkeypatch, budget=24, share_heads=1, reuse_layers=harness.num_layers
    )
    assert chunkkv.frees_slots
    lens = [61, 45, 23]  # the last one fits the budget: nothing to free
    free_before = harness.allocator.available_size()
    prefill(harness, chunkkv, lens, chunked=False)  # selects and frees at its last layer
    (ours,) = harness.decode([chunkkv])

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
    # The prompts and the decode step took their slots; selection gave the dropped ones back.
    freed = sum(n - m for n, m in zip(lens, kept))
    assert harness.allocator.available_size() == free_before - sum(lens) - len(lens) + freed

    # Finishing: SGLang frees the whole row (dropped positions name slot 0), then the row.
    for request in range(len(lens)):
        harness.release(request)
    free_pages = harness.allocator.free_pages
    assert harness.allocator.available_size() == harness.allocator.size
    assert 0 not in free_pages.tolist() and free_pages.unique().numel() == free_pages.numel()


def tensor_parallel(monkeypatch, *, size, rank, all_reduce):
    """What get_parallel() answers on one rank of an attention-TP group (set before the
    backend is built: it fixes its score hook then)."""
    from triton_chunkkv.integrations.sglang import backend as backend_module

    parallel = SimpleNamespace(
        pp_size=1,
        attn_tp_size=size,
        attn_tp_rank=rank,
        attn_tp_group=SimpleNamespace(all_reduce=all_reduce),
    )
    monkeypatch.setattr(backend_module, "get_parallel", lambda: parallel)


def prompt_keys(harness, layer, request, prompt_len):
    return harness.seen(harness.keys, layer, request)[:, :prompt_len]


def test_shared_heads_sum_chunk_scores_across_tensor_parallel_ranks(make_harness, monkeypatch):
    """This rank holds KV head 0 of 2; the other rank's chunk scores come in through the
    all-reduce, which the backend calls once per request and layer group."""
    harness = make_harness(num_layers=1, q_heads=2, kv_heads=1, total_kv_heads=2)
    prompt_len = 57
    other_q = torch.randn(1, 2, WINDOW, harness.head_dim, dtype=harness.dtype)
    other_k = torch.randn(1, 1, prompt_len, harness.head_dim, dtype=harness.dtype)
    other_scores = reference.chunk_sum(reference.window_scores(other_q, other_k), CHUNK, WINDOW)
    reduced = []

    def all_reduce(partial):
        reduced.append(partial.shape)
        return partial + other_scores.sum(dim=1, keepdim=True)

    tensor_parallel(monkeypatch, size=2, rank=0, all_reduce=all_reduce)
    chunkkv = chunkkv_backend(harness, monkeypatch, budget=20, share_heads=1)
    prefill(harness, chunkkv, [prompt_len], chunked=False)

    n_chunks = other_scores.shape[-1]
    assert reduced == [torch.Size([1, 1, n_chunks])]
    own_q = harness.seen(harness.queries, 0, 0)[:, prompt_len - WINDOW : prompt_len]
    own_scores = reference.chunk_sum(
        reference.window_scores(own_q[None], prompt_keys(harness, 0, 0, prompt_len)[None]),
        CHUNK,
        WINDOW,
    )
    n_keep = reference.num_kept_chunks(prompt_len, 20, CHUNK, WINDOW)
    both_ranks = torch.cat([own_scores, other_scores], dim=1)
    expected = reference.select_chunks(both_ranks, n_keep, share_heads=True)[:, :1]
    assert torch.equal(chunkkv.requests[harness.rows[0]].selections[0].chunk_idx, expected)


def test_replicated_kv_heads_select_alike_on_every_rank(make_harness, monkeypatch):
    """One KV head with 4 query heads on 2 attention-TP ranks: each rank holds the KV head and
    2 of its query heads. The copies average their chunk scores, so each selects what SPEC
    selects from all 4 query heads (the other rank's half comes in through the all-reduce)."""
    harness = make_harness(num_layers=1, q_heads=2, kv_heads=1, total_kv_heads=1)
    prompt_len = 61
    other_q = torch.randn(1, 2, WINDOW, harness.head_dim, dtype=harness.dtype)
    reduced = []

    def all_reduce(rows):  # [1, total KV heads, n]: the other rank fills row 0 too
        reduced.append(rows.shape)
        slots = harness.req_to_token_pool.req_to_token[harness.rows[0], :prompt_len].long()
        keys = harness.kv_pool.get_key_buffer(0)[slots].transpose(0, 1)[None]  # same KV head
        other = reference.chunk_sum(reference.window_scores(other_q, keys), CHUNK, WINDOW)
        return rows + other

    tensor_parallel(monkeypatch, size=2, rank=1, all_reduce=all_reduce)
    chunkkv = chunkkv_backend(harness, monkeypatch, budget=24)
    prefill(harness, chunkkv, [prompt_len], chunked=False)

    assert len(reduced) == 1 and reduced[0][:2] == (1, 1)
    own_q = harness.seen(harness.queries, 0, 0)[:, prompt_len - WINDOW : prompt_len][None]
    all_queries = torch.cat([own_q, other_q], dim=1)  # [1, 4, w, D]: g = 4 over both ranks
    keys = prompt_keys(harness, 0, 0, prompt_len)[None]
    expected = reference.compress(
        all_queries, keys, keys, budget=24, chunk_size=CHUNK, window=WINDOW
    ).chunk_idx
    assert torch.equal(chunkkv.requests[harness.rows[0]].selections[0].chunk_idx, expected)


def test_kv_heads_of_their_own_need_no_reduce(make_harness, monkeypatch):
    def all_reduce(_):
        raise AssertionError("each rank's KV heads are its own: no all-reduce")

    harness = make_harness(num_layers=1, q_heads=2, kv_heads=1, total_kv_heads=2)
    tensor_parallel(monkeypatch, size=2, rank=0, all_reduce=all_reduce)
    chunkkv = chunkkv_backend(harness, monkeypatch, budget=24)
    prefill(harness, chunkkv, [61], chunked=False)
    _, selected = expected_decode(harness, 0, 0, budget=24)
    assert torch.equal(
        chunkkv.requests[harness.rows[0]].selections[0].chunk_idx, selected.chunk_idx
    )


def test_unsupported_configurations_fail_clearly(make_harness, monkeypatch):
    harness = make_harness(num_layers=1)
    harness.model_runner.kv_cache_dtype = torch.float8_e4m3fn
    with pytest.raises(ValueError, match="KV cache dtype"):
        chunkkv_backend(harness, monkeypatch, ratio=0.2)
    harness.model_runner.kv_cache_dtype = harness.dtype
    clear_settings(monkeypatch)
    monkeypatch.setenv("CHUNKKV_POLICY", "h2o")
    with pytest.raises(ValueError, match="every prompt query"):
        harness.backend("chunkkv")


def test_the_decode_host_time_benchmark_runs(sglang_runtime, monkeypatch):
    """benchmarks/sglang_decode_host.py on tiny shapes, so that it never rots."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    from benchmarks.sglang_decode_host import build, median_us

    clear_settings(monkeypatch)
    monkeypatch.setenv("CHUNKKV_RATIO", "0.5")
    for mode in ("sparse", "dynamic"):
        backend, batch = build(batch=2, layers=2, prompt=48, mode=mode)
        assert backend.settings.mode == mode and backend.stats["requests_compressed"] == 2
        assert median_us(partial(backend._prepare_decode, batch), steps=3) > 0
        backend.init_cuda_graph_state(2, 2)
        assert median_us(partial(backend.init_forward_metadata_out_graph, batch), steps=3) > 0

"""``CHUNKKV_MODE=dynamic``: the full cache stays, every layer keeps per-chunk key bounds of each
compressed prompt, and every decode step reads the chunks its own query scores highest.

The truth is :func:`chunkkv_checks.expected_dynamic_decode`, float64 from the request's own
prompt keys and the step's query (no op of the package). Small shapes (chunk size 4, window
8): SGLang's and our Triton kernels run under the interpreter. Prompts have different lengths,
some prefilled in two chunks, and their KV slots are shuffled.
"""

import pytest
import torch
from chunkkv_checks import CHUNK, WINDOW, chunkkv_backend, expected_dynamic_decode, prefill

from triton_chunkkv.ops import reference


@pytest.fixture
def chosen_chunks(monkeypatch):
    """Every ``select_decode_chunks`` result the backend gets, in call order (one per layer
    and step)."""
    from triton_chunkkv.integrations.sglang import backend as backend_module

    results = []
    select = backend_module.select_decode_chunks

    def record(*args, **kwargs):
        results.append(select(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(backend_module, "select_decode_chunks", record)
    return results


def assert_decodes_dynamically(harness, chunkkv, outputs, chosen, selection, tolerance):
    """One decode step: every layer and request against the float64 reference, and the chunks
    the backend read against the ones the reference keeps."""
    assert len(chosen) == harness.num_layers
    for layer in range(harness.num_layers):
        for request, row in enumerate(harness.rows):
            expected, top = expected_dynamic_decode(harness, request, layer, **selection)
            torch.testing.assert_close(outputs[layer][request], expected, **tolerance)
            state = chunkkv.requests[row]
            assert state.compressed == (top is not None)
            if top is not None:
                keep = state.dynamic.keep
                assert keep == top.shape[1] < state.dynamic.chunks  # something is dropped
                assert torch.equal(chosen[layer][request, :, :keep].long(), top), (layer, request)


@pytest.mark.parametrize(
    "dtype, heads, chunked, selection, lens",
    [
        (torch.float16, (4, 2), True, {"ratio": 0.1}, [203, 37, 97]),
        (torch.float16, (8, 2), False, {"budget": 40}, [37, 103, 61]),  # 37 fits: dense
        (torch.bfloat16, (2, 2), False, {"budget": 40}, [150, 61]),
    ],
)
def test_each_step_reads_the_chunks_its_query_scores_highest(
    make_harness, monkeypatch, chosen_chunks, dtype, heads, chunked, selection, lens
):
    harness = make_harness(dtype=dtype, q_heads=heads[0], kv_heads=heads[1])
    chunkkv = chunkkv_backend(harness, monkeypatch, mode="dynamic", **selection)
    triton = harness.backend("triton")
    prefill(harness, chunkkv, lens, chunked)
    tolerance = (
        dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=2e-3, rtol=2e-3)
    )
    steps = []
    for _ in range(2):
        chosen_chunks.clear()
        ours, theirs = harness.decode([chunkkv, triton])
        assert_decodes_dynamically(harness, chunkkv, ours, chosen_chunks, selection, tolerance)
        steps.append([chunks.clone() for chunks in chosen_chunks])
        for request, row in enumerate(harness.rows):
            # SGLang's decode kernel gets bf16 tl.dot wrong under the interpreter.
            if not chunkkv.requests[row].compressed and dtype == torch.float16:
                for layer in range(harness.num_layers):
                    torch.testing.assert_close(
                        ours[layer][request], theirs[layer][request], **tolerance
                    )
    # The selection follows the query: the two random steps did not read the same chunks.
    assert any(not torch.equal(a, b) for a, b in zip(*steps))


def test_a_step_reads_the_chunk_its_query_points_at(make_harness, monkeypatch, chosen_chunks):
    """Keys of chunk 3 stand out in dimension 0, those of chunk 9 in dimension 1; a budget of
    one chunk beside the tail. A query along dimension 0 (in one of its KV head's two query
    heads) reads chunk 3, one along dimension 1 chunk 9."""
    harness = make_harness(num_layers=1, q_heads=2, kv_heads=1)
    prompt_len = 61  # tail [52, 61): 9 tokens, 13 chunks before it
    budget = 9 + CHUNK
    chunkkv = chunkkv_backend(harness, monkeypatch, mode="dynamic", budget=budget)
    q, k, v = harness._random_qkv(prompt_len)
    k = k * 0.1
    k[0, 3 * CHUNK : 4 * CHUNK, 0, 0] = 3.0
    k[0, 9 * CHUNK : 10 * CHUNK, 0, 1] = 3.0
    harness.add_requests([prompt_len])
    harness.extend(chunkkv, [prompt_len], qkv=(q, k, v))
    assert chunkkv.requests[harness.rows[0]].dynamic == (13, 1, 52)
    for dim, chunk in ((0, 3), (1, 9)):
        q, k, v = harness._random_qkv(1)
        q = q * 0.1
        q[0, 0, harness.head_dim + dim] = 5.0  # query head 1 of the KV head
        chosen_chunks.clear()
        (ours,) = harness.decode([chunkkv], qkv=(q, k, v))
        assert chosen_chunks[0][0].tolist() == [[chunk]]
        expected, top = expected_dynamic_decode(harness, 0, 0, budget=budget)
        assert top.tolist() == [[chunk]]
        torch.testing.assert_close(ours[0][0], expected, atol=2e-3, rtol=2e-3)


def test_bounds_tables_hold_every_layers_own_bounds(make_harness, monkeypatch):
    """Set in the pass that ends the prompt (a chunked prefill: its last chunk), every layer
    its own (``reuse_layers`` does not apply), with each row's chunk and keep counts; the
    report counts the request and records what it reads."""
    harness = make_harness()
    chunkkv = chunkkv_backend(
        harness, monkeypatch, mode="dynamic", ratio=0.25, reuse_layers=2, record_selections=2
    )
    harness.add_requests([90])
    (row,) = harness.rows
    harness.extend(chunkkv, [50])
    assert not chunkkv.requests[row].compressed
    assert int(chunkkv.bounds.chunk_counts[row]) == 0
    harness.extend(chunkkv, [40])
    state = chunkkv.requests[row]
    assert state.compressed and not state.window_queries
    tail_start = reference.tail_start(90, CHUNK, WINDOW)
    n, keep = tail_start // CHUNK, reference.num_kept_chunks(90, 22, CHUNK, WINDOW)
    assert state.dynamic == (n, keep, tail_start)
    for layer in range(harness.num_layers):
        keys = harness.seen(harness.keys, layer, 0)[:, :tail_start].reshape(2, n, CHUNK, -1)
        assert torch.equal(chunkkv.bounds.kmin[layer, row, :, :n], keys.amin(dim=2))
        assert torch.equal(chunkkv.bounds.kmax[layer, row, :, :n], keys.amax(dim=2))
    assert not torch.equal(chunkkv.bounds.kmin[0, row], chunkkv.bounds.kmin[1, row])
    assert chunkkv.bounds.chunk_counts[row] == n and chunkkv.bounds.keep_counts[row] == keep
    assert chunkkv.bounds.tails[row] == tail_start
    report = chunkkv.report()
    assert report["settings"]["mode"] == "dynamic"
    assert report["requests_compressed"] == 1 and report["prompt_tokens"] == 90
    kept = keep * CHUNK + 90 - tail_start
    assert report["kept_tokens"] == kept
    assert report["selections"][harness.rids[0]] == {
        "prompt_len": 90,
        "budget": 22,
        "chunk_size": CHUNK,
        "kept": [kept] * harness.num_layers,
        "mode": "dynamic",
        "chunks": n,
        "keep_chunks": keep,
        "tail_start": tail_start,
    }


def test_the_tables_are_sized_from_the_context(make_harness, monkeypatch):
    harness = make_harness(num_layers=1)
    chunkkv = chunkkv_backend(harness, monkeypatch, mode="dynamic", budget=40)
    rows, context = harness.req_to_token_pool.req_to_token.shape
    assert chunkkv.bounds.kmin.shape == (1, rows, 2, (context - WINDOW) // CHUNK, 16)
    assert chunkkv.bounds.kmin.dtype == harness.dtype
    # 2 / c of the keys of every row at full context (the chunk grid stops at the tail).
    keys = rows * context * 2 * 16 * harness.dtype.itemsize
    assert chunkkv.bounds.nbytes == 2 * keys * ((context - WINDOW) // CHUNK) // context
    assert not chunkkv.frees_slots


def test_eager_decode_metadata_is_the_batch_rows(make_harness, monkeypatch):
    """An eager step scores the batch's longest chunk grid and selects its largest keep count
    (host values noted at compression); a batch without a compressed request runs Triton."""
    from types import SimpleNamespace

    harness = make_harness(num_layers=1)
    chunkkv = chunkkv_backend(harness, monkeypatch, mode="dynamic", budget=40)
    prefill(harness, chunkkv, [103, 37, 61], chunked=False)
    harness.decode([chunkkv])
    batch = harness.last_decode[0]
    dynamic = chunkkv._sparse_batch
    rows = batch.req_pool_indices
    plans = [chunkkv.requests[row].dynamic for row in harness.rows]
    assert plans[1] is None  # 37 tokens fit the budget
    assert dynamic.width == max(plans[0].chunks, plans[2].chunks)
    assert dynamic.n_keep == max(plans[0].keep, plans[2].keep)
    assert torch.equal(dynamic.rows, rows)
    assert dynamic.index.chunk_counts.tolist() == [plans[0].chunks, 0, plans[2].chunks]
    assert dynamic.index.keep_counts.tolist() == [plans[0].keep, 0, plans[2].keep]
    assert dynamic.index.tails.tolist() == [plans[0].tail_start, 0, plans[2].tail_start]
    assert torch.equal(
        dynamic.slot_map, harness.req_to_token_pool.req_to_token[rows, : max(harness.lens)]
    )
    dense_only = SimpleNamespace(**vars(batch))
    dense_only.rids = [harness.rids[1]]
    assert chunkkv._prepare_decode(dense_only) is None


def test_a_prefix_cache_hit_needs_no_cap(make_harness, monkeypatch, chosen_chunks):
    """Dynamic mode reads no prompt query: the radix cache may serve all but the last prompt
    token (SGLang's own limit), and the bounds are those of the prompt's keys all the same."""
    harness = make_harness()
    chunkkv = chunkkv_backend(harness, monkeypatch, mode="dynamic", budget=40)
    prompt_len = 97
    assert chunkkv.prefix_limit(prompt_len) is None
    harness.add_requests([prompt_len])
    harness.extend(chunkkv, [prompt_len])
    first = harness.rows[0]
    cached = prompt_len - 1
    slots = harness.req_to_token_pool.req_to_token[first, :cached].clone()
    prefix, last = harness.computed(0, 0, cached), harness.computed(0, cached, prompt_len)

    harness.add_requests([prompt_len])  # the first one still runs: another row
    harness.cached_prefix([cached], slots=slots, qkv=prefix)
    harness.extend(chunkkv, [1], qkv=last)
    second = harness.rows[0]
    assert chunkkv.requests[second].dynamic == chunkkv.requests[first].dynamic
    assert torch.equal(chunkkv.bounds.kmin[:, second], chunkkv.bounds.kmin[:, first])
    assert torch.equal(chunkkv.bounds.kmax[:, second], chunkkv.bounds.kmax[:, first])
    (ours,) = harness.decode([chunkkv])
    tolerance = dict(atol=2e-3, rtol=2e-3)
    assert_decodes_dynamically(harness, chunkkv, ours, chosen_chunks, {"budget": 40}, tolerance)


def test_the_mode_is_refused_with_a_bad_value(make_harness, monkeypatch):
    harness = make_harness(num_layers=1)
    with pytest.raises(ValueError, match="mode must be one of"):
        chunkkv_backend(harness, monkeypatch, mode="evict")

"""Request lifecycle: whatever a request leaves behind (finished, aborted, retracted, flushed),
the next request on its row decodes with its own selection or none.

Entries are keyed by request-pool row and stamped with SGLang's row generation
(``ReqToTokenPool.req_generation``, bumped on every allocation): the harness frees and
allocates rows exactly as SGLang's ``release_kv_cache`` / ``ReqToTokenPool.alloc`` do. Row
allocation is last-in first-out, so a freed row is the next one handed out.
"""

from functools import partial

import torch
from chunkkv_checks import (
    assert_decodes_as_spec,
    chunkkv_backend,
    expected_decode,
    expected_dynamic_decode,
    prefill,
)

BUDGET = 40


def assert_dense_like_triton(chunkkv, harness, triton):
    """A decode step in which no request is compressed: exactly SGLang's Triton decode."""
    ours, theirs = harness.decode([chunkkv, triton])
    for layer in range(harness.num_layers):
        assert torch.equal(ours[layer], theirs[layer])
    assert not any(chunkkv.requests[row].compressed for row in harness.rows)


def test_a_finished_requests_row_serves_the_next_request(make_harness, monkeypatch):
    harness = make_harness()
    chunkkv = chunkkv_backend(harness, monkeypatch, budget=BUDGET)
    triton = harness.backend("triton")
    prefill(harness, chunkkv, [97], chunked=False)
    (row,) = harness.rows
    (ours,) = harness.decode([chunkkv])
    assert chunkkv.requests[row].compressed
    assert_decodes_as_spec(harness, ours, 0, budget=BUDGET)
    harness.release(0)  # finished

    prefill(harness, chunkkv, [33], chunked=False)  # fits the budget
    assert harness.rows == [row]
    assert chunkkv.requests[row].rid == harness.rids[0]
    assert int(chunkkv.table.counts[:, row].abs().sum() + chunkkv.table.tails[:, row].sum()) == 0
    assert_dense_like_triton(chunkkv, harness, triton)


def test_an_aborted_chunked_prefill_leaves_no_window_queries(make_harness, monkeypatch):
    """The first request is aborted between two chunks, with part of its observation window
    kept; the next one on its row, same prompt length, selects from its own queries only."""
    harness = make_harness()
    chunkkv = chunkkv_backend(harness, monkeypatch, budget=BUDGET)
    harness.add_requests([61])
    (row,) = harness.rows
    harness.extend(chunkkv, [57])  # window [53, 61): four of its queries kept
    assert chunkkv.requests[row].window_queries
    harness.release(0)  # aborted

    harness.add_requests([61])
    assert harness.rows == [row]
    harness.extend(chunkkv, [59])
    harness.extend(chunkkv, [2])
    (ours,) = harness.decode([chunkkv])
    state = chunkkv.requests[row]
    assert state.rid == harness.rids[0] and state.compressed
    for layer in range(harness.num_layers):
        _, selected = expected_decode(harness, 0, layer, budget=BUDGET)
        assert torch.equal(state.selections[layer].chunk_idx, selected.chunk_idx)
    assert_decodes_as_spec(harness, ours, 0, budget=BUDGET)


def test_a_retracted_request_selects_on_its_prompt_again(make_harness, monkeypatch):
    """Retraction frees the row and the KV; the request comes back on another row and its
    re-run extends prompt and generated tokens in one pass. Its selection is made on the prompt
    (the window before the generated tokens, the prompt's own chunk grid), and the generated
    tokens are part of the dense tail."""
    harness = make_harness()
    chunkkv = chunkkv_backend(harness, monkeypatch, budget=BUDGET)
    prompt_len, generated = 97, 3
    prefill(harness, chunkkv, [prompt_len, 45], chunked=False)
    retracted_row = harness.rows[0]
    for _ in range(generated):
        harness.decode([chunkkv])
    for request in range(2):
        harness.release(request)

    harness.add_requests([50, prompt_len])  # a new request takes the retracted row
    assert harness.rows[0] == retracted_row
    harness.extend(chunkkv, [50, prompt_len + generated])
    (ours,) = harness.decode([chunkkv])
    assert_decodes_as_spec(harness, ours, 0, budget=BUDGET)
    assert_decodes_as_spec(harness, ours, 1, budget=BUDGET)
    state = chunkkv.requests[harness.rows[1]]
    for layer in range(harness.num_layers):
        _, selected = expected_decode(harness, 1, layer, budget=BUDGET)
        assert torch.equal(state.selections[layer].chunk_idx, selected.chunk_idx)
        assert state.selections[layer].tail_start == selected.tail_start < prompt_len


def test_flushing_the_cache_leaves_no_entry_behind(make_harness, monkeypatch):
    """``Scheduler.flush_cache`` clears the pools without freeing rows one by one
    (``ReqToTokenPool.clear``); the rows it hands out next start dense."""
    harness = make_harness()
    chunkkv = chunkkv_backend(harness, monkeypatch, budget=BUDGET)
    triton = harness.backend("triton")
    prefill(harness, chunkkv, [97, 61], chunked=False)
    rows = list(harness.rows)
    harness.decode([chunkkv, triton])
    assert all(chunkkv.requests[row].compressed for row in rows)
    harness.req_to_token_pool.clear()
    harness.allocator.clear()

    prefill(harness, chunkkv, [33, 21], chunked=False)
    assert harness.rows == rows
    assert_dense_like_triton(chunkkv, harness, triton)


def test_dynamic_mode_a_reused_row_starts_fresh(make_harness, monkeypatch):
    """Dynamic mode: a long request leaves its bounds on its row; the next one there, shorter,
    reads its own (the old ones lie past its chunk count), and the one after it, within the
    budget, decodes exactly like Triton with the row's counts back to zero."""
    harness = make_harness()
    chunkkv = chunkkv_backend(harness, monkeypatch, budget=BUDGET, mode="dynamic")
    triton = harness.backend("triton")

    make_batch = harness.decode_batch

    def decode_batch(full_width):
        batch = make_batch()
        if full_width:
            batch.rids = None
        return batch

    def assert_decodes_dynamically():
        """Two steps; the second has no request ids, so it scores every chunk of the tables'
        width as a graph does (the old request's bounds included, past the row's count)."""
        for full_width in (False, True):
            monkeypatch.setattr(harness, "decode_batch", partial(decode_batch, full_width))
            (ours,) = harness.decode([chunkkv])
            dynamic = chunkkv.requests[row].dynamic
            width = chunkkv.bounds.max_chunks if full_width else dynamic.chunks
            assert chunkkv._sparse_batch.width == width
            for layer in range(harness.num_layers):
                expected, top = expected_dynamic_decode(harness, 0, layer, budget=BUDGET)
                assert top is not None
                torch.testing.assert_close(ours[layer][0], expected, atol=2e-3, rtol=2e-3)
        monkeypatch.setattr(harness, "decode_batch", make_batch)

    prefill(harness, chunkkv, [203], chunked=False)
    (row,) = harness.rows
    assert_decodes_dynamically()
    long_chunks = chunkkv.requests[row].dynamic.chunks
    harness.release(0)  # finished

    prefill(harness, chunkkv, [61], chunked=True)
    assert harness.rows == [row]
    state = chunkkv.requests[row]
    assert state.rid == harness.rids[0] and state.dynamic.chunks < long_chunks
    assert int(chunkkv.bounds.chunk_counts[row]) == state.dynamic.chunks
    assert_decodes_dynamically()
    harness.release(0)  # aborted mid-decode

    prefill(harness, chunkkv, [33], chunked=False)  # fits the budget
    assert harness.rows == [row]
    for table in (chunkkv.bounds.chunk_counts, chunkkv.bounds.keep_counts, chunkkv.bounds.tails):
        assert int(table[row]) == 0
    assert_dense_like_triton(chunkkv, harness, triton)
    assert not chunkkv._compressed_rids and not chunkkv._dynamic_chunks

"""Selection never depends on the cache state: a prefix-cache hit, the chunks a prefill is cut
into, or what earlier requests left give the selection of the prompt itself.

The scheduler side is two hooks (``triton_chunkkv.integrations.sglang.hooks``): a prefix match
never covers a compressed prompt's observation window, and every extend batch carries its
requests' prompt lengths. The backend side is tested on the harness, whose
:meth:`~sglang_harness.Harness.cached_prefix` plays a radix-cache hit.
"""

import logging
from types import SimpleNamespace

import pytest
import torch
from chunkkv_checks import WINDOW, assert_decodes_as_spec, chunkkv_backend, expected_decode

from triton_chunkkv.integrations.sglang import hooks

BUDGET = 40


def test_a_prefix_cache_hit_selects_exactly_like_the_full_prefill(make_harness, monkeypatch):
    """The same prompt twice, the second time with everything but the observation window from
    the first one's slots (what the capped radix match serves): the same selection, bit for bit,
    and the same decode."""
    harness = make_harness()
    chunkkv = chunkkv_backend(harness, monkeypatch, budget=BUDGET)
    prompt_len = 97
    harness.add_requests([prompt_len])
    harness.extend(chunkkv, [prompt_len])
    first = chunkkv.requests[harness.rows[0]]
    cached = prompt_len - WINDOW
    slots = harness.req_to_token_pool.req_to_token[harness.rows[0], :cached].clone()
    prefix, window = harness.computed(0, 0, cached), harness.computed(0, cached, prompt_len)

    harness.add_requests([prompt_len])  # the first one is still running: another row
    harness.cached_prefix([cached], slots=slots, qkv=prefix)
    harness.extend(chunkkv, [WINDOW], qkv=window)
    second = chunkkv.requests[harness.rows[0]]
    assert second.compressed
    for mine, theirs in zip(second.selections, first.selections):
        assert (
            torch.equal(mine.chunk_idx, theirs.chunk_idx) and mine.tail_start == theirs.tail_start
        )
    (ours,) = harness.decode([chunkkv])
    assert_decodes_as_spec(harness, ours, 0, budget=BUDGET)


def test_any_chunking_selects_like_one_pass(make_harness, monkeypatch):
    """Whole, cut inside the window, cut right at its start: the same SPEC selection."""
    harness = make_harness(num_layers=1)
    chunkkv = chunkkv_backend(harness, monkeypatch, budget=BUDGET)
    prompt_len = 89
    for cuts in ([prompt_len], [85, 4], [prompt_len - WINDOW, WINDOW], [30, 30, 26, 3]):
        harness.add_requests([prompt_len])
        for cut in cuts:
            harness.extend(chunkkv, [cut])
        _, selected = expected_decode(harness, 0, 0, budget=BUDGET)
        state = chunkkv.requests[harness.rows[0]]
        assert torch.equal(state.selections[0].chunk_idx, selected.chunk_idx), cuts
        harness.release(0)


def test_a_window_the_cache_served_keeps_the_request_whole(make_harness, monkeypatch, caplog):
    """Only a prefix match past the cap (it cannot happen with the hooks in place) leaves
    window queries uncomputed: the request is then kept whole, with a warning."""
    harness = make_harness()
    chunkkv = chunkkv_backend(harness, monkeypatch, budget=BUDGET)
    triton = harness.backend("triton")
    harness.add_requests([97])
    harness.cached_prefix([97 - WINDOW + 3])
    with caplog.at_level(logging.WARNING):
        harness.extend(chunkkv, [WINDOW - 3])
    assert "3 of its last 8 prompt queries were not computed" in caplog.text
    assert not chunkkv.requests[harness.rows[0]].compressed
    ours, theirs = harness.decode([chunkkv, triton])
    for layer in range(harness.num_layers):
        assert torch.equal(ours[layer], theirs[layer])


@pytest.mark.parametrize(
    "settings, prompt_len, limit",
    [
        ({"budget": 40}, 97, 97 - WINDOW),  # compressed: the window is always computed
        ({"budget": 40}, 40, None),  # fits the budget: the whole prompt may be cached
        ({"ratio": 0.5}, WINDOW - 1, None),  # shorter than the window: nothing to select
        ({"ratio": 0.5}, 300, 300 - WINDOW),
    ],
)
def test_the_prefix_match_never_covers_the_window(
    make_harness, monkeypatch, settings, prompt_len, limit
):
    """``Req._compute_max_prefix_len`` (SGLang caps it at ``input_len - 1`` itself) through
    the hook: the radix match of a compressed prompt stops before its window."""
    harness = make_harness(num_layers=1)
    chunkkv_backend(harness, monkeypatch, **settings)
    req = SimpleNamespace(origin_input_ids=list(range(prompt_len)))
    sglang_limit = prompt_len + 10 - 1  # a retracted re-run: prompt plus 10 generated tokens
    capped = hooks.cap_prefix_match(sglang_limit, req, prompt_len + 10)
    assert capped == (None if limit is None else limit)
    assert hooks.cap_prefix_match(3, req, prompt_len + 10) in (None, 3)  # only ever lowers it


def test_the_hooks_are_applied_to_sglang(make_harness, monkeypatch):
    """Through SGLang's own HookRegistry, on ``Req._compute_max_prefix_len`` and
    ``ForwardBatch.init_new``; an extend batch's requests get their prompt lengths noted, a
    decode batch's do not."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    harness = make_harness(num_layers=1)
    chunkkv_backend(harness, monkeypatch, budget=BUDGET)  # activates and applies the hooks
    assert getattr(Req._compute_max_prefix_len, "__wrapped__", None) is not None
    assert getattr(ForwardBatch.init_new, "__wrapped__", None) is not None

    reqs = [SimpleNamespace(rid=f"hooked-{n}", origin_input_ids=[1] * n) for n in (97, 5)]
    batch = SimpleNamespace(reqs=reqs)
    hooks.record_prompt_lengths(
        SimpleNamespace(forward_mode=ForwardMode.DECODE), ForwardBatch, batch
    )
    assert hooks.prompt_length("hooked-97") is None
    hooks.record_prompt_lengths(
        SimpleNamespace(forward_mode=ForwardMode.EXTEND), ForwardBatch, batch
    )
    assert [hooks.prompt_length(req.rid) for req in reqs] == [97, 5]

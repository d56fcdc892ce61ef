"""What the SGLang backend tests share: the backend as a server builds it, and SPEC's answer
(``ops.reference``) for what a request's decode step must compute."""

import os

import torch

from triton_chunkkv.ops import reference

# Small shapes: SGLang's and our Triton kernels run under the interpreter.
CHUNK, WINDOW = 4, 8


def clear_settings(monkeypatch):
    """No CHUNKKV_* variable from the environment the tests run in."""
    for name in list(os.environ):
        if name.startswith("CHUNKKV_"):
            monkeypatch.delenv(name)


def chunkkv_backend(harness, monkeypatch, **options):
    """The backend as a server creates it: settings from CHUNKKV_* variables."""
    clear_settings(monkeypatch)
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


def prefill(harness, backends, lens, chunked):
    """Whole prompts, or each prompt in two extend passes (the second one shorter than the
    window for some requests, so the window spans both passes)."""
    harness.add_requests(lens)
    if chunked:
        first = [n - min(n // 2, 5 + 7 * i) for i, n in enumerate(lens)]
        harness.extend(backends, first)
        harness.extend(backends, [n - m for n, m in zip(lens, first)])
    else:
        harness.extend(backends, lens)


def assert_decodes_as_spec(harness, outputs, request, **selection):
    """Every layer's output of ``request`` in one decode step against SPEC."""
    for layer in range(harness.num_layers):
        expected, _ = expected_decode(harness, request, layer, **selection)
        torch.testing.assert_close(outputs[layer][request], expected, atol=2e-3, rtol=2e-3)

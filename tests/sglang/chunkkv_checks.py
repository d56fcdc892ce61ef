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


def expected_dynamic_decode(harness, request, layer, *, budget=None, ratio=None):
    """Dynamic mode, in float64 from the request's own prompt keys and this step's query: each
    whole chunk before the SPEC tail gets per-dimension key bounds, each KV head keeps the
    ``n_keep`` chunks (SPEC step 5) whose largest bound over its query heads,
    ``sum_d max(q_d kmin_d, q_d kmax_d)``, is highest (ties: the lower index), then exact
    attention over them and ``[tail_start, seq_len)``. A prompt that fits the budget or the
    window, or has no whole chunk before its tail, is read whole.

    Returns the output ``[Hq*D]`` and the kept chunks ``[Hkv, n_keep]`` (ascending; ``None``
    when the prompt is read whole)."""
    prompt_len = harness.prompt_lens[request]
    keys = harness.seen(harness.keys, layer, request).double()  # [Hkv, S, D]
    values = harness.seen(harness.values, layer, request).double()
    query = harness.seen(harness.queries, layer, request)[:, -1].double()  # [Hq, D]
    (num_kv, seq_len, dim), num_q = keys.shape, query.shape[0]
    group = num_q // num_kv
    limit = reference.resolve_budget(prompt_len, budget, ratio)
    tail_start = CHUNK * ((prompt_len - WINDOW) // CHUNK)
    retained = torch.ones(num_kv, seq_len, dtype=torch.bool)
    top = None
    if limit < prompt_len and prompt_len >= WINDOW and tail_start > 0:
        n = tail_start // CHUNK
        n_keep = min(max((limit - (prompt_len - tail_start)) // CHUNK, 0), n)
        chunks = keys[:, :tail_start].reshape(num_kv, n, CHUNK, dim)
        kmin, kmax = chunks.amin(dim=2), chunks.amax(dim=2)  # [Hkv, n, D]
        q = query.view(num_kv, group, 1, dim)
        bound = torch.maximum(q * kmin[:, None], q * kmax[:, None]).sum(-1)  # [Hkv, g, n]
        order = torch.sort(bound.amax(dim=1), dim=-1, descending=True, stable=True).indices
        top = order[:, :n_keep].sort(dim=-1).values
        retained[:, :tail_start] = False
        for head in range(num_kv):
            for chunk in top[head].tolist():
                retained[head, chunk * CHUNK : (chunk + 1) * CHUNK] = True
    keys = keys.repeat_interleave(group, dim=0)
    values = values.repeat_interleave(group, dim=0)
    logits = torch.einsum("hd,htd->ht", query, keys) * dim**-0.5
    logits = logits.masked_fill(~retained.repeat_interleave(group, dim=0), float("-inf"))
    out = torch.einsum("ht,htd->hd", torch.softmax(logits, dim=-1), values)
    return out.reshape(-1).to(harness.dtype), top

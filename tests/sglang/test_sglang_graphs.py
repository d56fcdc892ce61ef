"""CUDA graphs: SGLang's decode graph-runner protocol on the CPU, and the plugin's graph
settings.

A CUDA graph replays the kernels it captured with the addresses and shapes they had at capture;
only the buffers' contents change. The runner's protocol (``DecodeCudaGraphRunner``):
``init_cuda_graph_state(max_bs, ...)`` once; per captured batch size, a dummy batch over the
runner's fixed input buffers through ``init_forward_metadata_out_graph(in_capture=True)`` and
the captured forward; per replay, the real batch padded into those buffers
(``build_replay_fb_view``) through ``init_forward_metadata_out_graph`` and the replay. Here
the "capture" records every ``sparse_decode`` launch's metadata tensors (dynamic mode: also each
layer's gather of the bounds tables and its ``select_decode_chunks`` launch, whose chunk indices
are the graph's own intermediate), and each "replay" runs the captured forward again after the
out-of-graph fill: it must launch on exactly the recorded tensors and give the eager backend's
outputs.
"""

import logging
from types import SimpleNamespace

import pytest
import torch
from chunkkv_checks import (
    CHUNK,
    assert_decodes_as_spec,
    chunkkv_backend,
    expected_dynamic_decode,
    prefill,
)

BUDGET = 40
FILL = 1  # TritonAttnBackend.get_cuda_graph_seq_len_fill_value()


def pointers(*tensors):
    return [(t.data_ptr(), tuple(t.shape), t.stride()) for t in tensors]


@pytest.fixture
def recorded_launches(monkeypatch):
    """What each captured launch reads besides the query (pointers and shapes), in order: the
    bounds gathers and ``select_decode_chunks`` launches of dynamic mode, and ``sparse_decode``
    (its chunk indices by pointer where they come from outside the graph, sparse mode)."""
    from triton_chunkkv.integrations.sglang import backend as backend_module
    from triton_chunkkv.integrations.sglang.tables import RowBounds

    launches = []
    run, select, gather = (
        backend_module.sparse_decode,
        backend_module.select_decode_chunks,
        RowBounds.batch_bounds,
    )
    produced = set()  # chunk indices made inside the forward

    def record_decode(*args, **kwargs):
        chunk_idx = args[3]
        index = [tuple(chunk_idx.shape)] if id(chunk_idx) in produced else pointers(chunk_idx)
        tensors = [args[1], args[2], args[5], args[6], kwargs["slot_map"], kwargs["chunk_counts"]]
        launches.append(["decode", *pointers(*tensors), *index, args[4]])
        return run(*args, **kwargs)

    def record_select(q, kmin, kmax, n_keep, **kwargs):
        counts = pointers(kwargs["keep_counts"], kwargs["chunk_counts"])
        launches.append(["select", tuple(kmin.shape), tuple(kmax.shape), n_keep, *counts])
        chunk_idx = select(q, kmin, kmax, n_keep, **kwargs)
        produced.add(id(chunk_idx))
        return chunk_idx

    def record_gather(self, layer, rows, width):
        launches.append(["bounds", layer, *pointers(self.kmin, self.kmax, rows), width])
        return gather(self, layer, rows, width)

    monkeypatch.setattr(backend_module, "sparse_decode", record_decode)
    monkeypatch.setattr(backend_module, "select_decode_chunks", record_select)
    monkeypatch.setattr(RowBounds, "batch_bounds", record_gather)
    return launches


def runner_buffers(max_bs):
    """The decode runner's fixed input buffers (``DecodeInputBuffers``), as capture fills
    them: padding row 0, fill-value lengths."""
    return SimpleNamespace(
        input_ids=torch.zeros(max_bs, dtype=torch.int64),
        positions=torch.zeros(max_bs, dtype=torch.int64),
        req_pool_indices=torch.zeros(max_bs, dtype=torch.int64),
        seq_lens=torch.full((max_bs,), FILL, dtype=torch.int64),
        seq_lens_cpu=torch.full((max_bs,), FILL, dtype=torch.int64),
        out_cache_loc=torch.zeros(max_bs, dtype=torch.int64),
        encoder_lens=None,
        mamba_track_indices=None,
    )


def capture_batch(buffers, max_bs):
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    return ForwardBatch(
        forward_mode=ForwardMode.DECODE,
        batch_size=max_bs,
        input_ids=buffers.input_ids,
        req_pool_indices=buffers.req_pool_indices,
        seq_lens=buffers.seq_lens,
        out_cache_loc=buffers.out_cache_loc,
        seq_lens_sum=int(buffers.seq_lens.sum()),
        seq_lens_cpu=buffers.seq_lens_cpu,
        positions=buffers.positions,
    )


def padded(x, max_bs):
    return torch.cat([x, x.new_zeros(max_bs - x.shape[0], *x.shape[1:])])


@pytest.mark.parametrize("mode", ["sparse", "dynamic"])
def test_decode_graph_capture_and_replay(make_harness, monkeypatch, recorded_launches, mode):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import build_replay_fb_view

    max_bs = 4
    harness = make_harness()
    graphed = chunkkv_backend(harness, monkeypatch, budget=BUDGET, mode=mode)
    eager = chunkkv_backend(harness, monkeypatch, budget=BUDGET, mode=mode)
    graphed.init_cuda_graph_state(max_bs, max_bs)
    if mode == "sparse":
        assert graphed.table.max_chunks == 2 * BUDGET // CHUNK
    else:  # every step scores every chunk a context-long prompt has, and reads L / c of them
        assert graphed._graph.width == graphed.bounds.max_chunks
        assert graphed._graph.n_keep == BUDGET // CHUNK

    # Capture, at start-up: no request yet.
    buffers = runner_buffers(max_bs)
    static = capture_batch(buffers, max_bs)
    graphed.init_forward_metadata_out_graph(static, in_capture=True)
    dummy_q, dummy_k, dummy_v = harness._random_qkv(max_bs)
    for layer in range(harness.num_layers):
        graphed.forward_decode(
            dummy_q[layer], dummy_k[layer], dummy_v[layer], harness.layers[layer], static, False
        )
    captured = list(recorded_launches)
    assert len(captured) == harness.num_layers * (1 if mode == "sparse" else 3)

    # Serving: two compressed requests and a dense one, prefilled eagerly by both backends.
    lens = [103, 37, 61]
    prefill(harness, [graphed, eager], lens, chunked=True)
    for _ in range(2):
        (expected,) = harness.decode([eager])  # eager decode; writes the step's KV
        batch, q, k, v = harness.last_decode
        raw_bs = batch.batch_size
        # The runner's load_batch: the real batch into its buffers, padding rows after it.
        buffers.req_pool_indices.copy_(padded(batch.req_pool_indices, max_bs))
        padding = torch.tensor([0] * raw_bs + [FILL] * (max_bs - raw_bs))
        buffers.seq_lens.copy_(padded(batch.seq_lens, max_bs) + padding)
        buffers.seq_lens_cpu.copy_(buffers.seq_lens)
        view = build_replay_fb_view(
            forward_batch=batch,
            buffers=buffers,
            bs=max_bs,
            raw_bs=raw_bs,
            num_tokens=max_bs,
            global_num_tokens_cpu=None,
            seq_len_fill_value=FILL,
            capture_forward_mode=ForwardMode.DECODE,
            is_encoder_decoder=False,
        )
        recorded_launches.clear()
        graphed.init_forward_metadata_out_graph(view)
        # The replay: the captured launches, on the runner's buffers (the step's KV is in).
        replayed = [
            graphed.forward_decode(
                padded(q[layer], max_bs),
                k[layer],
                v[layer],
                harness.layers[layer],
                static,
                save_kv_cache=False,
            )
            for layer in range(harness.num_layers)
        ]
        assert recorded_launches == captured
        for layer in range(harness.num_layers):
            torch.testing.assert_close(replayed[layer][:raw_bs], expected[layer])
        for request in range(raw_bs):
            if mode == "sparse":
                assert_decodes_as_spec(harness, replayed, request, budget=BUDGET)
                continue
            for layer in range(harness.num_layers):
                truth, _ = expected_dynamic_decode(harness, request, layer, budget=BUDGET)
                torch.testing.assert_close(replayed[layer][request], truth, atol=2e-3, rtol=2e-3)
    assert graphed.requests[harness.rows[1]].compressed is False


def test_the_graph_buffers_bound_every_selection(make_harness, monkeypatch):
    harness = make_harness(num_layers=1)
    chunkkv = chunkkv_backend(harness, monkeypatch, ratio=0.5)
    chunkkv.init_cuda_graph_state(2, 2)
    context = harness.req_to_token_pool.req_to_token.shape[1]
    assert chunkkv.table.max_chunks == context // 4  # twice the budget covers the context
    selection = SimpleNamespace(chunk_idx=torch.zeros(1, 2, context // 4 + 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="CUDA-graph decode buffers"):
        chunkkv.table.store(0, 1, selection)


def resolve(tmp_path, **server_args):
    """SGLang's server-argument resolution (what Engine and launch_server run), plugins loaded."""
    import transformers
    from sglang.srt.arg_groups.overrides import resolved_view
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    load_plugins()
    transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(tmp_path)
    args = ServerArgs(model_path=str(tmp_path), skip_tokenizer_init=True, **server_args)
    args.resolve_once()
    return resolved_view(args)


def test_prefill_graphs_are_turned_off_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        view = resolve(
            tmp_path, attention_backend="chunkkv", device="cpu", cuda_graph_backend_prefill="full"
        )
    assert view.cuda_graph_config.prefill.backend == "disabled"
    assert view.cuda_graph_config.decode.backend == "full"  # SGLang's default stays
    assert "chunkkv: disabling the 'full' prefill CUDA graph" in caplog.text


def test_another_backends_graphs_are_left_alone(tmp_path):
    view = resolve(
        tmp_path, attention_backend="triton", device="cpu", cuda_graph_backend_prefill="full"
    )
    assert view.cuda_graph_config.prefill.backend == "full"


def test_chunkkv_must_serve_prefill_and_decode(tmp_path):
    with pytest.raises(ValueError, match="must serve prefill and decode"):
        resolve(
            tmp_path,
            attention_backend="chunkkv",
            prefill_attention_backend="triton",
            device="cpu",
        )

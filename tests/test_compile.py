"""The ops under ``torch.compile(fullgraph=True)`` (no graph break) and CUDA graphs.

On the CPU, on both paths (the kernels under the interpreter, the torch reference): a function
that scores, selects, gathers and decodes, compiled by inductor, and decode steps calling only
``sparse_decode`` in each of its layouts, compiled with ``aot_eager`` (the same graph; inductor
compiles an opaque operator into the same call, and its C++ build would triple the test time),
each equal to eager mode bit for bit. The ``gpu`` tests add ``mode="reduce-overhead"`` and a
manual ``torch.cuda.CUDAGraph`` capture whose index tensors change between replays.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from triton_chunkkv import cache, ops
from triton_chunkkv.ops import library, reference
from triton_chunkkv.policies.chunkkv import ChunkKV

# numpy warns about the NaN the interpreter reads from poisoned buffers while merging splits.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

B, HKV, G, T, D, C, W, N_KEEP = 2, 2, 2, 48, 32, 5, 8, 3  # P0 = 40: 8 chunks
GENERATED = 4  # tokens generated after the prompt
S_MAX = T + GENERATED
P0 = reference.tail_start(T, C, W)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def int32(values, device="cpu") -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def prompt_and_cache(device="cpu", dtype=torch.float32):
    """A prompt's window queries and keys/values, the decode cache that continues them with
    ``GENERATED`` tokens, and the newest token's query."""
    q_obs = torch.randn(B, HKV * G, W, D, device=device, dtype=dtype)
    k_cache = torch.randn(B, HKV, S_MAX, D, device=device, dtype=dtype)
    v_cache = torch.randn(B, HKV, S_MAX, D, device=device, dtype=dtype)
    q = torch.randn(B, HKV * G, D, device=device, dtype=dtype)
    return q_obs, k_cache, v_cache, q


def score_select_gather_decode(q_obs, k_cache, v_cache, q, seq_lens):
    """Compress the prompt ``k_cache[:, :, :T]`` and decode the newest token over the kept
    chunks plus the dense tail, both ways: the compacted cache and in place."""
    k, v = k_cache[:, :, :T], v_cache[:, :, :T]
    scores = ops.window_scores(q_obs, k)
    chunk_idx = ops.select_chunks(ops.chunk_sum(scores, C, W), N_KEEP)
    k_kept, v_kept = ops.gather_chunks(k, v, chunk_idx, C, P0, validate=False)
    out = ops.sparse_decode(
        q, k_cache, v_cache, chunk_idx, C, P0, seq_lens, validate=False
    )  # fmt: skip
    return scores, chunk_idx, k_kept, v_kept, out


def assert_all_equal(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)


def as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def called_operators(graph: torch.fx.GraphModule) -> set:
    return {
        node.target
        for node in graph.graph.nodes
        if node.op == "call_function" and node.target in set(library.OPERATORS.values())
    }


def test_pipeline_fullgraph_inductor(path):
    """Score -> select -> gather -> sparse decode: one graph (no break), the five operators
    in it, results equal to eager; a second call with new data does not recompile."""
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(score_select_gather_decode, backend=counter, fullgraph=True)
    for step in range(2):
        inputs = (*prompt_and_cache(), int32([S_MAX - step, S_MAX - 2]))
        assert_all_equal(compiled(*inputs), score_select_gather_decode(*inputs))
    assert counter.frame_count == 1
    assert called_operators(counter.graphs[0]) == {
        library.WINDOW_SCORES,
        library.CHUNK_SUM,
        library.SELECT_CHUNKS,
        library.GATHER_CHUNKS,
        library.SPARSE_DECODE,
    }
    # The decode reads what the gather kept: attention over the compacted prompt plus the
    # generated tokens (row 0 sees all of them).
    q_obs, k_cache, v_cache, q = inputs[:4]
    _, _, k_kept, v_kept, out = compiled(q_obs, k_cache, v_cache, q, int32([S_MAX, S_MAX]))
    keys = torch.cat([k_kept, k_cache[:, :, T:]], dim=2).repeat_interleave(G, dim=1)
    values = torch.cat([v_kept, v_cache[:, :, T:]], dim=2).repeat_interleave(G, dim=1)
    probs = torch.softmax(torch.einsum("bhd,bhtd->bht", q, keys) * D**-0.5, dim=-1)
    torch.testing.assert_close(out, torch.einsum("bht,bhtd->bhd", probs, values))


def dense_one_query():
    _, k_cache, v_cache, q = prompt_and_cache()
    return dict(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        chunk_idx=int32([[[0, 3, 5], [1, 2, 7]]] * B),
        tail_start=P0,
        seq_lens=int32([S_MAX, S_MAX - 2]),
    )


def dense_several_queries():
    """``[B, Hq, n, D]`` queries, left-padded rows (``row_offset``), rows keeping different
    numbers of chunks, a per-row ``tail_start`` tensor."""
    case = dense_one_query()
    case.update(
        q=torch.randn(B, HKV * G, 3, D),
        tail_start=int32([P0, P0 - 2 * C]),
        seq_lens=int32([S_MAX - 1, S_MAX - 3]),
        row_offset=int32([0, 2]),
        chunk_counts=int32([3, 2]),
        scaling=0.25,
    )
    # Below row 1's tail (30) too, so that the rows may swap their chunks.
    case["chunk_idx"] = int32([[[0, 3, 5], [1, 2, 4]], [[0, 4, 5], [1, 3, 4]]])
    return case


def slot_layout():
    """SGLang's layout: a shuffled slot pool ``[num_slots, Hkv, D]`` and ``slot_map``."""
    case = dense_one_query()
    slots = torch.randperm(B * S_MAX)[: B * S_MAX].view(B, S_MAX)
    k_pool, v_pool = torch.empty(B * S_MAX, HKV, D), torch.empty(B * S_MAX, HKV, D)
    k_pool[slots], v_pool[slots] = case["k_cache"].transpose(1, 2), case["v_cache"].transpose(1, 2)
    case.update(k_cache=k_pool, v_cache=v_pool, slot_map=slots.to(torch.int32))
    return case


LAYOUTS = {
    "dense-one-query": dense_one_query,
    "dense-several-queries": dense_several_queries,
    "slot-map": slot_layout,
}


def decode_step(q, k_cache, v_cache, chunk_idx, tail_start, seq_lens, **options):
    return ops.sparse_decode(
        q, k_cache, v_cache, chunk_idx, C, tail_start, seq_lens, validate=False, **options
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_step_fullgraph(path, layout):
    """A decode step calling only ``sparse_decode``: one graph for every step (the index and
    length tensors change, the shapes do not), each equal to eager."""
    case = LAYOUTS[layout]()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(decode_step, backend=counter, fullgraph=True)
    for step in range(3):
        case["seq_lens"] = case["seq_lens"] - int(step > 0)  # new lengths, same shapes
        case["chunk_idx"] = case["chunk_idx"].flip(0)  # the rows swap their chunks
        assert torch.equal(compiled(**case), decode_step(**case))
    assert counter.frame_count == 1
    assert called_operators(counter.graphs[0]) == {library.SPARSE_DECODE}


def test_decode_step_dynamic_shapes(path):
    """``dynamic=True``: a growing cache, another ``tail_start`` and another batch reuse one
    graph (the operator's ints are ``SymInt``s, its fake shapes symbolic)."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(decode_step, backend=counter, fullgraph=True, dynamic=True)
    # Sizes unlike every other (duck sizing would tie equal sizes together).
    for batch, s_max, tail_start in [(5, 52, 40), (7, 61, 35), (6, 70, 45)]:
        case = dict(
            q=torch.randn(batch, HKV * G, D),
            k_cache=torch.randn(batch, HKV, s_max, D),
            v_cache=torch.randn(batch, HKV, s_max, D),
            chunk_idx=int32([[[0, 3, 5], [1, 2, 6]]] * batch),
            tail_start=tail_start,
            seq_lens=int32([s_max - b for b in range(batch)]),
        )
        assert torch.equal(compiled(**case), decode_step(**case))
    assert counter.frame_count == 1


def test_policy_and_cache_paths_fullgraph(path):
    """The compositions call the same operators: ChunkKV's selection, ``ops.compress`` with a
    budget or a ratio, and the cache's sparse- and dynamic-mode decode compile to one graph
    each."""
    q_obs, k_cache, v_cache, q = prompt_and_cache()
    k, v = k_cache[:, :, :T].contiguous(), v_cache[:, :, :T].contiguous()
    policy = ChunkKV(chunk_size=C, window=W)

    def select(q_obs, k):
        return policy.select(q_obs, k, budget=30, layer=0, num_layers=1).chunk_idx

    def compress(q_obs, k, v):
        return tuple(ops.compress(q_obs, k, v, budget=30, chunk_size=C, window=W)[:3])

    def compress_ratio(q_obs, k, v):  # 0.29 of T: the decimal's floor, not the float product's
        return tuple(ops.compress(q_obs, k, v, ratio=0.29, chunk_size=C, window=W)[:3])

    sparse = cache.SparseIndex(int32([[[0, 3, 5], [1, 2, 7]]] * B), C, P0, None, None)
    kmin, kmax = ops.chunk_bounds(k, C, P0 // C)
    dynamic = cache.DynamicIndex(
        kmin, kmax, int32([8, 8]), int32([3, 2]), 3, C, P0, None
    )  # fmt: skip

    def attend(index):
        def run(query, key, value):
            return cache.sparse_attention(
                query, key, value, index, key_start=None, scaling=None, validate=False
            )

        return run

    query = q[:, :, None]
    for fn, inputs in [
        (select, (q_obs, k)),
        (compress, (q_obs, k, v)),
        (compress_ratio, (q_obs, k, v)),
        (attend(sparse), (query, k_cache, v_cache)),
        (attend(dynamic), (query, k_cache, v_cache)),
    ]:
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        got = torch.compile(fn, backend=counter, fullgraph=True)(*inputs)
        expected = fn(*inputs)
        assert_all_equal(as_tuple(got), as_tuple(expected))
        assert counter.frame_count == 1


def test_validate_rules_under_compile():
    """``validate=True`` reads the indices on the host: a graph break (an error with
    ``fullgraph=True``, a correct result without it). ``validate=False`` still runs the checks
    that read no data while tracing: with ``fullgraph=True`` a bad argument fails the
    compilation with the op's own error, not a wrong read at run time."""
    case = dense_one_query()

    def checked(**case):
        return ops.sparse_decode(**case, chunk_size=C)

    with pytest.raises(torch._dynamo.exc.TorchDynamoException, match="bad.any"):
        torch.compile(checked, backend="aot_eager", fullgraph=True)(**case)
    torch._dynamo.reset()
    got = torch.compile(checked, backend="aot_eager")(**case)
    assert torch.equal(got, checked(**case))

    torch._dynamo.reset()
    case["k_cache"] = case["k_cache"].double()
    with pytest.raises(torch._dynamo.exc.TorchDynamoException, match="k_cache must have dtype"):
        torch.compile(decode_step, backend="aot_eager", fullgraph=True)(**case)


# ---------------------------------------------------------------------------------------------
# CUDA graphs (skipped without CUDA)
# ---------------------------------------------------------------------------------------------


def on_cuda(case: dict) -> dict:
    return {
        name: value.cuda() if isinstance(value, torch.Tensor) else value
        for name, value in case.items()
    }


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_pipeline_reduce_overhead(dtype):
    """Score -> select -> gather -> decode under inductor's CUDA graphs: the warm-up, the
    recording and the replays all equal eager."""
    compiled = torch.compile(score_select_gather_decode, mode="reduce-overhead", fullgraph=True)
    for step in range(4):
        inputs = (*prompt_and_cache("cuda", dtype), int32([S_MAX - step, S_MAX - 1], "cuda"))
        got = [t.clone() for t in compiled(*inputs)]  # replays reuse the output buffers
        assert_all_equal(got, score_select_gather_decode(*inputs))


@pytest.mark.gpu
def test_compress_manual_cuda_graph():
    """``ops.compress`` syncs with the host nowhere (four launches whose grids depend on
    shapes only): captured once, replayed on new prompts written into the captured inputs,
    it gives eager's result for them."""
    q_obs, k_cache, v_cache, _ = prompt_and_cache("cuda", torch.bfloat16)
    static = [q_obs, k_cache[:, :, :T].contiguous(), v_cache[:, :, :T].contiguous()]
    options = dict(budget=30, chunk_size=C, window=W)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (autotuning included) outside the capture
        for _ in range(2):
            ops.compress(*static, **options)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.compress(*static, **options)
    for _ in range(3):
        for tensor in static:
            tensor.normal_()
        graph.replay()
        torch.cuda.synchronize()
        expected = ops.compress(*static, **options)
        assert_all_equal(tuple(out[:3]), tuple(expected[:3]))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_step_reduce_overhead(layout):
    case = on_cuda(LAYOUTS[layout]())
    compiled = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)
    for step in range(4):
        case["seq_lens"] = case["seq_lens"] - int(step > 0)
        case["chunk_idx"] = case["chunk_idx"].flip(0).contiguous()
        got = compiled(**case).clone()
        assert torch.equal(got, decode_step(**case))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sparse_decode_manual_cuda_graph(layout):
    """``sparse_decode(validate=False)`` captured once; new indices and lengths written into
    the captured tensors in place, then replayed, give eager's result for them."""
    case = on_cuda(LAYOUTS[layout]())
    static = {name: v.clone() if isinstance(v, torch.Tensor) else v for name, v in case.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (autotuning included) outside the capture
        for _ in range(2):
            decode_step(**static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_step(**static)
    for step in range(3):
        static["chunk_idx"].copy_(case["chunk_idx"].flip(0) if step % 2 else case["chunk_idx"])
        static["seq_lens"].copy_(case["seq_lens"] - step)
        if isinstance(static["tail_start"], torch.Tensor):
            static["tail_start"].copy_(case["tail_start"] + C * (step % 2))
        static["q"].normal_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, decode_step(**static))

"""ops.sparse_decode: block-sparse decode attention over R(b, h), read in place.

Runs the Triton kernels through the interpreter (conftest sets TRITON_INTERPRET=1) with
NaN-poisoned outputs. The truth is softmax attention over the compacted cache of SPEC step 7
(``reference.gather_chunks``) followed by the generated tokens.
"""

import pytest
import torch

from triton_chunkkv import ops
from triton_chunkkv.ops import occupancy, reference
from triton_chunkkv.ops.kernels import sparse_decode as sparse_decode_kernel

TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}


def random_chunks(batch, num_kv_heads, n_keep, num_chunks) -> torch.Tensor:
    """int32 ``[B, Hkv, n_keep]``: distinct sorted chunks, row ``b`` drawn from
    ``range(num_chunks[b])``."""
    rows = [
        [torch.randperm(num_chunks[b])[:n_keep].sort().values for _ in range(num_kv_heads)]
        for b in range(batch)
    ]
    return torch.tensor(
        [[row.tolist() for row in heads] for heads in rows], dtype=torch.int32
    ).reshape(batch, num_kv_heads, n_keep)


def make_case(
    batch=3,
    num_kv_heads=2,
    group=3,
    head_dim=64,
    chunk_size=10,
    n_keep=3,
    prompt_lens=(57, 43, 66),
    seq_lens=(70, 45, 66),
    window=4,
    s_max=None,
    dtype=torch.float32,
):
    """Random inputs: prompt ``b`` has ``prompt_lens[b]`` tokens (so ``tail_start_b`` follows
    SPEC step 3 with ``window``), then ``seq_lens[b] - prompt_lens[b]`` generated tokens."""
    s_max = s_max or max(seq_lens) + 3
    tails = [reference.tail_start(t, chunk_size, window) for t in prompt_lens]
    return dict(
        q=torch.randn(batch, num_kv_heads * group, head_dim).to(dtype),
        k_cache=torch.randn(batch, num_kv_heads, s_max, head_dim).to(dtype),
        v_cache=torch.randn(batch, num_kv_heads, s_max, head_dim).to(dtype),
        chunk_idx=random_chunks(batch, num_kv_heads, n_keep, [t // chunk_size for t in tails]),
        chunk_size=chunk_size,
        tail_start=torch.tensor(tails, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
    ), list(prompt_lens)


def attention(q, k, v, scaling):
    """float32 softmax attention of ``q [Hq, D]`` over ``k, v [Hkv, L, D]`` (GQA)."""
    g = q.shape[0] // k.shape[0]
    k, v = k.float().repeat_interleave(g, 0), v.float().repeat_interleave(g, 0)
    if k.shape[1] == 0:
        return torch.zeros(q.shape, dtype=torch.float32)
    probs = torch.softmax(scaling * torch.einsum("hd,hld->hl", q.float(), k), dim=-1)
    return torch.einsum("hl,hld->hd", probs, v)


def compacted_attention(case, prompt_lens, scaling=None):
    """The truth: attention over step 7's compacted prompt cache plus the generated tokens,
    row by row (rows differ in length)."""
    q, k, v = case["q"], case["k_cache"], case["v_cache"]
    scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
    out = []
    for b, prompt_len in enumerate(prompt_lens):
        seq_len, tail = int(case["seq_lens"][b]), int(case["tail_start"][b])
        kept_k, kept_v = reference.gather_chunks(
            k[b : b + 1, :, :prompt_len],
            v[b : b + 1, :, :prompt_len],
            case["chunk_idx"][b : b + 1],
            case["chunk_size"],
            tail,
        )
        keys = torch.cat([kept_k[0], k[b, :, prompt_len:seq_len]], dim=1)
        values = torch.cat([kept_v[0], v[b, :, prompt_len:seq_len]], dim=1)
        out.append(attention(q[b], keys, values, scaling))
    return torch.stack(out)


def poison_unretained(case, **layout):
    """Fill every cache entry outside R(b, h) with NaN: the kernel must not read them."""
    S_max = case["k_cache"].shape[2]
    keep = reference.retained_mask(
        case["chunk_idx"], case["chunk_size"], case["tail_start"], case["seq_lens"], S_max, **layout
    )
    for name in ("k_cache", "v_cache"):
        case[name] = case[name].masked_fill(~keep[..., None], float("nan"))


@pytest.mark.parametrize(
    "group, dtype, chunk_size, head_dim, num_splits",
    [
        (1, torch.float32, 10, 64, 1),
        (3, torch.float32, 10, 80, 3),
        (8, torch.float32, 16, 64, None),
        (3, torch.float16, 1, 64, 3),
        (8, torch.float16, 10, 80, 1),
        (1, torch.bfloat16, 10, 80, None),
        (3, torch.bfloat16, 16, 64, 3),
        (3, torch.float16, 10, 128, 2),
        (1, torch.float32, 10, 256, 3),
    ],
)
def test_matches_reference_and_compacted_attention(group, dtype, chunk_size, head_dim, num_splits):
    n_keep = 2 if chunk_size == 16 else 3
    case, prompt_lens = make_case(
        group=group, head_dim=head_dim, chunk_size=chunk_size, n_keep=n_keep, dtype=dtype
    )
    out = ops.sparse_decode(**case, num_splits=num_splits)
    assert out.shape == case["q"].shape and out.dtype == dtype
    torch.testing.assert_close(out, reference.sparse_decode(**case), **TOLERANCES[dtype])
    torch.testing.assert_close(
        out.float(), compacted_attention(case, prompt_lens), **TOLERANCES[dtype]
    )


def test_every_chunk_kept_equals_full_attention():
    case, _ = make_case(n_keep=4, prompt_lens=(57, 57, 57), seq_lens=(70, 61, 57))
    case["chunk_idx"] = reference.all_chunks(3, 2, 57, 10, 4, "cpu").contiguous()
    out = ops.sparse_decode(**case, scaling=0.3, num_splits=2)
    full = torch.stack(
        [
            attention(case["q"][b], case["k_cache"][b, :, :n], case["v_cache"][b, :, :n], 0.3)
            for b, n in enumerate(case["seq_lens"].tolist())
        ]
    )
    torch.testing.assert_close(out, full, rtol=1e-4, atol=1e-5)


def test_reads_nothing_outside_the_retained_set():
    case, prompt_lens = make_case()
    expected = compacted_attention(case, prompt_lens)
    poison_unretained(case)
    torch.testing.assert_close(
        ops.sparse_decode(**case, num_splits=3), expected, rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(reference.sparse_decode(**case), expected, rtol=1e-4, atol=1e-5)


def test_query_with_length_axis_and_int_tail_start():
    case, prompt_lens = make_case(prompt_lens=(55, 55, 55), seq_lens=(61, 55, 70))
    as_tensor = ops.sparse_decode(**case, num_splits=2)
    case["tail_start"] = int(case["tail_start"][0])
    case["q"] = case["q"][:, :, None, :]
    as_int = ops.sparse_decode(**case, num_splits=2)
    assert as_int.shape == (*as_tensor.shape[:2], 1, as_tensor.shape[2])  # shaped like q
    torch.testing.assert_close(as_int[:, :, 0], as_tensor, rtol=0, atol=0)
    torch.testing.assert_close(as_int, reference.sparse_decode(**case), rtol=1e-4, atol=1e-5)


def test_no_chunks_kept_and_empty_sets_give_zeros():
    # Row 0: tail only; row 1: nothing at all (zeros); row 2: tail only with partial blocks.
    case, prompt_lens = make_case(n_keep=0, prompt_lens=(57, 43, 66), seq_lens=(70, 40, 66))
    case["tail_start"][1] = 40
    out = ops.sparse_decode(**case, num_splits=3)
    torch.testing.assert_close(out, reference.sparse_decode(**case), rtol=1e-4, atol=1e-5)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(
        out[::2], compacted_attention(case, prompt_lens)[::2], rtol=1e-4, atol=1e-5
    )


def test_empty_tail_with_chunks():
    case, _ = make_case(prompt_lens=(57, 43, 66), seq_lens=(50, 43, 60))
    case["tail_start"] = case["seq_lens"].clone()
    out = ops.sparse_decode(**case, num_splits=2)
    torch.testing.assert_close(out, reference.sparse_decode(**case), rtol=1e-4, atol=1e-5)
    chunks_only = [
        torch.cat([torch.arange(j * 10, j * 10 + 10) for j in row])
        for row in case["chunk_idx"][0].tolist()
    ]
    expected = attention(
        case["q"][0, :3],
        case["k_cache"][0, :1, chunks_only[0]],
        case["v_cache"][0, :1, chunks_only[0]],
        64**-0.5,
    )
    torch.testing.assert_close(out[0, :3], expected, rtol=1e-4, atol=1e-5)


def test_more_splits_than_tokens_merge_empty_splits():
    case, prompt_lens = make_case(n_keep=1, prompt_lens=(20, 31, 24), seq_lens=(20, 33, 25))
    out = ops.sparse_decode(**case, num_splits=7)
    torch.testing.assert_close(out, compacted_attention(case, prompt_lens), rtol=1e-4, atol=1e-5)


def test_left_padded_rows_with_row_offset():
    case, prompt_lens = make_case(prompt_lens=(57, 43, 66), seq_lens=(60, 45, 66), s_max=70)
    truth = compacted_attention(case, prompt_lens)
    # Right-align each row in the cache, NaN left padding: row b's position p at offset + p.
    row_offset = torch.tensor([70 - 60, 70 - 45, 70 - 66], dtype=torch.int32)
    padded = {}
    for name in ("k_cache", "v_cache"):
        padded[name] = torch.full_like(case[name], float("nan"))
        for b, offset in enumerate(row_offset.tolist()):
            padded[name][b, :, offset:] = case[name][b, :, : 70 - offset]
    shifted = dict(case, **padded, row_offset=row_offset)
    torch.testing.assert_close(
        ops.sparse_decode(**shifted, num_splits=3), truth, rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(reference.sparse_decode(**shifted), truth, rtol=1e-4, atol=1e-5)


def test_chunk_counts_ignore_entries_past_the_count():
    case, prompt_lens = make_case(n_keep=3)
    counts = torch.tensor([3, 1, 0], dtype=torch.int32)
    truths = []
    for b, count in enumerate(counts.tolist()):
        row = dict(case, chunk_idx=case["chunk_idx"][b : b + 1, :, :count])
        for name in ("q", "k_cache", "v_cache", "tail_start", "seq_lens"):
            row[name] = case[name][b : b + 1]
        truths.append(compacted_attention(row, prompt_lens[b : b + 1]))
    garbage = case["chunk_idx"].clone()
    garbage[1, :, 1:] = torch.tensor([10**6, -5], dtype=torch.int32)
    garbage[2] = torch.tensor([7, 7, -1], dtype=torch.int32)
    case.update(chunk_idx=garbage, chunk_counts=counts)
    out = ops.sparse_decode(**case, num_splits=2)
    torch.testing.assert_close(out, torch.cat(truths), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        reference.sparse_decode(**case), torch.cat(truths), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_layout_with_permuted_slots(dtype):
    case, prompt_lens = make_case(dtype=dtype, group=8, num_kv_heads=1)
    expected = reference.sparse_decode(**case)
    poison_unretained(case)
    B, Hkv, S_max, D = case["k_cache"].shape
    num_slots = B * S_max + 5
    slot_map = torch.randperm(num_slots)[: B * S_max].reshape(B, S_max).to(torch.int32)
    slots = {}
    for name in ("k_cache", "v_cache"):
        slots[name] = torch.full((num_slots, Hkv, D), float("nan"), dtype=dtype)
        slots[name][slot_map.long()] = case[name].transpose(1, 2)
    paged = dict(case, **slots, slot_map=slot_map)
    out = ops.sparse_decode(**paged, num_splits=3)
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])
    torch.testing.assert_close(
        out.float(), compacted_attention(case, prompt_lens), **TOLERANCES[dtype]
    )


def test_validate_false_skips_the_data_checks():
    case, _ = make_case()
    expected = ops.sparse_decode(**case)
    # Attention does not depend on the order of the set: reversed chunks give the same output,
    # but only validate=False lets them through.
    case["chunk_idx"] = case["chunk_idx"].flip(-1).contiguous()
    with pytest.raises(ValueError, match="chunk_idx.*sorted"):
        ops.sparse_decode(**case)
    torch.testing.assert_close(
        ops.sparse_decode(**case, validate=False), expected, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda c: dict(chunk_idx=c["chunk_idx"] + 10), ValueError, "chunk_idx.*tail_start"),
        (lambda c: dict(chunk_idx=c["chunk_idx"] - 10), ValueError, "chunk_idx"),
        (
            lambda c: dict(chunk_idx=c["chunk_idx"].flip(-1).contiguous()),
            ValueError,
            "chunk_idx.*sorted",
        ),
        (lambda c: dict(chunk_idx=c["chunk_idx"].long()), TypeError, "chunk_idx"),
        (lambda c: dict(chunk_idx=c["chunk_idx"][:, :1]), ValueError, "chunk_idx"),
        (lambda c: dict(tail_start=c["seq_lens"] + 1), ValueError, "tail_start"),
        (lambda c: dict(tail_start=-1), ValueError, "tail_start"),
        (lambda c: dict(tail_start=c["tail_start"][:2]), ValueError, "tail_start"),
        (lambda c: dict(seq_lens=c["seq_lens"] + 100), ValueError, "seq_lens"),
        (lambda c: dict(seq_lens=c["seq_lens"].float()), TypeError, "seq_lens"),
        (lambda c: dict(k_cache=c["k_cache"].half()), ValueError, "dtype.*k_cache"),
        (lambda c: dict(v_cache=c["v_cache"][:, :, :-1]), ValueError, "v_cache"),
        (lambda c: dict(q=c["q"][:, :5]), ValueError, "q has 5 heads"),
        (lambda c: dict(q=c["q"][:, :, None][:, :, :0]), ValueError, "q"),  # no query
        (lambda c: dict(q=c["q"][..., :32]), ValueError, "k_cache has head dim"),
        (lambda c: dict(chunk_size=0), ValueError, "chunk_size"),
        (lambda c: dict(num_splits=0), ValueError, "num_splits"),
        (lambda c: dict(scaling="0.1"), TypeError, "scaling"),
        (
            lambda c: dict(row_offset=torch.full((3,), 10, dtype=torch.int32)),
            ValueError,
            "seq_lens",
        ),
        (
            lambda c: dict(row_offset=torch.full((3,), -1, dtype=torch.int32)),
            ValueError,
            "row_offset",
        ),
        (
            lambda c: dict(chunk_counts=torch.full((3,), 4, dtype=torch.int32)),
            ValueError,
            "chunk_counts",
        ),
    ],
)
def test_bad_input_names_the_argument(change, error, match):
    case, _ = make_case()
    with pytest.raises(error, match=match):
        ops.sparse_decode(**dict(case, **change(case)))


def test_bad_slot_layout_input_names_the_argument():
    case, _ = make_case()
    B, Hkv, S_max, D = case["k_cache"].shape
    slot_map = torch.arange(B * S_max, dtype=torch.int32).reshape(B, S_max)
    paged = dict(
        case,
        k_cache=case["k_cache"].transpose(1, 2).reshape(-1, Hkv, D),
        v_cache=case["v_cache"].transpose(1, 2).reshape(-1, Hkv, D),
        slot_map=slot_map,
    )
    with pytest.raises(ValueError, match="slot_map"):
        ops.sparse_decode(**dict(paged, slot_map=slot_map + 20))
    with pytest.raises(ValueError, match="row_offset"):
        ops.sparse_decode(**paged, row_offset=torch.zeros(B, dtype=torch.int32))
    with pytest.raises(ValueError, match="k_cache must have 3 dimensions"):
        ops.sparse_decode(**dict(paged, k_cache=case["k_cache"], v_cache=case["v_cache"]))


def test_default_num_splits_fills_the_gpu_without_tiny_splits(monkeypatch):
    monkeypatch.setattr(sparse_decode_kernel, "multiprocessor_count", lambda device: 132)
    choose = sparse_decode_kernel.default_num_splits
    # bf16, D 128, g 4: 4 resident CTAs per SM (occupancy.SPARSE_DECODE_RESOURCES): 528 slots.
    resident = occupancy.sparse_decode_ctas_per_sm(2, 128, 16)
    assert resident == 4
    assert choose(8, 3268, "cuda", resident) == 52  # B 1, T 32K, 10 %: 64-token splits
    assert choose(8, 13102, "cuda", resident) == sparse_decode_kernel.MAX_SPLITS  # T 128K
    assert choose(8, 300, "cuda", resident) == 5  # short sets: at least 64 tokens per split
    assert choose(64, 3268, "cuda", resident) == 8  # B 8: one wave, 512 of the 528 slots
    assert choose(4096, 100_000, "cuda", resident) == 1  # the batch alone fills the GPU
    assert choose(1, 10**7, "cuda", resident) == sparse_decode_kernel.MAX_SPLITS
    assert choose(8, 100_000, "cuda") == 16  # one resident CTA per SM: one wave of 128


def test_sparse_decode_split_count_uses_the_launch_occupancy(monkeypatch):
    """The auto split count comes from shapes and the compile report's resources only (the
    same on every CUDA-graph replay): the element size, head dim and group pick the entry."""
    seen = []
    monkeypatch.setattr(
        sparse_decode_kernel,
        "default_num_splits",
        lambda rows, tokens, device, ctas: seen.append((rows, tokens, ctas)) or 2,
    )
    case, _ = make_case(group=4, head_dim=128, dtype=torch.bfloat16)
    ops.sparse_decode(**case)
    B, Hkv = case["chunk_idx"].shape[:2]
    s_max = case["k_cache"].shape[2]
    assert seen == [(B * Hkv, 3 * 10 + s_max, 4)]


def test_ctas_per_sm_follows_the_sm90_limits():
    ctas = occupancy.ctas_per_sm
    assert ctas(72, 21504, 4) == 7  # registers: 72 x 32 = 2304 per warp, 28 warps
    assert ctas(90, 21504, 4) == 5  # 90 -> 96 x 32 per warp (units of 256), 21 warps
    assert ctas(32, 0, 4) == 16  # threads: 2048 / 128
    assert ctas(16, 0, 1) == 32  # blocks
    assert ctas(40, 73728, 4) == 3  # shared memory: 228 KB / (72 KB + 1 KB)
    assert ctas(255, 232448, 8) == 1
    limits = occupancy.SMLimits(shared_bytes=100 * 1024)
    assert ctas(40, 49152, 4, limits) == 2


def test_occupancy_table_matches_the_compile_reports():
    """Each entry is the maximum over the committed sm_90 reports (both Triton versions, every
    cache layout) of the default config's registers and shared memory."""
    import json
    import re
    from pathlib import Path

    reports = sorted((Path(__file__).parent.parent / "benchmarks/compile_reports").glob("*.json"))
    assert reports
    found = {}
    for path in reports:
        for variant in json.loads(path.read_text())["variants"]:
            if variant["kernel"] != "_sparse_decode_split_kernel":
                continue
            element_bytes = 4 if variant["dtype"] == "fp32" else 2
            first = sparse_decode_kernel._sparse_decode_split_kernel.configs_for(
                {"ELEMENT_BYTES": element_bytes}
            )[0]
            config = f"BLOCK_N={first.kwargs['BLOCK_N']} w{first.num_warps} s{first.num_stages}"
            if variant["config"] != config:
                continue
            assert occupancy.SPARSE_DECODE_DEFAULT_WARPS[element_bytes] == first.num_warps
            block_d = max(16, 1 << (variant["head_dim"] - 1).bit_length())
            block_g = int(re.search(r"BLOCK_G=(\d+)", variant["id"]).group(1))
            key = (element_bytes, block_d, block_g)
            registers, shared = found.get(key, (0, 0))
            found[key] = (
                max(registers, variant["registers"]),
                max(shared, variant["shared_bytes"]),
            )
    assert found == occupancy.SPARSE_DECODE_RESOURCES


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_matches_reference(dtype):
    case, prompt_lens = make_case(
        batch=3,
        num_kv_heads=8,
        group=4,
        head_dim=128,
        prompt_lens=(900, 517, 1333),
        seq_lens=(950, 517, 1400),
        n_keep=20,
        dtype=dtype,
    )
    cuda = {
        name: value.cuda() if isinstance(value, torch.Tensor) else value
        for name, value in case.items()
    }
    for num_splits in (1, 5, None):
        out = ops.sparse_decode(**cuda, num_splits=num_splits)
        torch.testing.assert_close(out.cpu(), reference.sparse_decode(**case), **TOLERANCES[dtype])


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_without_validation():
    case, _ = make_case(
        batch=2,
        num_kv_heads=8,
        group=4,
        head_dim=128,
        prompt_lens=(700, 640),
        seq_lens=(720, 641),
        s_max=1024,
        n_keep=16,
        dtype=torch.bfloat16,
    )
    cuda = {
        name: value.cuda() if isinstance(value, torch.Tensor) else value
        for name, value in case.items()
    }
    ops.sparse_decode(**cuda, validate=False)  # autotunes and compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.sparse_decode(**cuda, validate=False)
    cuda["seq_lens"].add_(5)  # a later decode step: same buffers, new data
    cuda["q"].copy_(torch.randn_like(cuda["q"]))
    graph.replay()
    expected = reference.sparse_decode(
        **{
            name: value.cpu() if isinstance(value, torch.Tensor) else value
            for name, value in cuda.items()
        }
    )
    torch.testing.assert_close(out.cpu(), expected, **TOLERANCES[torch.bfloat16])


def causal_compacted_attention(q, k, v, chunk_idx, chunk_size, tail_starts, seq_lens, scaling):
    """float32 truth for ``q [B, Hq, n, D]``, the ``n`` newest tokens: each attends to the
    gathered chunks, the dense range up to its own position, nothing after it."""
    B, Hq, n, D = q.shape
    g = Hq // k.shape[1]
    out = torch.zeros(B, Hq, n, D)
    for b in range(B):
        tail, seq_len = int(tail_starts[b]), int(seq_lens[b])
        for i in range(n):
            kk, vv = reference.gather_chunks(
                k[b : b + 1, :, : seq_len - n + i + 1],
                v[b : b + 1, :, : seq_len - n + i + 1],
                chunk_idx[b : b + 1],
                chunk_size,
                tail,
            )
            kk, vv = kk[0].float().repeat_interleave(g, 0), vv[0].float().repeat_interleave(g, 0)
            probs = torch.softmax(scaling * torch.einsum("hd,hld->hl", q[b, :, i].float(), kk), -1)
            out[b, :, i] = torch.einsum("hl,hld->hd", probs, vv)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group, n, splits", [(1, 7, 1), (3, 5, 3), (4, 16, 2), (2, 1, 4)])
def test_several_queries_attend_causally_among_themselves(dtype, group, n, splits):
    """A question after a compressed context: ``n`` new tokens at once, each seeing the kept
    chunks, the dense range and the new tokens up to itself (rows of different lengths)."""
    case, _ = make_case(
        group=group, prompt_lens=(57, 43, 66), seq_lens=(57 + n, 43 + n, 70 + n), dtype=dtype
    )
    B, Hq, D = case["q"].shape
    q = torch.randn(B, Hq, n, D).to(dtype)
    case["q"] = q
    out = ops.sparse_decode(**case, num_splits=splits)
    assert out.shape == (B, Hq, n, D) and out.dtype == dtype
    expected = causal_compacted_attention(
        q,
        case["k_cache"],
        case["v_cache"],
        case["chunk_idx"],
        case["chunk_size"],
        case["tail_start"],
        case["seq_lens"],
        D**-0.5,
    )
    torch.testing.assert_close(out.float(), expected, **TOLERANCES[dtype])
    torch.testing.assert_close(
        reference.sparse_decode(**case).float(), expected, **TOLERANCES[dtype]
    )
    poison_unretained(case)  # keys after the newest token and outside R are never read
    torch.testing.assert_close(ops.sparse_decode(**case, num_splits=splits), out)


def test_several_queries_in_the_slot_layout():
    case, _ = make_case(prompt_lens=(57, 43, 66), seq_lens=(63, 49, 72))
    B, Hkv, S_max, D = case["k_cache"].shape
    q = torch.randn(B, case["q"].shape[1], 6, D)
    dense = ops.sparse_decode(**{**case, "q": q})
    slots = torch.randperm(B * S_max).view(B, S_max).to(torch.int32)
    pool_k = torch.empty(B * S_max, Hkv, D)
    pool_v = torch.empty(B * S_max, Hkv, D)
    pool_k[slots.long()] = case["k_cache"].transpose(1, 2)
    pool_v[slots.long()] = case["v_cache"].transpose(1, 2)
    slotted = ops.sparse_decode(
        **{**case, "q": q, "k_cache": pool_k, "v_cache": pool_v}, slot_map=slots
    )
    torch.testing.assert_close(slotted, dense, rtol=1e-5, atol=1e-6)


def test_several_queries_need_the_dense_range_to_start_before_them():
    case, _ = make_case(prompt_lens=(57, 43, 66), seq_lens=(53, 45, 68))  # row 0: tail at 50
    case["q"] = torch.randn(3, case["q"].shape[1], 5, case["q"].shape[2])
    with pytest.raises(ValueError, match=r"tail_start <= seq_lens - n \+ 1"):
        ops.sparse_decode(**case)

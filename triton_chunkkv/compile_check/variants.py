"""The op calls whose kernel launches the compile check records.

A :class:`Call` is one public op call (dtype, head dim, GQA group, key mask, cache layout,
chunk size). Launched under :func:`~triton_chunkkv.compile_check.aot.recording_launches`, it
records one compile per kernel it launches and per autotune config that launch tunes over, so
every config of the active list is covered without naming configs here.

* :func:`full_matrix`: every kernel x dtype (bf16, fp16, fp32) x head dim (64, 80, 96, 128,
  256), key mask on/off (the window kernels with and without the fused chunk sums), the
  selection kernel's block sizes, and the GQA groups 1/2/4/7/8 x dense/HF/slot cache layouts of the
  sparse decode (``--full``).
* :func:`ci_subset`: what CI compiles on every run: bf16 at head dims 128 and 256 (the largest
  blocks: shared memory and spills), fp16 at 128, and the float32 lists at 128, with the key
  mask and the HF layout (the superset code paths); D 64/80/96 and the other groups/layouts at
  the first config only.

Shapes are small (inputs are CPU tensors the kernels never read) but keep the GPU's
specializations of a general prompt: the sequence length is not a multiple of 16.
"""

from __future__ import annotations

import dataclasses

import torch

from triton_chunkkv import ops
from triton_chunkkv.ops import reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEAD_DIMS = (64, 80, 96, 128, 256)
GROUPS = (1, 2, 4, 7, 8)
LAYOUTS = ("dense", "hf", "slot")
SEQ_LEN = 4100  # not a multiple of 16, as most prompts
WINDOW = 32
CHUNK_SIZE = 10


@dataclasses.dataclass(frozen=True)
class Call:
    op: str
    dtype: str = "bf16"
    head_dim: int = 128
    group: int = 4
    key_mask: bool = True
    layout: str = "hf"  # sparse_decode: dense (int tail), hf (row offsets), slot (slot map)
    queries: int = 1  # sparse_decode: the newest tokens at once (a question on a compressed cache)
    chunk_size: int = CHUNK_SIZE
    index_dtype: str = "int32"  # gather_chunks' chunk_idx
    num_chunks: int = 406  # select_chunks: chunks per row (406: T 4100, c 10)
    share_heads: bool = False  # select_chunks
    first_config_only: bool = False  # the first config of each list, not all of them
    seq_len: int = SEQ_LEN
    batch: int = 2
    num_kv_heads: int = 2

    @property
    def label(self) -> str:
        if self.op == "select_chunks":
            return " ".join(
                [self.op, self.dtype, f"n{self.num_chunks}"] + ["shared"] * self.share_heads
            )
        parts = [self.op, self.dtype]
        if self.op != "chunk_sum":
            parts.append(f"D{self.head_dim}")
        if self.op in (
            "window_scores",
            "window_chunk_scores",
            "sparse_decode",
            "decode_chunk_scores",
        ):
            parts.append(f"g{self.group}")
        if self.op in ("window_scores", "window_chunk_scores"):
            parts.append("mask" if self.key_mask else "nomask")
        if self.op == "sparse_decode":
            parts.append(self.layout)
            if self.queries > 1:
                parts.append(f"q{self.queries}")
        if self.op == "chunk_sum":
            parts.append(f"c{self.chunk_size}")
        if self.op == "gather_chunks" and self.index_dtype != "int32":
            parts.append(self.index_dtype)
        return " ".join(parts)

    def launch(self) -> None:
        dtype = DTYPES[self.dtype]
        B, Hkv, T, D = self.batch, self.num_kv_heads, self.seq_len, self.head_dim

        def empty(*shape, dtype=dtype):
            return torch.empty(shape, dtype=dtype)

        if self.op == "window_scores":
            mask = torch.ones(B, T, dtype=torch.bool) if self.key_mask else None
            ops.window_scores(
                empty(B, Hkv * self.group, WINDOW, D), empty(B, Hkv, T, D), key_mask=mask
            )
        elif self.op == "window_chunk_scores":
            mask = torch.ones(B, T, dtype=torch.bool) if self.key_mask else None
            ops.window_chunk_scores(
                empty(B, Hkv * self.group, WINDOW, D),
                empty(B, Hkv, T, D),
                self.chunk_size,
                key_mask=mask,
            )
        elif self.op == "select_chunks":
            scores = empty(B, Hkv, self.num_chunks)
            ops.select_chunks(scores, self.num_chunks // 10, share_heads=self.share_heads)
        elif self.op == "chunk_sum":
            ops.chunk_sum(torch.rand(B, Hkv, T).to(dtype), self.chunk_size, WINDOW)
        elif self.op == "gather_chunks":
            tail = reference.tail_start(T, self.chunk_size, WINDOW)
            chunk_idx = torch.arange(10, dtype=getattr(torch, self.index_dtype))
            chunk_idx = chunk_idx.expand(B, Hkv, 10).contiguous()
            ops.gather_chunks(
                empty(B, Hkv, T, D), empty(B, Hkv, T, D), chunk_idx, self.chunk_size, tail
            )
        elif self.op == "sparse_decode":
            self._sparse_decode(dtype)
        elif self.op == "decode_chunk_scores":
            n = reference.tail_start(T, self.chunk_size, WINDOW) // self.chunk_size
            ops.decode_chunk_scores(
                empty(B, Hkv * self.group, D),
                empty(B, Hkv, n, D),
                empty(B, Hkv, n, D),
                chunk_counts=torch.full((B,), n, dtype=torch.int32),
            )
        else:
            raise ValueError(f"unknown op {self.op!r}")

    def _sparse_decode(self, dtype) -> None:
        B, Hkv, T, D, c = (
            self.batch,
            self.num_kv_heads,
            self.seq_len,
            self.head_dim,
            self.chunk_size,
        )
        prompt = T - 64
        tail = reference.tail_start(prompt, c, WINDOW)
        n_keep = 40
        chunk_idx = torch.arange(n_keep, dtype=torch.int32).expand(B, Hkv, n_keep).contiguous()
        seq_lens = torch.full((B,), T - 7, dtype=torch.int32)
        shape = (
            (B, Hkv * self.group, self.queries, D) if self.queries > 1 else (B, Hkv * self.group, D)
        )
        q = torch.empty(shape, dtype=dtype)
        options = {}
        tail_start = tail
        if self.layout in ("hf", "slot"):
            tail_start = torch.full((B,), tail, dtype=torch.int32)
            options["chunk_counts"] = torch.full((B,), n_keep, dtype=torch.int32)
        if self.layout == "slot":
            slots = B * T
            k = torch.empty(slots, Hkv, D, dtype=dtype)
            v = torch.empty(slots, Hkv, D, dtype=dtype)
            options["slot_map"] = torch.arange(slots, dtype=torch.int32).view(B, T)
        else:
            k = torch.empty(B, Hkv, T, D, dtype=dtype)
            v = torch.empty(B, Hkv, T, D, dtype=dtype)
            if self.layout == "hf":
                options["row_offset"] = torch.zeros(B, dtype=torch.int32)
        ops.sparse_decode(q, k, v, chunk_idx, c, tail_start, seq_lens, **options)


def full_matrix() -> list[Call]:
    calls = []
    for dtype in DTYPES:
        for head_dim in HEAD_DIMS:
            for key_mask in (True, False):
                calls.append(Call("window_scores", dtype, head_dim, key_mask=key_mask))
                calls.append(Call("window_chunk_scores", dtype, head_dim, key_mask=key_mask))
            calls.append(Call("gather_chunks", dtype, head_dim))
            calls.append(Call("sparse_decode", dtype, head_dim))
            for group in GROUPS:
                for layout in LAYOUTS:
                    if (group, layout) != (4, "hf"):
                        calls.append(
                            Call(
                                "sparse_decode",
                                dtype,
                                head_dim,
                                group,
                                layout=layout,
                                first_config_only=True,
                            )
                        )
            calls.append(Call("decode_chunk_scores", dtype, head_dim))
            calls.append(Call("sparse_decode", dtype, head_dim, queries=16, first_config_only=True))
            for group in GROUPS:
                if group != 4:
                    options = dict(group=group, first_config_only=True)
                    calls.append(Call("decode_chunk_scores", dtype, head_dim, **options))
        for chunk_size in (1, 10, 300):
            calls.append(Call("chunk_sum", dtype, chunk_size=chunk_size))
    calls.append(Call("gather_chunks", "bf16", 128, index_dtype="int64"))
    for group in GROUPS:
        if group != 4:
            calls.append(Call("window_scores", "bf16", 128, group, first_config_only=True))
            calls.append(Call("window_chunk_scores", "bf16", 128, group, first_config_only=True))
    calls += select_calls()
    for dtype in ("bf16", "fp16"):
        calls.append(Call("select_chunks", dtype, num_chunks=3273))
    return calls


def select_calls() -> list[Call]:
    """The selection kernel's block sizes: 512 (T 4100), 4096 (8 warps; T 32K), 8192 (the
    largest held in registers) and the tiled walk of longer rows, each with and without
    ``share_heads``."""
    return [
        Call("select_chunks", "fp32", num_chunks=n, share_heads=shared)
        for n in (406, 3273, 8188, 13104)
        for shared in (False, True)
    ]


def ci_subset() -> list[Call]:
    calls = []
    for dtype, head_dim in (("bf16", 128), ("bf16", 256), ("fp16", 128), ("fp32", 128)):
        calls += [
            Call("window_scores", dtype, head_dim),
            Call("window_chunk_scores", dtype, head_dim),
            Call("gather_chunks", dtype, head_dim),
            Call("sparse_decode", dtype, head_dim),
            Call("decode_chunk_scores", dtype, head_dim),
            Call("sparse_decode", dtype, head_dim, queries=16, first_config_only=True),
        ]
    for head_dim in (64, 80, 96):
        calls += [
            Call(op, "bf16", head_dim, first_config_only=True)
            for op in ("window_scores", "gather_chunks", "sparse_decode")
        ]
    for layout in ("dense", "slot"):
        calls.append(Call("sparse_decode", layout=layout, first_config_only=True))
    calls.append(Call("window_scores", key_mask=False, first_config_only=True))
    calls.append(Call("window_chunk_scores", key_mask=False, first_config_only=True))
    calls += [Call("chunk_sum", "fp32", chunk_size=c) for c in (1, 10, 300)]
    calls += select_calls()
    return calls

"""Host time per decode step of the SGLang ``chunkkv`` backend's decode metadata, on the CPU.

    .venv-sglang/bin/python -m benchmarks.sglang_decode_host [--batch 32] [--layers 30]

What the backend adds to every decode step before the attention kernels run: gathering the
batch's kept chunks, chunk counts, tail starts and ``req_to_token`` rows (``_prepare_decode``,
the eager path), and the same into the CUDA-graph buffers (``init_forward_metadata_out_graph``,
before a graph replay). Dynamic mode (``CHUNKKV_MODE=dynamic``) gathers each row's chunk and
keep counts and tail start instead, and its request-pool rows for the bounds gathers that run
per layer with the selection (inside the graph: not host time there). A SmolLM2-shaped model
(30 layers, 9 query heads, 3 KV heads, head dim 64, float16), ``batch`` requests of ``prompt``
tokens at ratio 0.2, every layer selecting; the batch is built by the SGLang test harness
(``tests/sglang/sglang_harness.py``: SGLang's own pools and ``ForwardBatch``). SGLang's Triton
metadata and kernels are not run (on a CPU they need the interpreter, which would time the
interpreter): prefill only writes the pools, and selection (or the bounds) runs the torch
reference. Prints the median of ``--steps`` calls, per mode.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent


def build(batch: int, layers: int, prompt: int, mode: str = "sparse"):
    """A backend (settings from the ``CHUNKKV_*`` variables, its mode from ``mode``) holding
    ``batch`` prefilled requests, and their next decode batch; SGLang's runtime config must be
    published."""
    sys.path.insert(0, str(ROOT / "tests" / "sglang"))
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
    from sglang_harness import Harness

    def write_kv_only(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        for buffer, new in (
            (self.token_to_kv_pool.get_key_buffer(layer.layer_id), k),
            (self.token_to_kv_pool.get_value_buffer(layer.layer_id), v),
        ):
            buffer[forward_batch.out_cache_loc] = new.view(-1, *buffer.shape[1:])
        return torch.zeros_like(q)

    harness = Harness(
        num_layers=layers,
        q_heads=9,
        kv_heads=3,
        head_dim=64,
        max_requests=batch,
        max_context=prompt + 64,
        num_slots=batch * (prompt + 64),
    )
    with mock.patch.dict(os.environ, CHUNKKV_MODE=mode):
        backend = harness.backend("chunkkv")
    harness.add_requests([prompt] * batch)
    with (
        mock.patch.object(TritonAttnBackend, "init_forward_metadata", lambda self, batch: None),
        mock.patch.object(TritonAttnBackend, "forward_extend", write_kv_only),
    ):
        harness.extend(backend, [prompt] * batch)
    return backend, harness.decode_batch()


def median_us(call, steps: int) -> float:
    call()  # the first call may select (the backend before prefill-time selection did)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    from sglang.srt.runtime_context import get_context, get_parallel

    get_context().override_server_args(disable_radix_cache=True).install()
    get_parallel().override_permanently(tp_rank=0, attn_tp_rank=0, attn_dcp_rank=0)
    os.environ["CHUNKKV_RATIO"] = "0.2"
    torch.set_num_threads(1)
    print(f"batch {args.batch}, {args.layers} layers, prompt {args.prompt}, 1 torch thread")
    for mode in ("sparse", "dynamic"):
        backend, batch = build(args.batch, args.layers, args.prompt, mode)
        eager = median_us(partial(backend._prepare_decode, batch), args.steps)
        print(f"{mode}: eager decode metadata (_prepare_decode): {eager:.1f} us per step")
        backend.init_cuda_graph_state(args.batch, args.batch)
        graph = median_us(partial(backend.init_forward_metadata_out_graph, batch), args.steps)
        print(
            f"{mode}: CUDA-graph replay fill (init_forward_metadata_out_graph): "
            f"{graph:.1f} us per step"
        )


if __name__ == "__main__":
    main()

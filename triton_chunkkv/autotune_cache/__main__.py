"""``python -m triton_chunkkv.autotune_cache``: tune every kernel on this GPU, commit the configs.

Runs each op (window scores, chunk sums, selection, gather, sparse decode) over the shapes that
matter, so that every :class:`~triton_chunkkv.ops._runtime.TunedKernel` autotunes its key
buckets, then merges the winners into ``triton_chunkkv/autotune_cache/<gpu>.json``. Keys already
in that file are launched from it and not re-tuned unless ``--retune`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch

from triton_chunkkv import ops
from triton_chunkkv.ops import _runtime

# (query heads, key/value heads, head dim) of the models the configs are tuned for.
MODELS = {"llama3-8b": (32, 8, 128), "qwen2-7b": (28, 4, 128)}
SEQ_LENS = (4096, 8192, 16384, 32768, 65536, 131072)
BATCHES = (1, 8, 32)
DTYPES = ("bfloat16", "float16")
# Kept fractions of the prompt: each gives the gather a different output-length bucket.
KEPT_RATIOS = (0.1, 0.2, 0.3)
CHUNK_SIZE = 10
WINDOW = 32


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m triton_chunkkv.autotune_cache",
        description="Tune every kernel on this GPU and merge "
        "the configs into autotune_cache/<gpu>.json.",
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--seq-lens", nargs="+", type=int, default=list(SEQ_LENS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument(
        "--retune",
        action="store_true",
        help="tune keys the committed file already has, and replace them",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON file to merge into (default: autotune_cache/<gpu>.json)",
    )
    return parser.parse_args(argv)


def run_ops(model, batch, seq_len, dtype) -> None:
    """One prefill compression at each kept ratio, then one decode step over what it kept."""
    num_q_heads, num_kv_heads, head_dim = MODELS[model]
    device = torch.device("cuda")
    q_obs = torch.randn(batch, num_q_heads, WINDOW, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, num_kv_heads, seq_len, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    q = torch.randn(batch, num_q_heads, head_dim, device=device, dtype=dtype)
    seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device=device)
    tail_start = ops.reference.tail_start(seq_len, CHUNK_SIZE, WINDOW)

    scores = ops.window_scores(q_obs, k)
    chunk_scores = ops.chunk_sum(scores, CHUNK_SIZE, WINDOW)
    for ratio in KEPT_RATIOS:
        budget = ops.reference.resolve_budget(seq_len, ratio=ratio)
        n_keep = ops.reference.num_kept_chunks(seq_len, budget, CHUNK_SIZE, WINDOW)
        chunk_idx = ops.select_chunks(chunk_scores, n_keep)
        ops.gather_chunks(k, v, chunk_idx, CHUNK_SIZE, tail_start)
        ops.sparse_decode(q, k, v, chunk_idx, CHUNK_SIZE, tail_start, seq_lens)
    torch.cuda.synchronize()


def merge_configs(committed: dict, tuned: dict) -> dict:
    """``committed`` updated with ``tuned`` (both ``{kernel: {key string: config}}``), sorted."""
    merged = {name: dict(configs) for name, configs in committed.items()}
    for name, configs in tuned.items():
        merged.setdefault(name, {}).update(configs)
    return {name: dict(sorted(configs.items())) for name, configs in sorted(merged.items())}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() or _runtime.interpreting():
        print(
            "python -m triton_chunkkv.autotune_cache needs a CUDA GPU (and TRITON_INTERPRET "
            "unset): it tunes the kernels on the GPU whose configs it writes.",
            file=sys.stderr,
        )
        return 2
    output = args.output or _runtime.CACHE_DIR / f"{_runtime.gpu_name()}.json"
    print(f"tuning on {torch.cuda.get_device_name()} -> {output}")

    # Without --retune, keys in the committed file launch from it, so they are kept as they are.
    ignore_committed = (
        mock.patch.object(_runtime, "committed_configs", lambda name: {})
        if args.retune
        else contextlib.nullcontext()
    )
    torch.manual_seed(0)
    with ignore_committed:
        for model in args.models:
            for dtype in args.dtypes:
                for seq_len in args.seq_lens:
                    for batch in args.batches:
                        shape = f"{model} {dtype} T={seq_len} B={batch}"
                        start = time.perf_counter()
                        try:
                            run_ops(model, batch, seq_len, getattr(torch, dtype))
                        except torch.cuda.OutOfMemoryError:
                            print(f"{shape}: out of memory, skipped")
                            continue
                        finally:
                            torch.cuda.empty_cache()
                        print(f"{shape}: {time.perf_counter() - start:.1f} s")

    write_tuned_configs(output)
    return 0


def write_tuned_configs(output) -> int:
    """Merge the configs every kernel tuned in this process into ``output``; their count."""
    output = Path(output)
    tuned = {name: kernel.tuned_configs() for name, kernel in _runtime.TUNED_KERNELS.items()}
    committed = json.loads(output.read_text()) if output.exists() else {}
    output.write_text(json.dumps(merge_configs(committed, tuned), indent=1) + "\n")
    count = sum(map(len, tuned.values()))
    print(f"wrote {count} tuned configs into {output}")
    return count


if __name__ == "__main__":
    sys.exit(main())

"""End to end: HF ``generate`` with FullKV, ChunkKV evict and ChunkKV sparse decode.

    python -m benchmarks.e2e --preset gpu --out e2e.json [--time-budget 420]

The model is built from a Llama config with random weights (nothing is downloaded): the
``gpu`` preset is Llama-3-8B-shaped in bfloat16. For each prompt length and batch size it runs
FullKV, then ``triton_chunkkv.integrations.hf.chunkkv(model, ratio=..., mode=...)`` in
``evict`` and ``sparse`` mode with and without layer-wise index reuse, and records:

* ``prefill_ms``: ``generate`` start to the first token's logits (a logits processor
  synchronizes and reads the clock at every step);
* ``compress_ms``: the adapter's own synchronized timing of selection and compaction, all
  layers (``ChunkKVState.compress_seconds``); it runs inside the prefill;
* ``decode_ms_per_step`` and ``decode_tokens_per_s`` (``B`` tokens per step), over the steps
  after the first;
* ``peak_memory_bytes`` (CUDA only) and ``kv_bytes``: the cache's key and value tensors after
  ``generate`` (sparse decode keeps the whole cache resident; evict keeps the compacted one),
  ``kv_fraction``: ``kv_bytes`` over FullKV's, and ``kept_fraction``: the prompt rows decode
  attends to, over the prompt length (both modes; from ``ChunkKVState.kept_lengths``).

Each value is the median of ``repeats`` runs after a short warm-up run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from .common import (
    ResultsWriter,
    argv_or_sys,
    error_note,
    free_memory,
    is_out_of_memory,
    pick_device,
    row_id,
    run_meta,
    sweep_arguments,
    synchronize,
)
from .shapes import CHUNK_SIZE, E2E_PRESETS, WINDOW, E2EPreset


def build_model(preset: E2EPreset, device: torch.device):
    """A Llama with random weights, created directly on ``device`` in the preset's dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**preset.config, attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, preset.dtype))
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def configurations(preset: E2EPreset) -> list[tuple[str, int | None]]:
    """``(mode, reuse_layers)``: FullKV first, as the other rows are measured against it."""
    return [("full", None)] + [
        (mode, reuse) for mode in ("evict", "sparse") for reuse in preset.reuse
    ]


def compression(model, mode: str, reuse: int | None, ratio: float):
    if mode == "full":
        return contextlib.nullcontext()
    from triton_chunkkv.integrations.hf import chunkkv

    return chunkkv(
        model, ratio=ratio, chunk_size=CHUNK_SIZE, window=WINDOW, reuse_layers=reuse, mode=mode
    )


def cache_bytes(cache) -> int:
    """Bytes of the key and value tensors a transformers cache holds."""
    if hasattr(cache, "layers"):
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    else:  # transformers before the per-layer cache objects
        tensors = [*cache.key_cache, *cache.value_cache]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def generate_once(model, input_ids, new_tokens: int, device: torch.device, state=None) -> dict:
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        """Reads the clock when each step's logits are ready."""

        def __init__(self):
            self.times = []

        def __call__(self, ids, scores):
            synchronize(device)
            self.times.append(time.perf_counter())
            return scores

    clock = StepClock()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        logits_processor=LogitsProcessorList([clock]),
        return_dict_in_generate=True,
    )
    steps = len(clock.times) - 1
    result = {
        "prefill_ms": (clock.times[0] - start) * 1e3,
        "decode_ms_per_step": (clock.times[-1] - clock.times[0]) * 1e3 / steps,
        "peak_memory_bytes": (
            torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        ),
        "kv_bytes": cache_bytes(out.past_key_values),
    }
    if state is not None:  # a ChunkKV run: what the adapter measured and kept
        kept = [k / t for layer in state.kept_lengths for k, t in zip(layer, state.prompt_lengths)]
        result["compress_ms"] = state.compress_seconds * 1e3
        result["kept_fraction"] = sum(kept) / len(kept)
    return result


def run(preset: E2EPreset, device: torch.device, out, time_budget=None, argv=()) -> dict:
    meta = run_meta(
        device,
        "benchmarks.e2e",
        argv,
        "time.perf_counter around HF generate, device synchronized at every step",
        suite="e2e",
        preset=preset.name,
        model=preset.model,
        ops_path="triton" if device.type == "cuda" else "torch-reference",
        model_config=preset.config,
        new_tokens=preset.new_tokens,
        repeats=preset.repeats,
    )
    import transformers

    meta["transformers"] = transformers.__version__
    writer = ResultsWriter(out, meta)
    print(f"# {meta['device']} | {meta['date']} | commit {meta['commit']} | {meta['command']}")
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(preset, device)
    vocab = preset.config["vocab_size"]
    print(f"# model {preset.model} built in {time.perf_counter() - start:.1f} s", flush=True)
    warm_ids = torch.randint(vocab, (1, preset.warmup_prompt), device=device)
    for seq_len in preset.prompt_lens:
        for batch in preset.batches:
            input_ids = torch.randint(vocab, (batch, seq_len), device=device)
            full = None
            for mode, reuse in configurations(preset):
                impl = "hf-full" if mode == "full" else f"chunkkv-{mode}"
                row = {
                    "id": row_id(
                        suite="e2e",
                        impl=impl,
                        model=preset.model,
                        B=batch,
                        T=seq_len,
                        dtype=preset.dtype,
                        kept=None if mode == "full" else preset.ratio,
                        reuse=reuse,
                    ),
                    "suite": "e2e",
                    "impl": impl,
                    "mode": mode,
                    "model": preset.model,
                    "B": batch,
                    "T": seq_len,
                    "dtype": preset.dtype,
                    "kept": None if mode == "full" else preset.ratio,
                    "reuse": reuse,
                    "new_tokens": preset.new_tokens,
                }
                if time_budget is not None and time.perf_counter() - start > time_budget:
                    row.update(status="skipped", note=f"time budget of {time_budget:.0f} s spent")
                else:
                    try:
                        row.update(measure(model, input_ids, warm_ids, mode, reuse, preset, device))
                    except Exception as error:  # noqa: BLE001 - one failure must not end the run
                        row.update(
                            status="oom" if is_out_of_memory(error) else "error",
                            note=error_note(error),
                        )
                    free_memory(device)
                if mode == "full":
                    full = row if row["status"] == "ok" else None
                elif row["status"] == "ok" and full is not None:
                    row["kv_fraction"] = row["kv_bytes"] / full["kv_bytes"]
                    row["decode_speedup"] = full["decode_ms_per_step"] / row["decode_ms_per_step"]
                print(format_row(writer.add(row)), flush=True)
    writer.finish(device, start)
    return writer.data


def measure(model, input_ids, warm_ids, mode, reuse, preset: E2EPreset, device) -> dict:
    runs = []
    with torch.inference_mode(), compression(model, mode, reuse, preset.ratio) as state:
        generate_once(model, warm_ids, 2, device)
        for _ in range(preset.repeats):
            runs.append(generate_once(model, input_ids, preset.new_tokens, device, state))
    medians = ("prefill_ms", "decode_ms_per_step") + (("compress_ms",) if state else ())
    result = {key: statistics.median(run[key] for run in runs) for key in medians}
    result["decode_tokens_per_s"] = input_ids.shape[0] * 1e3 / result["decode_ms_per_step"]
    result["peak_memory_bytes"] = runs[-1]["peak_memory_bytes"]
    result["kv_bytes"] = runs[-1]["kv_bytes"]
    if state is not None:
        result["kept_fraction"] = runs[-1]["kept_fraction"]
    result["prefill_ms_runs"] = [run["prefill_ms"] for run in runs]
    result["decode_ms_per_step_runs"] = [run["decode_ms_per_step"] for run in runs]
    return {"status": "ok", **result}


def format_row(row: dict) -> str:
    head = f"{row['impl']:<16}N{row['reuse'] or '-':<3}B{row['B']:<3}T{row['T']:<7}"
    if row["status"] != "ok":
        return f"{head}{row['status']}: {row.get('note', '')}"
    text = (
        f"{head}prefill {row['prefill_ms']:9.1f} ms  decode {row['decode_ms_per_step']:8.2f}"
        f" ms/step {row['decode_tokens_per_s']:8.1f} tok/s  KV {row['kv_bytes'] / 2**20:8.1f}"
        " MiB"
    )
    if "compress_ms" in row:
        text += f"  compress {row['compress_ms']:7.1f} ms  kept {row['kept_fraction']:6.1%}"
    if "kv_fraction" in row:
        text += f"  KV {row['kv_fraction']:6.1%}  decode x{row['decode_speedup']:.2f}"
    if row["peak_memory_bytes"] is not None:
        text += f"  peak {row['peak_memory_bytes'] / 2**30:.1f} GiB"
    return text


def main(argv=None) -> None:
    argv = argv_or_sys(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sweep_arguments(parser, E2E_PRESETS, "model and shapes")
    args = parser.parse_args(argv)
    device = pick_device(args.device, args.cpu_threads)
    preset = E2E_PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]
    run(preset, device, args.out, args.time_budget, argv)


if __name__ == "__main__":
    main()

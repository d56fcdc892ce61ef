"""``triton-chunkkv demo``: answer one long prompt with the full KV cache and with ChunkKV.

The default prompt is ~1K tokens of filler with a pass key hidden inside. The report gives both
answers, the KV-cache bytes after prefill, the prefill / compress / decode times and the device.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from . import arguments
from .arguments import UsageError
from .cache import MODES
from .models import max_positions


@dataclass
class Run:
    answer: str
    kv_bytes: int  # the cache right after prefill (and compression)
    prefill_s: float  # the forward pass over the prompt, compression excluded
    compress_s: float | None
    decode_s: float
    new_tokens: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option is checked here or in :func:`check_arguments`, before the model loads."""
    parser.add_argument(
        "--model",
        metavar="PATH",
        type=arguments.model_folder,
        help="a Hugging Face model folder (default: the embedded "
        "SmolLM2-135M-Instruct, converted once into ~/.cache/triton_chunkkv)",
    )
    parser.add_argument(
        "--ratio",
        type=arguments.number_in(0, 1, include_low=False),
        default=0.2,
        help="fraction of the prompt's KV cache to keep, in (0, 1] (default: 0.2)",
    )
    parser.add_argument(
        "--chunk-size",
        type=arguments.int_at_least(1),
        default=10,
        help="ChunkKV chunk size (default: 10)",
    )
    parser.add_argument(
        "--window",
        type=arguments.int_at_least(1),
        default=32,
        help="observation window: the last prompt queries, which score the chunks (default: 32)",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="evict",
        help="evict: keep only the selected KV; sparse: keep all, decode over the "
        "selection; dynamic: keep all, every decode step reads the chunks its own query "
        "scores highest (default: evict)",
    )
    parser.add_argument(
        "--prompt-file",
        metavar="FILE",
        type=arguments.existing_file,
        help="use this text (document and question) as the user message instead "
        "of the generated pass-key prompt",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=arguments.int_at_least(1),
        default=1000,
        help="length of the generated pass-key prompt: at most this many tokens, short of it "
        "by less than one filler sentence (at most 19 tokens with the default model); at least "
        "the prompt without filler (94 tokens with the default model) (default: 1000)",
    )
    parser.add_argument(
        "--depth",
        type=arguments.number_in(0, 1, include_low=True),
        default=0.5,
        help="where the pass key sits in the prompt, 0 to 1 (default: 0.5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="pass-key prompt seed (default: 0)")
    parser.add_argument(
        "--max-new-tokens",
        type=arguments.int_at_least(1),
        default=16,
        help="answer length limit (default: 16)",
    )
    parser.add_argument(
        "--device",
        type=arguments.device,
        default="auto",
        help="cpu, cuda, cuda:1, ... (default: cuda when available)",
    )


def check_arguments(args) -> str | None:
    """What the options allow to check before loading the model: the prompt file's text (which
    it returns, ``None`` without ``--prompt-file``), and a generated prompt's length against the
    model's positions and the window."""
    if args.prompt_file is not None:
        try:
            return args.prompt_file.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"--prompt-file {args.prompt_file}: {error}") from None
    if args.window > args.prompt_tokens:
        raise UsageError(
            f"--window {args.window} is longer than the prompt (--prompt-tokens "
            f"{args.prompt_tokens})"
        )
    arguments.check_fits(
        "--prompt-tokens", args.prompt_tokens, args.max_new_tokens, max_positions(args.model)
    )
    return None


def check_prompt(args, input_ids, model) -> None:
    """The tokenized prompt, before any forward pass: it fits the model's positions with the
    answer, and holds the window."""
    length = input_ids.shape[1]
    limit = getattr(model.config, "max_position_embeddings", None)
    source = "--prompt-tokens" if args.prompt_file is None else f"--prompt-file {args.prompt_file}"
    arguments.check_fits(source, length, args.max_new_tokens, limit)
    if args.window > length:
        raise UsageError(f"--window {args.window} is longer than the {length}-token prompt")


def kv_bytes(cache) -> int:
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (layer.keys, layer.values)
        if t is not None
    )


def greedy_answer(model, tokenizer, input_ids, max_new_tokens, state=None) -> Run:
    """A plain greedy loop of forward calls, timed: prefill (with compression when inside
    ``chunkkv``), then one token at a time."""
    from transformers import DynamicCache

    from .integrations.hf import cache_kwargs

    sync = torch.cuda.synchronize if input_ids.is_cuda else (lambda: None)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        logits = model(input_ids, **cache_kwargs(model, cache), use_cache=True).logits[:, -1]
        sync()
        prefill_s = time.perf_counter() - start
        stored = kv_bytes(cache)
        tokens = []
        start = time.perf_counter()
        for _ in range(max_new_tokens):
            token = logits.argmax(dim=-1, keepdim=True)
            if token.item() == tokenizer.eos_token_id:
                break
            tokens.append(token.item())
            logits = model(token, **cache_kwargs(model, cache), use_cache=True).logits[:, -1]
        sync()
        decode_s = time.perf_counter() - start
    answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    compress_s = state.compress_seconds if state is not None else None
    return Run(answer, stored, prefill_s - (compress_s or 0.0), compress_s, decode_s, len(tokens))


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def run(args) -> int:
    # Imported here so that ``--help`` does not wait for transformers.
    from .integrations.hf import chunkkv
    from .models import load_default_model, passkey_prompt, passkey_prompt_min_tokens
    from .ops._runtime import use_triton

    content = check_arguments(args)
    device = torch.device(
        args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    # bf16 on a GPU, fp32 on CPU (where half precision matmuls are slow)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        model, tokenizer = load_default_model(args.model, device=device, dtype=dtype)
    except FileNotFoundError as error:  # the embedded model's package is not installed
        raise UsageError(str(error)) from None

    if content is not None:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        described, passkey = f"{args.prompt_file}", None
    else:
        minimum = passkey_prompt_min_tokens(tokenizer, args.seed)
        if args.prompt_tokens < minimum:
            raise UsageError(
                f"--prompt-tokens must be >= {minimum} (the pass-key prompt without filler, "
                f"for this model's tokenizer), got {args.prompt_tokens}"
            )
        prompt = passkey_prompt(
            tokenizer, num_tokens=args.prompt_tokens, depth=args.depth, seed=args.seed
        )
        text, passkey = prompt.text, prompt.passkey
        described = f"pass key {passkey} hidden at {args.depth:.0%} depth"
    input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    check_prompt(args, input_ids, model)
    input_ids = input_ids.to(device)

    full = greedy_answer(model, tokenizer, input_ids, args.max_new_tokens)
    with chunkkv(
        model, ratio=args.ratio, chunk_size=args.chunk_size, window=args.window, mode=args.mode
    ) as state:
        compressed = greedy_answer(model, tokenizer, input_ids, args.max_new_tokens, state)
    state.require_prefill()

    config = model.config
    kernels = "Triton kernels" if use_triton(input_ids) else "torch reference ops"
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"device   {device}{gpu}, {str(dtype).removeprefix('torch.')}, {kernels}")
    print(
        f"model    {config.name_or_path if args.model else 'SmolLM2-135M-Instruct'}: "
        f"{config.num_hidden_layers} layers, {config.num_key_value_heads} KV heads"
    )
    print(f"prompt   {input_ids.shape[1]} tokens, {described}")
    kept = sum(sum(rows) for rows in state.kept_lengths) / len(state.kept_lengths)
    label = f"ChunkKV {args.ratio:.0%} ({args.mode})"
    print()
    print(f"{'':<22}{'KV cache':>12}{'prefill':>10}{'compress':>10}{'decode':>18}  answer")
    for name, r in (("full KV", full), (label, compressed)):
        compress = f"{r.compress_s:.3f} s" if r.compress_s is not None else "-"
        decode = f"{r.decode_s:.2f} s/{r.new_tokens} tok"
        print(
            f"{name:<22}{mib(r.kv_bytes):>12}{r.prefill_s:>8.2f} s{compress:>10}{decode:>18}"
            f"  {r.answer!r}"
        )
    print()
    print(
        f"ChunkKV kept {kept:.0f} of {input_ids.shape[1]} tokens per KV head "
        f"(chunk size {args.chunk_size}, window {args.window}); KV bytes "
        f"{compressed.kv_bytes / full.kv_bytes:.0%} of full"
        + (" (sparse mode keeps the whole cache)" if args.mode == "sparse" else "")
    )
    if passkey is not None:
        found = [
            name for name, r in (("full KV", full), ("ChunkKV", compressed)) if passkey in r.answer
        ]
        print(f"pass key {passkey} found by: {', '.join(found) or 'neither'}")
    return 0

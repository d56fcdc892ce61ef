"""The evaluation: task generators, scoring, the shared-prefill engine (against the HF adapter)
and the whole CLI pipeline on a tiny random model (the real-model run is a documented command,
not a test; see docs/EVAL.md)."""

import argparse
import json
import re
from dataclasses import replace

import pytest
import torch

from triton_chunkkv.eval import cli, engine
from triton_chunkkv.eval.loading import byte_tokenizer, tiny_random_model
from triton_chunkkv.eval.metrics import adjacent_jaccard, is_correct, layer_fidelity
from triton_chunkkv.eval.runner import Method, generate_with_adapter, parse_method, stop_token_ids
from triton_chunkkv.eval.tasks import TASKS, build_examples, prompt_ids, render_prompt, segment_ids
from triton_chunkkv.integrations.hf import chunkkv
from triton_chunkkv.policies import ChunkKV, Selection

WINDOW, CHUNK = 8, 4


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_model(seed=0, num_layers=2)


# ---------------------------------------------------------------------------------------------
# Tasks and scoring
# ---------------------------------------------------------------------------------------------


def test_examples_are_deterministic_per_seed(tokenizer):
    options = dict(lengths=[300, 600], depths=[0.0, 0.5, 1.0], per_cell=2)
    first = build_examples(tokenizer, TASKS, seed=3, **options)
    assert first == build_examples(tokenizer, TASKS, seed=3, **options)
    other = build_examples(tokenizer, TASKS, seed=4, **options)
    assert [e.example_id for e in first] == [e.example_id for e in other]
    assert all(a.context != b.context for a, b in zip(first, other))
    # per_cell per length for the five generated tasks (pass keys cycling through the depths),
    # per_cell in all for arithmetic
    assert len({e.example_id for e in first}) == len(first) == 2 * 2 * 5 + 2
    passkeys = [e for e in first if e.task == "passkey"]
    assert [e.depth for e in passkeys] == [0.0, 0.5] * 2


def test_the_answer_is_in_the_prompt(tokenizer):
    for example in build_examples(
        tokenizer, TASKS, lengths=[400], depths=[0.0, 0.5, 1.0], per_cell=3, seed=0
    ):
        prompt = render_prompt(example, tokenizer)
        if example.task == "arithmetic":  # the answer follows from the question's numbers
            a, b, c = [int(n) for n in re.findall(r"\d+", example.question)]
            assert int(example.answer) in (a * b - c, a * b + c)
        else:
            assert example.answer in example.context and example.answer in prompt
        assert prompt.endswith(example.answer_prefix)


@pytest.mark.parametrize("length", [600, 1200])
def test_prompts_come_close_to_the_requested_length(tokenizer, length):
    for example in build_examples(
        tokenizer,
        ["passkey", "multikey", "vartrack", "fewshot"],
        lengths=[length],
        depths=[0.5],
        per_cell=2,
        seed=0,
    ):
        # Off by at most one filler sentence (under 100 bytes).
        assert abs(len(prompt_ids(example, tokenizer)) - length) < 100


def test_needle_depth_places_the_fact(tokenizer):
    start, end = build_examples(
        tokenizer, ["passkey"], lengths=[800], depths=[0.0, 1.0], per_cell=2, seed=0
    )
    assert start.context.index(start.answer) < len(start.context) * 0.2
    assert end.context.index(end.answer) > len(end.context) * 0.8


@pytest.mark.parametrize(
    "scoring,text,correct",
    [
        ("first_number", " 12345.", True),
        ("first_number", " 1234 12345", False),
        ("first_number", " the key", False),
        ("candidate", " teacher who lives in Oslo.", True),
        ("candidate", " teacher in Lima, not Oslo", False),
        ("candidate", " lives in oslo", True),
        ("answer_is", " 3 * 4 = 12. The answer is 12345.", True),
    ],
)
def test_scoring(tokenizer, scoring, text, correct):
    example = build_examples(
        tokenizer, ["passkey"], lengths=[200], depths=[0.5], per_cell=1, seed=0
    )[0]
    answer = "Oslo" if scoring == "candidate" else "12345"
    example = replace(example, scoring=scoring, answer=answer, candidates=("Oslo", "Lima"))
    assert is_correct(example, text) is correct


def test_methods_parse_options():
    assert parse_method("chunkkv:window=16,sink_tokens=4,layer_budgets=pyramid") == Method(
        "chunkkv", (("window", 16), ("sink_tokens", 4), ("layer_budgets", "pyramid"))
    )
    assert parse_method("snapkv:pool_kernel=1").label == "snapkv:pool_kernel=1"
    with pytest.raises(ValueError, match="policy must be one of"):
        parse_method("quest")
    with pytest.raises(ValueError, match="key=value"):
        parse_method("chunkkv:window")


# ---------------------------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------------------------


def passkey_ids(tokenizer, length=160):
    example = build_examples(
        tokenizer, ["passkey"], lengths=[length], depths=[0.5], per_cell=1, seed=0
    )[0]
    return torch.tensor([prompt_ids(example, tokenizer, chat=False)])


POLICY_SPECS = [
    f"chunkkv:chunk_size={CHUNK},window={WINDOW}",
    f"snapkv:window={WINDOW}",
    f"pyramidkv:window={WINDOW}",
    "streamingllm",
    f"chunkkv_phrase:window={WINDOW}",
    f"chunkkv:chunk_size={CHUNK},window={WINDOW},sink_tokens=4,layer_budgets=pyramid",
]


@pytest.mark.parametrize("spec", POLICY_SPECS)
def test_engine_decodes_what_the_hf_adapter_generates(tiny, spec, one_thread):
    model, tokenizer = tiny
    input_ids = passkey_ids(tokenizer)
    method = parse_method(spec)
    budget = input_ids.shape[1] // 4
    stop_ids = stop_token_ids(model, tokenizer)
    with chunkkv(model, budget=budget, policy=method.policy(tokenizer)) as state, torch.no_grad():
        state.policy.on_prompt(input_ids)
        expected = model.generate(
            input_ids,
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=sorted(stop_ids),
            pad_token_id=0,
        )
    pre = engine.prefill(model, input_ids)
    selections = engine.select_layers(pre, method.policy(tokenizer), [budget])[0]
    for ours, theirs in zip(selections, state.selections, strict=True):
        assert torch.equal(ours.chunk_idx, theirs.chunk_idx)
        assert ours.tail_start == theirs.tail_start
    full = engine.compact(pre, [None] * pre.num_layers)
    tokens = engine.greedy_decode(model, pre, [full, engine.compact(pre, selections)], 6, stop_ids)
    assert tokens[1] == expected[0, input_ids.shape[1] :].tolist()


@pytest.mark.parametrize("spec", POLICY_SPECS[:2] + ["fullkv"])
def test_question_agnostic_engine_decodes_what_the_adapter_generates(tiny, spec, one_thread):
    """The context alone is prefilled and compressed, then the question is read: the engine's
    tokens equal the HF adapter's (context call, then generate over the question)."""
    model, tokenizer = tiny
    example = build_examples(
        tokenizer, ["passkey"], lengths=[160], depths=[0.5], per_cell=1, seed=0
    )[0]
    context, question = segment_ids(example, tokenizer, chat=False)
    input_ids = torch.tensor([context])
    method = parse_method(spec)
    budget = len(context) // 4
    stop_ids = stop_token_ids(model, tokenizer)
    pre = engine.prefill(model, input_ids)
    full = engine.compact(pre, [None] * pre.num_layers)
    if method.name == "fullkv":
        with torch.no_grad():
            out = model.generate(
                torch.tensor([context + question]),
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=0,
            )
        expected = out[0, len(context) + len(question) :].tolist()
        assert engine.greedy_decode(model, pre, [full], 6, question=question)[0] == expected
        return
    selections, _, expected = generate_with_adapter(
        model, input_ids, method.policy(tokenizer), budget, 6, stop_ids, question=question
    )
    ours = engine.select_layers(pre, method.policy(tokenizer), [budget])[0]
    assert [s.chunk_idx.tolist() for s in ours] == [s.chunk_idx.tolist() for s in selections]
    caches = [full, engine.compact(pre, ours)]
    assert engine.greedy_decode(model, pre, caches, 6, stop_ids, question)[1] == expected


def test_engine_reuses_indices_as_the_adapter_does(tiny, one_thread):
    model, tokenizer = tiny
    input_ids = passkey_ids(tokenizer)
    policy = ChunkKV(chunk_size=CHUNK, window=WINDOW)
    with chunkkv(model, budget=40, policy=policy, reuse_layers=2) as state, torch.no_grad():
        model.generate(input_ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
    pre = engine.prefill(model, input_ids)
    ours = engine.select_layers(pre, policy, [40], reuse_layers=2)[0]
    assert ours[1] is ours[0]
    assert [s.chunk_idx.tolist() for s in ours] == [s.chunk_idx.tolist() for s in state.selections]


def test_batched_decode_equals_one_at_a_time(tiny, one_thread):
    model, tokenizer = tiny
    pre = engine.prefill(model, passkey_ids(tokenizer))
    caches = [
        engine.compact(pre, selections)
        for c in (CHUNK, 1)
        for selections in engine.select_layers(pre, ChunkKV(chunk_size=c, window=WINDOW), [40, 80])
    ]
    together = engine.greedy_decode(model, pre, caches, 8)
    assert together == [engine.greedy_decode(model, pre, [cache], 8)[0] for cache in caches]
    stop = together[0][2]
    assert engine.greedy_decode(model, pre, caches[:1], 8, {stop})[0] == together[0][:3]


def test_fidelity_of_the_full_cache_is_perfect(tiny, one_thread):
    model, tokenizer = tiny
    pre = engine.prefill(model, passkey_ids(tokenizer))
    full = engine.compact(pre, [None] * pre.num_layers)
    selections = engine.select_layers(pre, ChunkKV(chunk_size=CHUNK, window=WINDOW), [40])[0]
    continuation = engine.greedy_decode(model, pre, [full], 5)[0]
    full_trace, same, compressed = engine.trace(
        model, pre, [full, full, engine.compact(pre, selections)], continuation
    )
    perfect = layer_fidelity(full_trace, same, [None] * pre.num_layers, pre.seq_len)
    assert max(perfect["attn_output_l1"] + perfect["kv_l1"]) < 1e-5
    assert min(perfect["attn_cosine"]) > 1 - 1e-5
    lossy = layer_fidelity(full_trace, compressed, selections, pre.seq_len)
    assert lossy["kv_l1"][0] < 1e-5  # the first layer's keys see no compressed attention yet
    assert max(lossy["attn_output_l1"]) > 1e-4 and max(lossy["attn_cosine"]) < 1
    for probs in compressed.probs:
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))


def test_adjacent_jaccard():
    idx = torch.tensor([[[0, 1], [2, 3]]], dtype=torch.int32)
    same = Selection(idx, 2, 10)
    shifted = Selection(idx + 1, 2, 10)  # tokens {2, 3}: half of {0..3} in head 0
    assert adjacent_jaccard([same, same, shifted, None], 12) == [
        1.0,
        pytest.approx((1 / 3 + 1 / 3) / 2),
        None,
    ]


# ---------------------------------------------------------------------------------------------
# The whole pipeline
# ---------------------------------------------------------------------------------------------


def cli_args(out, *extra):
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    return parser.parse_args(
        [
            "eval",
            "--out",
            str(out),
            "--model",
            "tiny-random",
            "--tasks",
            "passkey",
            "multidoc",
            "--lengths",
            "200",
            "--depths",
            "0",
            "1",
            "--per-cell",
            "1",
            "--ratios",
            "0.2",
            "0.3",
            "--methods",
            "fullkv",
            "streamingllm",
            "h2o:recent=8",
            "snapkv:window=8",
            "pyramidkv:window=8",
            "chunkkv:window=8,chunk_size=4",
            "chunkkv_phrase:window=8",
            "--no-progress",
            *extra,
        ]
    )


def test_tiny_model_runs_the_whole_pipeline(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels have their own tests
    out = tmp_path / "run"
    assert cli.run(cli_args(out)) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 * (1 + 6 * 2)  # 2 prompts x (fullkv + 6 methods x 2 ratios)
    for record in records:
        T, budget, kept = record["prompt_tokens"], record["budget"], record["kept_tokens"]
        method = record["method"].partition(":")[0]
        if method == "fullkv":
            assert record["ratio"] is None and kept == [T] * 4
            continue
        assert budget == int(record["ratio"] * T)
        if method == "chunkkv":
            assert all(budget - 4 < n <= budget for n in kept)
        elif method == "pyramidkv":
            assert sum(kept) == 4 * budget and kept[0] > kept[-1]
        else:
            assert kept == [budget] * 4
        assert len(record["attn_cosine"]) == 4 and len(record["adjacent_jaccard"]) == 3
    report = (out / "report.md").read_text()
    assert "| `chunkkv:window=8,chunk_size=4` |" in report and "## Fidelity" in report
    assert {p.name for p in out.glob("*.png")} >= {
        "accuracy_vs_budget.png",
        "passkey_heatmap_20.png",
        "fidelity_layers_30.png",
    }

    # Resuming adds nothing; another seed in the same folder is refused.
    cli.run(cli_args(out))
    assert len((out / "results.jsonl").read_text().splitlines()) == len(records)
    with pytest.raises(ValueError, match="seed"):
        cli.run(cli_args(out, "--seed", "1"))


def test_both_settings_run_and_report_side_by_side(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "settings"
    args = cli_args(out, "--settings", "question-aware", "question-agnostic", "--no-fidelity")
    plain = f"chunkkv:window={WINDOW},chunk_size={CHUNK}"
    dynamic, question = plain + ",mode=dynamic", plain + ",mode=question"
    args.methods = ["fullkv", plain, dynamic, question]
    assert cli.run(args) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["setting"] for r in records} == {"question-aware", "question-agnostic"}
    assert len(records) == 2 * 2 * (1 + 3 * 2)  # settings x prompts x (fullkv + 3 x 2 ratios)
    by_key = {(r["example_id"], r["setting"], r["method"], r["ratio"]): r for r in records}
    for record in records:
        if record["method"] == dynamic:  # what a step reads: at most the budget per layer
            assert all(n <= record["budget"] for n in record["kept_tokens"])
        if record["method"] == question:  # selected on the whole prompt: budget from it
            assert record["budget"] == int(record["ratio"] * record["prompt_tokens"])
            if record["setting"] == "question-aware":  # the same as the plain policy
                key = (record["example_id"], record["setting"], plain, record["ratio"])
                assert record["prediction"] == by_key[key]["prediction"]
    report = (out / "report.md").read_text()
    assert "## Accuracy, question-aware" in report and "## Accuracy, question-agnostic" in report
    cli.run(args)  # resuming adds nothing
    assert len((out / "results.jsonl").read_text().splitlines()) == len(records)


def test_bootstrap_intervals_are_reproducible_and_paired():
    from triton_chunkkv.eval import stats

    correct = {f"p{i}": i % 4 != 0 for i in range(40)}  # 75 %
    low, high = stats.accuracy_interval(correct)
    assert low < 0.75 < high and stats.accuracy_interval(correct) == (low, high)
    full = {p: True for p in correct}
    ratio, (r_low, r_high) = stats.ratio_interval(correct, full)
    assert ratio == 0.75 and (r_low, r_high) == (low, high)  # paired: the same resamples
    diff, (d_low, d_high) = stats.difference_interval(full, correct)
    assert diff == 0.25 and d_low > 0  # the full cache is better on these prompts
    assert stats.accuracy_interval({}) is None


@pytest.mark.parametrize("spec", [POLICY_SPECS[0], POLICY_SPECS[4]])
def test_question_mode_engine_decodes_what_the_adapter_generates(tiny, spec, one_thread):
    """Question mode after a question: the engine's context prefill continued by the question
    (``engine.extend``) selects and decodes what the HF adapter does (context call, then
    generate over the question, which selects again)."""
    model, tokenizer = tiny
    example = build_examples(
        tokenizer, ["passkey"], lengths=[160], depths=[0.5], per_cell=1, seed=0
    )[0]
    context, question = segment_ids(example, tokenizer, chat=False)
    method = parse_method(spec + ",mode=question")
    budget = (len(context) + len(question)) // 4
    stop_ids = stop_token_ids(model, tokenizer)
    selections, _, expected = generate_with_adapter(
        model, torch.tensor([context]), method.policy(tokenizer), budget, 6, stop_ids,
        question=question, mode="question",
    )  # fmt: skip
    asked = engine.extend(model, engine.prefill(model, torch.tensor([context])), question)
    assert asked.seq_len == len(context) + len(question)
    ours = engine.select_layers(asked, method.policy(tokenizer), [budget])[0]
    assert [s.chunk_idx.tolist() for s in ours] == [s.chunk_idx.tolist() for s in selections]
    assert engine.greedy_decode(model, asked, [engine.compact(asked, ours)], 6, stop_ids)[0] == (
        expected
    )


@pytest.mark.parametrize("setting", ["question-aware", "question-agnostic"])
def test_engine_dynamic_mode_decodes_what_the_adapter_generates(tiny, setting, one_thread):
    """Dynamic mode in the batched engine (a read mask per row, head and step) gives the HF
    adapter's tokens (sparse_decode over each step's own chunks)."""
    model, tokenizer = tiny
    example = build_examples(
        tokenizer, ["passkey"], lengths=[200], depths=[0.5], per_cell=1, seed=0
    )[0]
    if setting == "question-aware":
        prompt, question = prompt_ids(example, tokenizer, chat=False), []
    else:
        prompt, question = segment_ids(example, tokenizer, chat=False)
    input_ids = torch.tensor([prompt])
    policy = ChunkKV(chunk_size=CHUNK, window=WINDOW)
    budget = len(prompt) // 5
    stop_ids = stop_token_ids(model, tokenizer)
    _, kept, expected = generate_with_adapter(
        model, input_ids, policy, budget, 6, stop_ids, question=question, mode="dynamic"
    )
    pre = engine.prefill(model, input_ids)
    full = engine.compact(pre, [None] * pre.num_layers)
    dynamic = engine.dynamic(pre, budget, CHUNK, WINDOW)
    compacted = engine.compact(pre, engine.select_layers(pre, policy, [budget])[0])
    tokens = engine.greedy_decode(model, pre, [full, compacted, dynamic], 6, stop_ids, question)
    assert tokens[2] == expected
    assert tokens[2] != tokens[0]  # it did read less than the whole cache
    assert all(n <= budget for n in kept)


def test_goal_is_met_only_at_the_goal_read():
    """The goal table's verdict: the accuracy share at the goal's budget, met only when a
    decode step there reads no more than the budget (dynamic mode's key bounds count)."""
    from triton_chunkkv.eval.report import goal_table

    def record(prompt, method, ratio, correct, kept, bounds=None):
        return dict(
            task="passkey", example_id=f"p{prompt}", method=method, ratio=ratio,
            setting="question-agnostic", correct=correct, prompt_tokens=100,
            kept_tokens=[kept, kept], bound_tokens=None if bounds is None else [bounds, bounds],
        )  # fmt: skip

    records = []
    for p in range(4):
        records += [
            record(p, "fullkv", None, True, 100),
            record(p, "snapkv", 0.1, False, 10),
            record(p, "question", 0.1, True, 10),
            record(p, "dynamic", 0.1, True, 10, bounds=20),
            record(p, "half", 0.1, p < 2, 10),
        ]
    methods = ["fullkv", "snapkv", "question", "dynamic", "half"]
    table = goal_table(records, methods, [0.1], ["passkey"], "question-agnostic")
    rows = {line.split(" | ")[0].strip("| `"): line for line in table.splitlines()[2:]}
    assert "| 10.0 % | 100 % [100, 100] met |" in rows["question"]
    assert "| 30.0 % | 100 % [100, 100] not met: reads 30.0 % |" in rows["dynamic"]
    assert "missed by 40" in rows["half"] and "snapkv" not in rows

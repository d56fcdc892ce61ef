"""The evaluation loop: examples x methods x budget ratios, one JSONL line per result.

``results.jsonl`` in the output folder is appended line by line and flushed, so an interrupted
run resumes where it stopped: a (example, method, ratio) already there is skipped. ``run.json``
holds what the results depend on (model, seed, chat, engine); resuming with different values
is refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import DynamicCache

from .. import cache as core
from ..ops import reference
from ..policies import POLICIES, Policy, kept_length, make_policy
from . import engine as eng
from .metrics import adjacent_jaccard, extracted_answer, layer_fidelity
from .tasks import SETTINGS, Example, prompt_ids, segment_ids

RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"
# Fields of run.json that results depend on: resuming requires the same values.
RESUME_FIELDS = ("model", "seed", "chat", "engine", "dtype")


@dataclass(frozen=True)
class Method:
    """A policy name with options, e.g. ``chunkkv:window=16,sink_tokens=4``. Two options are
    the adapters', not the policy's: ``reuse_layers=N`` (layer-wise index reuse) and ``mode``:
    ``dynamic`` (the chunks re-selected at every decode step, its budget is what a step reads)
    or ``question`` (in the question-agnostic setting, the chunks selected again once the
    question is read over the whole cache; in the question-aware one the same as evict)."""

    name: str
    options: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.options)

    @property
    def reuse_layers(self) -> int:
        return dict(self.options).get("reuse_layers", 1)

    @property
    def mode(self) -> str:
        return dict(self.options).get("mode", "evict")

    def policy(self, tokenizer) -> Policy:
        options = {k: v for k, v in self.options if k not in ADAPTER_OPTIONS}
        if "tokenizer" in getattr(POLICIES[self.name], "__dataclass_fields__", {}):
            options["tokenizer"] = tokenizer
        return make_policy(self.name, **options)


ADAPTER_OPTIONS = ("reuse_layers", "mode")


def parse_value(text: str):
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_method(spec: str) -> Method:
    """``name`` or ``name:key=value,key=value`` (values read as int, float, bool or str)."""
    name, _, rest = spec.partition(":")
    if name not in POLICIES:
        raise ValueError(f"method {spec!r}: policy must be one of {sorted(POLICIES)}")
    options = []
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"method {spec!r}: options are key=value, got {item!r}")
        options.append((key.strip(), parse_value(value.strip())))
    return Method(name, tuple(options))


def stop_token_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def result_key(example_id: str, method: str, ratio, setting="question-aware") -> tuple:
    return example_id, method, ratio, setting


def read_results(path: Path) -> list[dict]:
    """The records of a results file; a line cut short by an interruption is ignored."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def check_resume(out_dir: Path, run_info: dict) -> None:
    """Writes ``run.json``, or checks that the results already there come from the same run."""
    path = out_dir / RUN_FILE
    if path.exists():
        before = json.loads(path.read_text())
        changed = [f for f in RESUME_FIELDS if before.get(f) != run_info.get(f)]
        if changed:
            was = ", ".join(f"{f}={before.get(f)!r}" for f in changed)
            raise ValueError(
                f"{out_dir} holds results of another run ({was}): pass a new --out folder"
            )
        return
    path.write_text(json.dumps(run_info, indent=2) + "\n")


def generate_with_adapter(
    model,
    input_ids,
    policy,
    budget,
    max_new_tokens,
    stop_ids,
    reuse_layers=1,
    question=(),
    mode="evict",
):
    """``(selections, kept, tokens)`` of ``chunkkv(model, policy=...)`` + ``generate``: the
    per-layer selections and kept (dynamic: read) lengths, and the new tokens. With
    ``question``, the prompt ``input_ids`` is prefilled (and compressed) first and generation
    starts by reading the question, as ``integrations.pipeline`` does."""
    from ..integrations.hf import cache_kwargs, chunkkv

    options = dict(budget=budget, policy=policy, reuse_layers=reuse_layers, mode=mode)
    with chunkkv(model, **options) as state, torch.no_grad():
        cache = DynamicCache(config=model.config)
        if question:
            model(input_ids, **cache_kwargs(model, cache))
            input_ids = torch.cat([input_ids, torch.tensor([question]).to(input_ids)], dim=1)
        out = model.generate(
            input_ids,
            **cache_kwargs(model, cache),
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(stop_ids),
            pad_token_id=min(stop_ids),
        )
    state.require_prefill()
    kept = [rows[0] for rows in state.kept_lengths]
    return list(state.selections), kept, out[0, input_ids.shape[1] :].tolist()


class Run(NamedTuple):
    """One (method, ratio) of a prompt, selected and waiting to decode."""

    method: Method
    ratio: float | None
    budget: int
    selections: list
    kept: list  # per layer: prompt tokens kept (dynamic mode: read per step)
    tokens: list | None  # the adapter's tokens (adapter runs), else decoded in the batch
    select_seconds: float  # the method's selection time over its ratios, shared equally
    after_question: bool  # question mode after a question: selected on context + question


def dynamic_read_length(index, seq_len: int) -> int:
    """What a dynamic-mode step reads of a ``seq_len`` prompt: its chunks and the tail."""
    return int(index.keep_counts[0]) * index.chunk_size + seq_len - int(index.tail_start[0])


def bound_tokens(run) -> list[int] | None:
    """Per layer, the token-equivalents of key bounds a dynamic-mode step reads (``None``
    outside dynamic mode, or for an adapter run, which does not expose them)."""
    if run.method.mode != "dynamic" or run.tokens is not None:
        return None
    return [int(index.chunk_counts[0]) for _, _, index in run.selections]


def in_batches(fn, model, pre, caches, max_batch: int, *args) -> list:
    """``fn(model, pre, caches, *args)`` over groups of at most ``max_batch`` caches."""
    out = []
    for first in range(0, len(caches), max_batch):
        out += fn(model, pre, caches[first : first + max_batch], *args)
    return out


def evaluate(
    model,
    tokenizer,
    examples: list[Example],
    methods: list[Method],
    ratios,
    out_dir: Path,
    *,
    run_info: dict,
    chat: bool = True,
    fidelity: bool = True,
    engine: str = "shared",
    max_batch: int = 16,
    progress: bool = True,
    settings=SETTINGS[:1],
) -> Path:
    """Runs every example with ``fullkv`` once and every other method at every ratio, in each
    of ``settings``, appending to ``out_dir/results.jsonl`` (returned)."""
    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    check_resume(out_dir, run_info)
    path = out_dir / RESULTS_FILE
    done = {
        result_key(r["example_id"], r["method"], r["ratio"], r.get("setting", SETTINGS[0]))
        for r in read_results(path)
    }
    stop_ids = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device

    def todo_for(example, setting):
        return [
            (m, r)
            for m in methods
            for r in ([None] if m.name == "fullkv" else ratios)
            if result_key(example.example_id, m.label, r, setting) not in done
        ]

    plan = [
        (example, setting, todo_for(example, setting))
        for example in examples
        for setting in settings
        if todo_for(example, setting)
    ]
    bar = tqdm(
        total=sum(len(todo) for *_, todo in plan), disable=not progress, unit="run", desc="eval"
    )
    with path.open("a") as results:
        for example, setting, todo in plan:
            bar.set_postfix_str(f"{example.example_id} {setting}")
            if setting == "question-agnostic":
                prompt, question = segment_ids(example, tokenizer, chat)
            else:
                prompt, question = prompt_ids(example, tokenizer, chat), []
            for record in run_prompt(
                model,
                tokenizer,
                example,
                torch.tensor([prompt], device=device),
                todo,
                stop_ids,
                engine=engine,
                fidelity=fidelity,
                max_batch=max_batch,
                question=question,
                setting=setting,
            ):
                results.write(json.dumps(record) + "\n")
            results.flush()
            bar.update(len(todo))
    bar.close()
    return path


def run_prompt(
    model,
    tokenizer,
    example,
    input_ids,
    todo,
    stop_ids,
    *,
    engine,
    fidelity,
    max_batch,
    question=(),
    setting=SETTINGS[0],
) -> list[dict]:
    """The records of one prompt: every (method, ratio) of ``todo`` selects on the shared
    prefill, then all decode as batches beside the full cache (row 0), whose greedy answer is
    also the continuation the fidelity metrics trace. With ``question`` (question-agnostic)
    ``input_ids`` is the context alone, and each cache reads the question before decoding."""
    start = time.perf_counter()
    pre = eng.prefill(model, input_ids)
    T = pre.seq_len
    keep_all = [None] * pre.num_layers
    runs = []
    by_method = {}
    for method, ratio in todo:
        by_method.setdefault(method, []).append(ratio)
    asked = None  # question mode: the context's prefill continued by the question, built once
    for method, ratios in by_method.items():
        policy = method.policy(tokenizer)
        question_policy = core.question_policy(
            method.mode, policy, len(question), T + len(question)
        )
        after_question = engine == "shared" and question_policy is not None
        if after_question:
            policy = question_policy
        if after_question and asked is None:
            asked = eng.extend(model, pre, list(question))
        source = asked if after_question else pre
        budgets = [
            T if ratio is None else reference.resolve_budget(source.seq_len, ratio=ratio)
            for ratio in ratios
        ]
        select_start = time.perf_counter()
        if method.name == "fullkv":
            chosen = [(keep_all, [T] * pre.num_layers, None)]
        elif engine == "adapter":
            chosen = [
                generate_with_adapter(
                    model,
                    input_ids,
                    policy,
                    budget,
                    example.max_new_tokens,
                    stop_ids,
                    method.reuse_layers,
                    question,
                    method.mode,
                )
                for budget in budgets
            ]
        elif method.mode == "dynamic":  # every decode step selects: the caches stay whole
            grid = core.chunk_grid(policy)
            chosen = []
            for budget in budgets:
                layers = eng.dynamic(pre, budget, *grid)
                kept = [dynamic_read_length(index, T) for _, _, index in layers]
                chosen.append((layers, kept, None))
        else:
            chosen = [
                (selections, [kept_length(s, source.seq_len) for s in selections], None)
                for selections in eng.select_layers(source, policy, budgets, method.reuse_layers)
            ]
        seconds = (time.perf_counter() - select_start) / len(ratios)
        runs += [
            Run(method, ratio, budget, selections, kept, tokens, seconds, after_question)
            for ratio, budget, (selections, kept, tokens) in zip(ratios, budgets, chosen)
        ]

    # Row 0 is the full cache; fullkv results read it instead of a row of their own; adapter
    # runs decoded already. A dynamic run's "selections" are its layers' caches. Question-mode
    # runs after a question start past it: they decode apart.
    pending = [run for run in runs if run.method.name != "fullkv" and run.tokens is None]
    compressed = [run for run in pending if not run.after_question]
    rows = {id(run): row for row, run in enumerate(compressed, start=1)}
    caches = [eng.compact(pre, keep_all)] + [
        run.selections if run.method.mode == "dynamic" else eng.compact(pre, run.selections)
        for run in compressed
    ]
    decoded = in_batches(
        eng.greedy_decode,
        model,
        pre,
        caches,
        max_batch,
        example.max_new_tokens,
        stop_ids,
        list(question),
    )
    late = [run for run in pending if run.after_question]
    late_tokens = in_batches(
        eng.greedy_decode,
        model,
        asked,
        [eng.compact(asked, run.selections) for run in late],
        max_batch,
        example.max_new_tokens,
        stop_ids,
    )
    tokens = {id(run): generated for run, generated in zip(late, late_tokens)}
    tokens.update({id(run): decoded[rows[id(run)]] for run in compressed})
    continuation = list(question) + decoded[0]
    traces = (
        in_batches(eng.trace, model, pre, caches, max_batch, continuation) if fidelity else None
    )
    prompt_seconds = round(time.perf_counter() - start, 3)

    records = []
    for run in runs:
        row = rows.get(id(run), 0)
        generated = run.tokens if run.tokens is not None else tokens.get(id(run), decoded[0])
        text = tokenizer.decode(generated, skip_special_tokens=True)
        extracted = extracted_answer(example, text)
        record = {
            "task": example.task,
            "example_id": example.example_id,
            "length": example.length,
            "depth": example.depth,
            "prompt_tokens": T + len(question),
            "setting": setting,
            "method": run.method.label,
            "ratio": run.ratio,
            "budget": run.budget,
            "kept_tokens": run.kept,
            # Dynamic mode also reads every chunk's key bounds each step: two K rows a chunk,
            # the bytes of one token's K and V (per layer).
            "bound_tokens": bound_tokens(run),
            "answer": example.answer,
            "prediction": text,
            "extracted": extracted,
            "correct": extracted == example.answer,
            "select_seconds": round(run.select_seconds, 3),
            "prompt_seconds": prompt_seconds,
        }
        if traces is not None and id(run) in rows:
            selections = [None] * pre.num_layers if run.method.mode == "dynamic" else run.selections
            record.update(layer_fidelity(traces[0], traces[row], selections, T))
            record["adjacent_jaccard"] = adjacent_jaccard(selections, T)
        records.append(record)
    return records

"""``python -m triton_chunkkv eval``: run the evaluation into a folder, then write its report.

``add_parser(subparsers)`` adds the ``eval`` sub-command (arguments from ``add_arguments``,
``run`` as the ``args.run`` default the package's ``__main__`` dispatches to).
``python -m triton_chunkkv.eval ...`` runs the same command on its own.

Every option is checked before the model loads (``type=`` functions, then
:func:`check_arguments`); the prompts' lengths against the model's positions once they are
built, before any forward pass. Errors are one-line argparse errors (exit code 2).
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

import torch

from .. import arguments
from .. import cache as core
from ..arguments import UsageError
from ..models import DEFAULT_MAX_POSITIONS, max_positions
from ..policies import POLICIES
from ..provenance import device_name, git_commit
from .loading import DEFAULT_MODEL, TINY_MODEL
from .tasks import DEFAULT_DEPTHS, SETTINGS, TASKS

DEFAULT_METHODS = ("fullkv", "streamingllm", "h2o", "snapkv", "pyramidkv", "chunkkv")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


DESCRIPTION = (
    "Runs the offline tasks with every method at every budget ratio, appends the "
    "results to OUT/results.jsonl (an interrupted run resumes), then writes "
    "OUT/report.md with its plots."
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="answer fidelity of ChunkKV against the baselines (offline tasks)",
        description=DESCRIPTION,
    )
    add_arguments(parser)
    parser.set_defaults(run=run, error=parser.error)
    return parser


def model_name(text: str) -> str:
    """``--model``: a known name, a local HF folder or a ``.gguf`` file (nothing is
    downloaded)."""
    if text in (DEFAULT_MODEL, TINY_MODEL):
        return text
    path = Path(text)
    if path.suffix == ".gguf" and path.is_file():
        return text
    if path.is_dir() and (path / "config.json").is_file():
        return text
    raise argparse.ArgumentTypeError(
        f"expected {DEFAULT_MODEL!r}, {TINY_MODEL!r}, a local Hugging Face folder (with a "
        f"config.json) or a .gguf file, got {text!r}"
    )


def method_spec(text: str) -> str:
    """``--methods``: ``name`` or ``name:key=value,...`` with a known policy name (its options
    are checked by :func:`check_arguments`)."""
    from .runner import parse_method

    try:
        parse_method(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


class _DecodeOnly:
    """Stands in for the tokenizer while policy options are checked before the model loads."""

    def decode(self, ids) -> str:
        return ""


def check_arguments(args) -> None:
    """What the options allow to check before loading the model: the output folder, each
    method's options, and the lengths against the model's positions where they are known."""
    from .runner import RESULTS_FILE, parse_method

    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file, not a folder")
    if args.report_only:
        if not (args.out / RESULTS_FILE).is_file():
            raise UsageError(f"--report-only needs {args.out / RESULTS_FILE}, which does not exist")
        return
    for spec in args.methods:
        method = parse_method(spec)
        try:
            core.check_mode(method.mode, method.policy(_DecodeOnly()))
        except (TypeError, ValueError) as error:
            raise UsageError(f"--methods {spec}: {error}") from None
    limit = (
        DEFAULT_MAX_POSITIONS
        if args.model == DEFAULT_MODEL
        else max_positions(args.model)
        if Path(args.model).is_dir()
        else None
    )
    arguments.check_fits("--lengths", max(args.lengths), 0, limit)


def check_prompts(examples, tokenizer, model, chat: bool) -> None:
    """Every prompt and its answer fit the model's positions (before any forward pass)."""
    from .tasks import prompt_ids

    limit = getattr(model.config, "max_position_embeddings", None)
    for example in examples:
        arguments.check_fits(
            f"--lengths (prompt {example.example_id})",
            len(prompt_ids(example, tokenizer, chat)),
            example.max_new_tokens,
            limit,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="results and report folder")
    parser.add_argument(
        "--model",
        type=model_name,
        default=DEFAULT_MODEL,
        help="'smollm2' (default, embedded), 'tiny-random', a local HF folder or a .gguf file",
    )
    parser.add_argument(
        "--tasks", nargs="+", default=["passkey", "multikey", "multidoc"], choices=TASKS
    )
    parser.add_argument(
        "--lengths",
        nargs="+",
        type=arguments.int_at_least(1),
        default=[512, 1024, 2048],
        help="prompt lengths in tokens (passkey, multikey, multidoc)",
    )
    parser.add_argument(
        "--depths",
        nargs="+",
        type=arguments.number_in(0, 1, include_low=True),
        default=list(DEFAULT_DEPTHS),
        help="pass-key depths, 0 (start) to 1 (end)",
    )
    parser.add_argument(
        "--per-cell",
        type=arguments.int_at_least(1),
        default=2,
        help="prompts per length for each task (pass keys take their depths from --depths in "
        "turn), in all for arithmetic",
    )
    parser.add_argument(
        "--ratios",
        nargs="+",
        type=arguments.number_in(0, 1, include_low=False, include_high=False),
        default=[0.1, 0.2, 0.3],
        help="budget L = floor(ratio * T) tokens per KV head, each ratio in (0, 1)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        type=method_spec,
        default=list(DEFAULT_METHODS),
        help=f"policies {sorted(POLICIES)}, with options as "
        "name:key=value,key=value (e.g. chunkkv:window=16)",
    )
    parser.add_argument("--seed", type=int, default=0, help="task generation (and tiny model)")
    parser.add_argument(
        "--device", type=arguments.device, default="cpu", help="cpu, cuda or cuda:N (default: cpu)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--engine",
        choices=["shared", "adapter"],
        default="shared",
        help="'shared': one prefill per prompt for every method (fast); "
        "'adapter': generate through integrations.hf.chunkkv",
    )
    parser.add_argument(
        "--max-batch",
        type=arguments.int_at_least(1),
        default=16,
        help="configurations of one prompt decoded together (memory bound)",
    )
    parser.add_argument(
        "--threads",
        type=arguments.int_at_least(1),
        default=None,
        help="torch CPU threads (1 is fastest on a busy machine)",
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=SETTINGS,
        default=[SETTINGS[0]],
        help="question-aware: the question is inside the compressed prompt (default); "
        "question-agnostic: the context alone is compressed, the question read afterwards "
        "(kvpress's pipeline); both may be given",
    )
    parser.add_argument("--no-chat", action="store_true", help="plain prompts, no chat template")
    parser.add_argument("--no-fidelity", action="store_true", help="skip the per-layer metrics")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only rewrite OUT/report.md from OUT/results.jsonl",
    )


def run(args) -> int:
    from .report import write_report

    check_arguments(args)
    if not args.report_only:
        from .loading import load_model
        from .runner import evaluate, parse_method
        from .tasks import build_examples

        methods = [parse_method(spec) for spec in args.methods]
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        try:
            model, tokenizer = load_model(
                args.model, device=args.device, dtype=DTYPES[args.dtype], seed=args.seed
            )
        except FileNotFoundError as error:  # the embedded model's package is not installed
            raise UsageError(str(error)) from None
        for method in methods:  # with the real tokenizer, before any prompt runs
            method.policy(tokenizer)
        chat = not args.no_chat
        examples = build_examples(
            tokenizer,
            args.tasks,
            lengths=args.lengths,
            depths=args.depths,
            per_cell=args.per_cell,
            seed=args.seed,
            chat=chat,
        )
        check_prompts(examples, tokenizer, model, chat)
        run_info = {
            "model": args.model,
            "dtype": args.dtype,
            "seed": args.seed,
            "chat": chat,
            "engine": args.engine,
            "tasks": args.tasks,
            "methods": [m.label for m in methods],
            "ratios": args.ratios,
            "lengths": args.lengths,
            "depths": args.depths,
            "per_cell": args.per_cell,
            "settings": args.settings,
            "date": datetime.date.today().isoformat(),
            "commit": git_commit(),
            "device": device_name(args.device),
            "command": getattr(args, "invocation", "python -m triton_chunkkv")
            + " "
            + shlex.join(sys.argv[1:]),
        }
        evaluate(
            model,
            tokenizer,
            examples,
            methods,
            args.ratios,
            args.out,
            run_info=run_info,
            chat=chat,
            fidelity=not args.no_fidelity,
            engine=args.engine,
            max_batch=args.max_batch,
            progress=not args.no_progress,
            settings=args.settings,
        )
    print(f"report: {write_report(args.out)}")
    return 0


def main(argv=None) -> int:
    """``python -m triton_chunkkv.eval``: the same command before the package CLI wires it."""
    parser = argparse.ArgumentParser(prog="python -m triton_chunkkv.eval", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.invocation = "python -m triton_chunkkv.eval"
    try:
        return run(args)
    except UsageError as error:
        parser.error(str(error))

"""``python -m triton_chunkkv eval``: run the evaluation into a folder, then write its report.

``add_parser(subparsers)`` adds the ``eval`` sub-command (arguments from ``add_arguments``,
``run`` as the ``args.run`` default the package's ``__main__`` dispatches to).
``python -m triton_chunkkv.eval ...`` runs the same command on its own.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from ..policies import POLICIES
from .loading import DEFAULT_MODEL
from .tasks import DEFAULT_DEPTHS, TASKS

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
    parser.set_defaults(run=run)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="results and report folder")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="'smollm2' (default, embedded), 'tiny-random', a local HF folder or a .gguf file",
    )
    parser.add_argument(
        "--tasks", nargs="+", default=["passkey", "multikey", "multidoc"], choices=TASKS
    )
    parser.add_argument(
        "--lengths",
        nargs="+",
        type=int,
        default=[512, 1024, 2048],
        help="prompt lengths in tokens (passkey, multikey, multidoc)",
    )
    parser.add_argument(
        "--depths",
        nargs="+",
        type=float,
        default=list(DEFAULT_DEPTHS),
        help="pass-key depths, 0 (start) to 1 (end)",
    )
    parser.add_argument(
        "--per-cell",
        type=int,
        default=2,
        help="prompts per (length, depth) for passkey, per length for multikey "
        "and multidoc, in all for arithmetic",
    )
    parser.add_argument(
        "--ratios",
        nargs="+",
        type=float,
        default=[0.1, 0.2, 0.3],
        help="budget L = floor(ratio * T) tokens per KV head",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help=f"policies {sorted(POLICIES)}, with options as "
        "name:key=value,key=value (e.g. chunkkv:window=16)",
    )
    parser.add_argument("--seed", type=int, default=0, help="task generation (and tiny model)")
    parser.add_argument("--device", default="cpu")
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
        type=int,
        default=16,
        help="configurations of one prompt decoded together (memory bound)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 is fastest on a busy machine)",
    )
    parser.add_argument("--no-chat", action="store_true", help="plain prompts, no chat template")
    parser.add_argument("--no-fidelity", action="store_true", help="skip the per-layer metrics")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only rewrite OUT/report.md from OUT/results.jsonl",
    )


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(args) -> int:
    from .report import write_report

    if not args.report_only:
        from .loading import load_model
        from .runner import evaluate, parse_method
        from .tasks import build_examples

        methods = [parse_method(spec) for spec in args.methods]
        bad = [r for r in args.ratios if not 0 < r < 1]
        if bad:
            raise SystemExit(f"--ratios must lie in (0, 1), got {bad}")
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        model, tokenizer = load_model(
            args.model, device=args.device, dtype=DTYPES[args.dtype], seed=args.seed
        )
        for method in methods:  # options are checked before any prompt runs
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
        )
    print(f"report: {write_report(args.out)}")
    return 0


def main(argv=None) -> int:
    """``python -m triton_chunkkv.eval``: the same command before the package CLI wires it."""
    parser = argparse.ArgumentParser(prog="python -m triton_chunkkv.eval", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.invocation = "python -m triton_chunkkv.eval"
    return run(args)

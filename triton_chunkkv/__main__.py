"""Command line: ``python -m triton_chunkkv COMMAND`` (also installed as ``triton-chunkkv``).

Each command lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``.
Options are checked before any model loads; a bad one, or a
:class:`~triton_chunkkv.arguments.UsageError` that ``run`` raises once the prompt is known, is
one ``prog: error: ...`` line on stderr after the usage, with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import sys

from . import demo
from .arguments import UsageError
from .eval import cli as eval_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="triton-chunkkv", description="ChunkKV KV-cache compression with Triton kernels."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo_parser = commands.add_parser(
        "demo",
        help="answer a long prompt with the full KV cache and with ChunkKV",
        description=demo.__doc__.replace("``", ""),
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.run, error=demo_parser.error)
    eval_cli.add_parser(commands)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as error:
        args.error(str(error))  # the command's own usage and error line; exits with code 2


if __name__ == "__main__":
    sys.exit(main())

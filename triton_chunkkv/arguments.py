"""What the commands (``demo``, ``eval``) share to check their command lines before any model
loads: argparse ``type=`` functions (a bad value is a one-line ``argument --x: ...`` error,
exit code 2) and :class:`UsageError`, for what can only be checked later (a prompt's length in
tokens), which the command line reports the same way."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


class UsageError(Exception):
    """A bad command line found after parsing: reported as an argparse error (the usage, one
    ``prog: error: ...`` line on stderr, exit code 2), with no traceback."""


def int_at_least(minimum: int):
    """A ``type=`` for ints ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def number_in(low: float, high: float, *, include_low: bool, include_high: bool = True):
    """A ``type=`` for floats in the interval from ``low`` to ``high``."""
    interval = f"{'[' if include_low else '('}{low:g}, {high:g}{']' if include_high else ')'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = value >= low if include_low else value > low
        below = value <= high if include_high else value < high
        if not (above and below):  # NaN fails both
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text}")
        return value

    return parse


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def model_folder(text: str) -> Path:
    """A local Hugging Face model folder (nothing is downloaded)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text} has no config.json (not a Hugging Face model)")
    return path


def device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, and available on this machine."""
    if text == "auto":
        return text
    try:
        parsed = torch.device(text)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s)")
    return text


def check_fits(source: str, tokens: int, new_tokens: int, max_positions: int | None) -> None:
    """A prompt of ``tokens`` tokens (set by the option ``source``) plus ``new_tokens`` generated
    ones fits in the model's ``max_positions`` (``None``: unknown, not checked)."""
    if max_positions is not None and tokens + new_tokens > max_positions:
        answer = f" plus {new_tokens} new tokens" if new_tokens else ""
        raise UsageError(
            f"{source}: a prompt of {tokens} tokens{answer} exceeds the model's "
            f"{max_positions} positions (max_position_embeddings)"
        )

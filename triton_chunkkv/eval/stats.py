"""Bootstrap intervals for the evaluation's accuracies, over prompts.

Every interval resamples the prompts (not the records) with replacement, with a fixed seed, so a
report is reproducible; paired statistics (a method against the full cache, or against a
baseline) resample the same prompts for both sides.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

SAMPLES = 2000
LEVEL = 0.95


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def bootstrap(
    prompts: Sequence[str], statistic: Callable[[list[str]], float | None], seed: int = 0
) -> tuple[float, float] | None:
    """The central ``LEVEL`` interval of ``statistic`` over resamples of ``prompts``;
    resamples where it is undefined (``None``) are dropped. ``None`` without prompts."""
    if not prompts:
        return None
    rng = random.Random(seed)
    values = []
    for _ in range(SAMPLES):
        value = statistic([rng.choice(prompts) for _ in prompts])
        if value is not None:
            values.append(value)
    if not values:
        return None
    values.sort()
    tail = (1 - LEVEL) / 2
    return percentile(values, tail), percentile(values, 1 - tail)


def accuracy(correct: dict[str, bool], prompts: Sequence[str]) -> float | None:
    """Mean of ``correct`` over ``prompts`` (with repeats); ``None`` when there are none."""
    hits = [correct[p] for p in prompts if p in correct]
    return sum(hits) / len(hits) if hits else None


def accuracy_interval(correct: dict[str, bool]) -> tuple[float, float] | None:
    prompts = sorted(correct)
    return bootstrap(prompts, lambda sample: accuracy(correct, sample))


def ratio_interval(correct: dict[str, bool], full: dict[str, bool]):
    """Interval of ``accuracy(correct) / accuracy(full)`` on the prompts both have."""
    prompts = sorted(set(correct) & set(full))

    def ratio(sample):
        base = accuracy(full, sample)
        return None if not base else accuracy(correct, sample) / base

    return ratio(prompts), bootstrap(prompts, ratio)


def difference_interval(correct: dict[str, bool], other: dict[str, bool]):
    """Interval of ``accuracy(correct) - accuracy(other)`` on the prompts both have."""
    prompts = sorted(set(correct) & set(other))

    def difference(sample):
        a, b = accuracy(correct, sample), accuracy(other, sample)
        return None if a is None or b is None else a - b

    return difference(prompts), bootstrap(prompts, difference)

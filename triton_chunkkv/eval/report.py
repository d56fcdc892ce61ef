"""``report.md`` and its plots from a results folder (``results.jsonl`` + ``run.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

from . import stats
from .runner import RESULTS_FILE, RUN_FILE, read_results
from .tasks import SETTINGS

FIDELITY = (
    ("attn_output_l1", "attention output L1 (lower is better)"),
    ("attn_cosine", "attention cosine similarity (higher is better)"),
    ("kv_l1", "continuation K/V L1 (lower is better)"),
)


SETTING_NOTES = {
    "question-aware": "Question-aware: the question is part of the compressed prompt.",
    "question-agnostic": "Question-agnostic: the context alone is compressed, the question is "
    "read afterwards over the compressed cache (kvpress's pipeline).",
}


# A task counts toward the goals when the full cache answers at least this share of it.
COUNT_THRESHOLD = 0.5
BASELINES = ("streamingllm", "h2o", "snapkv", "pyramidkv")
# The goals (issue 18): this share of the full cache's accuracy, at this budget per setting
# (question-aware: kept; question-agnostic: read per decode step).
GOAL_SHARE = 0.9
GOAL_RATIO = {"question-aware": 0.05, "question-agnostic": 0.1}


def setting_of(record) -> str:
    return record.get("setting", SETTINGS[0])  # runs before settings existed: question-aware


def percent(values) -> str:
    return f"{100 * mean(values):.0f}" if values else "–"


def ordered(values, preferred=()) -> list:
    """Distinct ``values`` in ``preferred`` order first, then in order of appearance."""
    seen = dict.fromkeys(v for v in preferred if v in set(values))
    seen.update(dict.fromkeys(values))
    return list(seen)


def ratio_label(ratio) -> str:
    return "full" if ratio is None else f"{100 * ratio:g} %"


def accuracy(records, **match) -> list[bool]:
    return [r["correct"] for r in records if all(r[k] == v for k, v in match.items())]


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def correct_by_prompt(records, **match) -> dict[str, bool]:
    """``{example_id: correct}`` of the records matching ``match``."""
    return {
        r["example_id"]: r["correct"]
        for r in records
        if all(r.get(k) == v for k, v in match.items())
    }


def present(methods, records) -> list:
    """The ``methods`` that have records (a method may run in one setting only)."""
    found = {r["method"] for r in records}
    return [m for m in methods if m in found]


def method_ratio(method, ratio):
    return None if method == "fullkv" else ratio


def cell(correct: dict[str, bool]) -> str:
    """``accuracy % [low, high]`` over prompts, with the bootstrap interval."""
    if not correct:
        return "–"
    value = stats.accuracy(correct, list(correct))
    low, high = stats.accuracy_interval(correct)
    return f"{100 * value:.0f} [{100 * low:.0f}, {100 * high:.0f}]"


def counted_tasks(records, tasks) -> tuple[list, list]:
    """``(counted, flagged)``: a task counts when the full cache answers at least
    ``COUNT_THRESHOLD`` of its prompts; below that, compression is measured against noise."""
    counted, flagged = [], []
    for task in tasks:
        full = correct_by_prompt(records, task=task, method="fullkv")
        share = stats.accuracy(full, list(full)) if full else None
        (counted if share is not None and share >= COUNT_THRESHOLD else flagged).append(task)
    return counted, flagged


def accuracy_tables(records, methods, ratios, tasks) -> str:
    """Per task, then over the counted tasks: methods x ratios, exact match in % with its 95 %
    bootstrap interval over prompts (FullKV in every column)."""
    methods = present(methods, records)
    counted, flagged = counted_tasks(records, tasks)
    out = []
    if flagged:
        out.append(
            "Flagged, not counted (the full cache answers fewer than "
            f"{100 * COUNT_THRESHOLD:.0f} % of their prompts): "
            + ", ".join(f"`{t}`" for t in flagged)
            + "."
        )
    for task in [*tasks, None]:
        subset = [r for r in records if (r["task"] == task if task else r["task"] in counted)]
        prompts = len({r["example_id"] for r in subset})
        if task is None:
            title = f"### Counted tasks ({prompts} prompts)"
        else:
            title = f"### {task} ({prompts} prompts){' — flagged' if task in flagged else ''}"
        rows = [
            [f"`{m}`"]
            + [cell(correct_by_prompt(subset, method=m, ratio=method_ratio(m, r))) for r in ratios]
            for m in methods
        ]
        header = ["method"] + [f"{ratio_label(r)} of the cache" for r in ratios]
        out.append(title + "\n\n" + markdown_table(header, rows))
    return "\n\n".join(out)


def read_share(record) -> float:
    """What one decode step reads of the full cache, mean over layers: the kept (or, in
    dynamic mode, selected) tokens plus any key bounds, over the prompt's tokens."""
    bounds = record.get("bound_tokens") or [0] * len(record["kept_tokens"])
    T = record["prompt_tokens"]
    return mean((kept + bound) / T for kept, bound in zip(record["kept_tokens"], bounds))


def read_table(records, methods, ratios) -> str:
    """Mean share of the full KV cache a decode step reads, per method and budget."""
    rows = []
    for m in methods:
        cells = []
        for r in ratios:
            subset = [x for x in records if x["method"] == m and x["ratio"] == method_ratio(m, r)]
            cells.append(f"{100 * mean(read_share(x) for x in subset):.1f}" if subset else "–")
        rows.append([f"`{m}`", *cells])
    return markdown_table(["method"] + [f"budget {ratio_label(r)}" for r in ratios], rows)


def goal_table(records, methods, ratios, tasks, setting) -> str:
    """The fidelity goals over the counted tasks, for every method that is neither FullKV nor
    a baseline: its accuracy relative to the full cache at the goal's budget, and its paired
    difference to the best baseline at every ratio (95 % bootstrap intervals)."""
    counted, _ = counted_tasks(records, tasks)
    subset = [r for r in records if r["task"] in counted]
    methods = present(methods, records)
    ours = [m for m in methods if m != "fullkv" and m.partition(":")[0] not in BASELINES]
    baselines = [m for m in methods if m.partition(":")[0] in BASELINES]
    full = correct_by_prompt(subset, method="fullkv")
    goal_ratio = GOAL_RATIO[setting]
    rows = []
    for m in ours:
        row = [f"`{m}`"]
        correct = correct_by_prompt(subset, method=m, ratio=goal_ratio)
        value, interval = stats.ratio_interval(correct, full) if correct else (None, None)
        at_goal = [r for r in subset if r["method"] == m and r["ratio"] == goal_ratio]
        read = mean(read_share(r) for r in at_goal) if at_goal else None
        row.append("–" if read is None else f"{100 * read:.1f} %")
        if value is None:
            row.append("–")
        else:
            # Met: the accuracy share, at a decode step that reads no more than the goal's budget.
            verdict = (
                f"missed by {100 * (GOAL_SHARE - value):.0f}"
                if value < GOAL_SHARE
                else f"not met: reads {100 * read:.1f} %"
                if read > goal_ratio
                else "met"
            )
            row.append(
                f"{100 * value:.0f} % [{100 * interval[0]:.0f}, {100 * interval[1]:.0f}] {verdict}"
            )
        for r in ratios:
            ours_r = correct_by_prompt(subset, method=m, ratio=r)
            scored = [
                (stats.accuracy(c, list(c)), b)
                for b in baselines
                if (c := correct_by_prompt(subset, method=b, ratio=r))
            ]
            if not ours_r or not scored:
                row.append("–")
                continue
            best = max(scored)[1]
            diff, interval = stats.difference_interval(
                ours_r, correct_by_prompt(subset, method=best, ratio=r)
            )
            row.append(
                f"{100 * diff:+.0f} [{100 * interval[0]:+.0f}, {100 * interval[1]:+.0f}] "
                f"vs `{best}`"
            )
        rows.append(row)
    if not rows:
        return ""
    header = [
        "method",
        f"a step reads, budget {ratio_label(goal_ratio)}",
        f"share of full-cache accuracy at {ratio_label(goal_ratio)} "
        f"(goal {100 * GOAL_SHARE:.0f} % at {ratio_label(goal_ratio)} read)",
        *[f"vs best baseline at {ratio_label(r)}" for r in ratios],
    ]
    return markdown_table(header, rows)


def passkey_length_table(records, methods, ratios) -> str:
    """Pass-key accuracy per context length; cells list the ratios in order."""
    subset = [r for r in records if r["task"] == "passkey"]
    if not subset:
        return ""
    lengths = sorted({r["length"] for r in subset})
    rows = []
    for m in methods:
        cells = []
        for length in lengths:
            per_ratio = [
                percent(
                    accuracy(subset, method=m, length=length, ratio=None if m == "fullkv" else r)
                )
                for r in ratios
            ]
            cells.append(per_ratio[0] if m == "fullkv" else " / ".join(per_ratio))
        rows.append([f"`{m}`"] + cells)
    return markdown_table(["method"] + [f"~{n} tokens" for n in lengths], rows)


def fidelity_table(records, methods, ratios) -> str:
    rows = []
    for m in methods:
        for r in ratios:
            subset = [
                x for x in records if x["method"] == m and x["ratio"] == r and "attn_cosine" in x
            ]
            if not subset:
                continue
            cells = [f"{mean(mean(x[key]) for x in subset):.4f}" for key, _ in FIDELITY]
            jaccard = [v for x in subset for v in x["adjacent_jaccard"] if v is not None]
            rows.append(
                [f"`{m}`", ratio_label(r), *cells, f"{mean(jaccard):.3f}" if jaccard else "–"]
            )
    if not rows:
        return ""
    return markdown_table(
        [
            "method",
            "budget",
            "attn output L1 ↓",
            "attn cosine ↑",
            "continuation K/V L1 ↓",
            "adjacent-layer Jaccard",
        ],
        rows,
    )


def per_layer_mean(records, key) -> list[float]:
    columns = list(zip(*[r[key] for r in records]))
    return [
        mean(v for v in column if v is not None)
        if any(v is not None for v in column)
        else float("nan")
        for column in columns
    ]


def method_colors(methods) -> dict:
    """A distinct colour per method, the same in every plot (tab20: strong hues first)."""
    import matplotlib.pyplot as plt

    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return {m: plt.cm.tab20(order[i % 20]) for i, m in enumerate(methods)}


def plot_accuracy(records, methods, ratios, tasks, path: Path, title: str) -> None:
    """Accuracy against the budget, one panel per task, 95 % intervals as error bars."""
    import matplotlib.pyplot as plt

    colors = method_colors(methods)
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(4.2 * len(tasks) + 2.5, 3.8), squeeze=False, layout="constrained"
    )
    x = [100 * r for r in ratios]
    for ax, task in zip(axes[0], tasks):
        subset = [r for r in records if r["task"] == task]
        for m in methods:
            cells = [correct_by_prompt(subset, method=m, ratio=method_ratio(m, r)) for r in ratios]
            if not any(cells):
                continue
            values = [100 * (stats.accuracy(c, list(c)) or 0) for c in cells]
            intervals = [stats.accuracy_interval(c) or (0, 0) for c in cells]
            errors = [
                [v - 100 * low for v, (low, _) in zip(values, intervals)],
                [100 * high - v for v, (_, high) in zip(values, intervals)],
            ]
            if m == "fullkv":
                ax.axhline(values[0], color="black", linestyle="--", label="fullkv")
                ax.axhspan(values[0] - errors[0][0], values[0] + errors[1][0], color="0.9")
                continue
            ax.errorbar(x, values, yerr=errors, marker="o", capsize=2, label=m, color=colors[m])
        ax.set(
            title=task,
            xlabel="KV cache kept or read (%)",
            ylabel="exact match (%)",
            xticks=x,
            ylim=(-5, 105),
        )
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right center", fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_passkey_heatmaps(records, methods, ratio, path: Path) -> bool:
    import matplotlib.pyplot as plt

    subset = [r for r in records if r["task"] == "passkey"]
    if not subset:
        return False
    lengths = sorted({r["length"] for r in subset})
    depths = sorted({r["depth"] for r in subset})
    cols = min(len(methods), 4)
    rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.4 * cols, 2.9 * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(methods) :]:
        ax.axis("off")
    for ax, m in zip(axes.flat, methods):
        grid = [
            [
                mean(
                    accuracy(
                        subset, method=m, length=n, depth=d, ratio=None if m == "fullkv" else ratio
                    )
                    or [float("nan")]
                )
                for n in lengths
            ]
            for d in depths
        ]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for row, values in enumerate(grid):
            for col, value in enumerate(values):
                ax.text(col, row, f"{value:.0%}", ha="center", va="center", fontsize=7)
        ax.set(
            title=m,
            xticks=range(len(lengths)),
            xticklabels=lengths,
            yticks=range(len(depths)),
            yticklabels=[f"{d:g}" for d in depths],
            xlabel="prompt tokens",
            ylabel="depth",
        )
        ax.title.set_fontsize(8)
    fig.colorbar(image, ax=axes, shrink=0.6, label="exact match")
    fig.suptitle(f"pass-key retrieval at {ratio_label(ratio)} of the cache")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_fidelity(records, methods, ratio, path: Path) -> bool:
    import matplotlib.pyplot as plt

    colors = method_colors(["fullkv", *methods])

    per_method = {
        m: [r for r in records if r["method"] == m and r["ratio"] == ratio and "attn_cosine" in r]
        for m in methods
    }
    per_method = {m: rs for m, rs in per_method.items() if rs}
    if not per_method:
        return False
    fig, axes = plt.subplots(1, len(FIDELITY) + 1, figsize=(19, 3.8), layout="constrained")
    keys = [*FIDELITY, ("adjacent_jaccard", "adjacent-layer Jaccard of selected positions")]
    for ax, (key, title) in zip(axes, keys):
        for m, rs in per_method.items():
            values = per_layer_mean(rs, key)
            start = 1 if key == "adjacent_jaccard" else 0  # pair (l-1, l) drawn at layer l
            ax.plot(range(start, start + len(values)), values, label=m, color=colors[m])
        ax.set(title=title, xlabel="layer")
        ax.title.set_fontsize(9)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=7)
    fig.suptitle(f"per-layer fidelity to the full cache at {ratio_label(ratio)} of the cache")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(results_dir: Path) -> Path:
    """Writes ``report.md`` and its PNGs into ``results_dir``; returns the report's path."""
    import matplotlib

    matplotlib.use("Agg")
    results_dir = Path(results_dir)
    records = read_results(results_dir / RESULTS_FILE)
    if not records:
        raise ValueError(f"no results in {results_dir / RESULTS_FILE}")
    info = json.loads((results_dir / RUN_FILE).read_text())
    methods = ordered([r["method"] for r in records], info.get("methods", ()))
    ratios = sorted({r["ratio"] for r in records if r["ratio"] is not None})
    tasks = ordered([r["task"] for r in records], info.get("tasks", ()))

    settings = ordered([setting_of(r) for r in records], SETTINGS)
    aware = [r for r in records if setting_of(r) == SETTINGS[0]]  # heatmaps and fidelity
    plots = []
    for setting in settings:
        name = "accuracy_vs_budget.png" if setting == SETTINGS[0] else f"accuracy_{setting}.png"
        subset = [r for r in records if setting_of(r) == setting]
        title = f"Accuracy against the budget, {setting}"
        plot_accuracy(subset, methods, ratios, tasks, results_dir / name, title)
        plots.append((title, name))
    for ratio in ratios:
        name = f"passkey_heatmap_{round(100 * ratio)}.png"
        if plot_passkey_heatmaps(aware, methods, ratio, results_dir / name):
            plots.append((f"Pass-key accuracy by length and depth, {ratio_label(ratio)}", name))
    for ratio in ratios:
        name = f"fidelity_layers_{round(100 * ratio)}.png"
        if plot_fidelity(aware, [m for m in methods if m != "fullkv"], ratio, results_dir / name):
            plots.append((f"Per-layer fidelity, {ratio_label(ratio)}", name))

    # One prompt_seconds per prompt run: a setting, or a resume with more methods, runs again.
    seconds = sum(
        seconds for _, _, seconds in {
            (r["example_id"], setting_of(r), r["prompt_seconds"]) for r in records
        }
    )  # fmt: skip
    header = [
        "# ChunkKV answer fidelity against the baselines",
        "",
        f"- date: {info.get('date')}; commit: `{info.get('commit')}`; device: "
        f"{info.get('device')}; model: `{info.get('model')}` ({info.get('dtype')})",
        f"- command: `{info.get('command')}`",
        f"- seed {info.get('seed')}; {len({r['example_id'] for r in records})} prompts; "
        f"{len(records)} results; {seconds / 60:.1f} min of compute (model loading not counted)",
        "- exact match in %: the first number (pass key, variable) or the first candidate named "
        "(city, label) in the greedy answer must equal the expected one; `fullkv` keeps the "
        "whole cache; [low, high] is the 95 % bootstrap interval over prompts",
    ]
    sections = []
    goals = [
        (
            setting,
            goal_table(
                [r for r in records if setting_of(r) == setting], methods, ratios, tasks, setting
            ),
        )
        for setting in settings
    ]
    if any(table for _, table in goals):
        sections.append("## Goals")
        sections.append(
            f"Over the counted tasks: what a decode step reads at the goal's budget (share of "
            'the full KV, as in "What a decode step reads"), the share of the full cache\'s '
            f"accuracy there (met: at least {100 * GOAL_SHARE:.0f} % while a step reads no more "
            "than the budget), and the paired difference in points to the best baseline at "
            "each budget (negative: worse), 95 % bootstrap intervals over prompts."
        )
        for setting, table in goals:
            if table:
                sections += [f"### {setting}", table]
    for setting in settings:
        subset = [r for r in records if setting_of(r) == setting]
        title = "## Accuracy" if len(settings) == 1 else f"## Accuracy, {setting}"
        sections += [title, SETTING_NOTES[setting], accuracy_tables(subset, methods, ratios, tasks)]
    sections += [
        "## What a decode step reads",
        "Share of the full KV cache in % (mean over prompts and layers): the kept tokens, or in "
        "dynamic mode the tokens a step selects plus the key bounds it scores (two K rows a "
        "chunk, one token's K and V).",
        read_table(records, methods, ratios),
    ]
    by_length = passkey_length_table(aware, methods, ratios)
    if by_length:
        sections += [
            "## Pass-key accuracy by context length",
            "Cells: "
            + " / ".join(ratio_label(r) for r in ratios)
            + " of the cache (`fullkv`: one value).",
            by_length,
        ]
    fidelity = fidelity_table(aware, methods, ratios)
    if fidelity:
        sections += [
            "## Fidelity to the full cache",
            "Means over layers and prompts; definitions in `docs/EVAL.md`.",
            fidelity,
        ]
    sections += ["## Plots"] + [f"### {title}\n\n![{title}]({name})" for title, name in plots]
    path = results_dir / "report.md"
    path.write_text("\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n")
    return path

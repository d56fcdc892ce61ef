"""``report.md`` and its plots from a results folder (``results.jsonl`` + ``run.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

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


def accuracy_tables(records, methods, ratios, tasks) -> str:
    """Per task: methods x ratios, exact-match accuracy in % (FullKV in every column)."""
    out = []
    for task in [*tasks, None]:
        subset = [r for r in records if task is None or r["task"] == task]
        prompts = len({r["example_id"] for r in subset})
        title = (
            f"### {task} ({prompts} prompts)"
            if task
            else f"### All tasks ({prompts} prompts, mean over prompts)"
        )
        rows = [
            [f"`{m}`"]
            + [
                percent(accuracy(subset, method=m, ratio=None if m == "fullkv" else r))
                for r in ratios
            ]
            for m in methods
        ]
        out.append(
            title
            + "\n\n"
            + markdown_table(["method"] + [f"{ratio_label(r)} of the cache" for r in ratios], rows)
        )
    return "\n\n".join(out)


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


def plot_accuracy(records, methods, ratios, tasks, path: Path) -> None:
    import matplotlib.pyplot as plt

    colors = method_colors(methods)

    fig, axes = plt.subplots(
        1, len(tasks), figsize=(4.2 * len(tasks) + 2.5, 3.8), squeeze=False, layout="constrained"
    )
    x = [100 * r for r in ratios]
    for ax, task in zip(axes[0], tasks):
        subset = [r for r in records if r["task"] == task]
        for m in methods:
            if m == "fullkv":
                ax.axhline(
                    100 * mean(accuracy(subset, method=m) or [0]),
                    color="black",
                    linestyle="--",
                    label="fullkv",
                )
                continue
            ax.plot(
                x,
                [100 * mean(accuracy(subset, method=m, ratio=r) or [0]) for r in ratios],
                marker="o",
                label=m,
                color=colors[m],
            )
        ax.set(
            title=task,
            xlabel="KV cache kept (%)",
            ylabel="exact match (%)",
            xticks=x,
            ylim=(-5, 105),
        )
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right center", fontsize=7)
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

    plots = []
    plot_accuracy(records, methods, ratios, tasks, results_dir / "accuracy_vs_budget.png")
    plots.append(("Accuracy against the budget", "accuracy_vs_budget.png"))
    for ratio in ratios:
        name = f"passkey_heatmap_{round(100 * ratio)}.png"
        if plot_passkey_heatmaps(records, methods, ratio, results_dir / name):
            plots.append((f"Pass-key accuracy by length and depth, {ratio_label(ratio)}", name))
    for ratio in ratios:
        name = f"fidelity_layers_{round(100 * ratio)}.png"
        if plot_fidelity(records, [m for m in methods if m != "fullkv"], ratio, results_dir / name):
            plots.append((f"Per-layer fidelity, {ratio_label(ratio)}", name))

    seconds = sum({r["example_id"]: r["prompt_seconds"] for r in records}.values())
    header = [
        "# ChunkKV answer fidelity against the baselines",
        "",
        f"- date: {info.get('date')}; commit: `{info.get('commit')}`; device: "
        f"{info.get('device')}; model: `{info.get('model')}` ({info.get('dtype')})",
        f"- command: `{info.get('command')}`",
        f"- seed {info.get('seed')}; {len({r['example_id'] for r in records})} prompts; "
        f"{len(records)} results; {seconds / 60:.1f} min of compute (model loading not counted)",
        "- exact match in %: the first number (pass key) or the first city named (multidoc) "
        "in the greedy answer must equal the expected one; `fullkv` keeps the whole cache",
    ]
    settings = ordered([setting_of(r) for r in records], SETTINGS)
    sections = []
    for setting in settings:
        subset = [r for r in records if setting_of(r) == setting]
        title = "## Accuracy" if len(settings) == 1 else f"## Accuracy, {setting}"
        sections += [title, SETTING_NOTES[setting], accuracy_tables(subset, methods, ratios, tasks)]
    by_length = passkey_length_table(records, methods, ratios)
    if by_length:
        sections += [
            "## Pass-key accuracy by context length",
            "Cells: "
            + " / ".join(ratio_label(r) for r in ratios)
            + " of the cache (`fullkv`: one value).",
            by_length,
        ]
    fidelity = fidelity_table(records, methods, ratios)
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

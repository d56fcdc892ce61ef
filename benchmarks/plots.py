"""PNG plots of results files; each names its device, date, commit, command and data file.

    python -m benchmarks.plots RESULTS.json [MORE.json ...] --out-dir benchmarks/plots

Writes ``<device>_<plot>.png`` for the plots whose rows are present:

* ``decode_latency``: decode attention time vs context, full-cache SDPA, compacted-cache SDPA,
  ``sparse_decode`` (and FlexAttention where measured);
* ``compress_vs_floor``: one layer's ``compress`` time vs context beside the byte floor and the
  materializing torch path;
* ``bandwidth_util``: floor time / time of each op vs context;
* ``reuse_speedup``: ``compress_layers`` time with N = 1 over time with N, vs N;
* ``e2e_tokens_per_s``: HF ``generate`` decode tokens/s vs prompt length.

Ops plots show the first model of the results (Llama-3-8B in the standard sweeps), the
smallest kept fraction, one panel per batch size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from .common import load_results  # noqa: E402


def provenance(results: dict, rows: list[dict], data_files) -> tuple[str, str]:
    """``(title line, caption)`` naming the device, date, commit, command of ``rows``' runs."""
    runs = [results["runs"][index] for index in sorted({row["run"] for row in rows})]
    device = runs[0]["device"]
    path = runs[0].get("ops_path")
    label = (
        f"{device} ({'Triton kernels' if path == 'triton' else 'torch reference path'})"
        if path
        else device
    )
    dates = ", ".join(sorted({run["date"] for run in runs}))
    commits = ", ".join(sorted({run["commit"] for run in runs}))
    commands = "; ".join(dict.fromkeys(run["command"] for run in runs))
    caption = f"command: {commands}\ndata: {', '.join(str(p) for p in data_files)}"
    return f"{label}\n{dates}, commit {commits}", caption


def ok_rows(results, **fields) -> list[dict]:
    return [
        row
        for row in results["rows"]
        if row["status"] == "ok" and all(row.get(key) == value for key, value in fields.items())
    ]


def ops_focus(results) -> tuple[str | None, float | None, list[int]]:
    """Model, kept fraction and batch sizes the ops plots show."""
    rows = ok_rows(results, suite="ops")
    if not rows:
        return None, None, []
    model = rows[0]["model"]
    kept = min(row["kept"] for row in rows if row["kept"] is not None)
    batches = sorted({row["B"] for row in rows if row["model"] == model})
    return model, kept, batches


def contexts(rows) -> list[int]:
    return sorted({row["T"] for row in rows})


def series(rows, x="T", y="median_ms"):
    points = sorted((row[x], row[y]) for row in rows)
    return [p[0] for p in points], [p[1] for p in points]


def figure(panels: int, what: str, results, rows, data_files):
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.4), squeeze=False)
    title, caption = provenance(results, rows, data_files)
    fig.suptitle(f"{what}\n{title}", fontsize=10)
    fig.text(0.01, 0.01, caption, fontsize=6.5, family="monospace", va="bottom")
    return fig, axes[0]


def finish(fig, path: Path) -> Path:
    fig.tight_layout(rect=(0, 0.09, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tokens_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def context_axis(ax, ylabel, contexts):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(contexts, [tokens_label(n) for n in contexts])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("context T (tokens)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def plot_decode_latency(results, data_files, path):
    model, kept, batches = ops_focus(results)
    lines = [
        ("sdpa-full", "SDPA, full cache", {}),
        ("sdpa-compacted", "SDPA, compacted cache", {"kept": kept}),
        ("chunkkv", "sparse_decode (in place)", {"kept": kept}),
        ("flex-block-mask", "FlexAttention block mask", {"kept": kept}),
    ]
    used = ok_rows(results, op="sparse_decode", model=model)
    if not used:
        return None
    fig, axes = figure(
        len(batches),
        f"Decode attention latency, {model}, {kept:.0%} kept",
        results,
        used,
        data_files,
    )
    for ax, batch in zip(axes, batches):
        for impl, label, extra in lines:
            rows = ok_rows(results, op="sparse_decode", impl=impl, model=model, B=batch, **extra)
            if rows:
                ax.plot(*series(rows), marker="o", label=label)
        ax.set_title(f"B = {batch}", fontsize=9)
        context_axis(ax, "time per decode step, one layer (ms)", contexts(used))
    return finish(fig, path)


def plot_compress_vs_floor(results, data_files, path):
    model, kept, batches = ops_focus(results)
    used = ok_rows(results, op="compress", model=model, kept=kept)
    if not used:
        return None
    fig, axes = figure(
        len(batches), f"compress, one layer, {model}, {kept:.0%} kept", results, used, data_files
    )
    for ax, batch in zip(axes, batches):
        ours = ok_rows(results, op="compress", impl="chunkkv", model=model, B=batch, kept=kept)
        peer = ok_rows(
            results, op="compress", impl="torch-materialized", model=model, B=batch, kept=kept
        )
        if ours:
            ax.plot(*series(ours), marker="o", label="ChunkKV compress")
            ax.plot(
                *series(ours, y="floor_ms"),
                linestyle="--",
                color="black",
                label="floor: bytes / measured copy bandwidth",
            )
        if peer:
            ax.plot(*series(peer), marker="s", label="torch, materialized window logits")
        ax.set_title(f"B = {batch}", fontsize=9)
        context_axis(ax, "time (ms)", contexts(used))
    return finish(fig, path)


def plot_bandwidth_util(results, data_files, path):
    model, kept, batches = ops_focus(results)
    ops = ("window_scores", "chunk_sum", "gather_chunks", "compress", "sparse_decode")
    used = [
        row
        for row in ok_rows(results, impl="chunkkv", model=model)
        if row["op"] in ops and row["kept"] in (None, kept)
    ]
    if not used:
        return None
    fig, axes = figure(
        len(batches),
        f"Memory-bandwidth use (floor time / time), {model}",
        results,
        used,
        data_files,
    )
    for ax, batch in zip(axes, batches):
        for op in ops:
            rows = [row for row in used if row["op"] == op and row["B"] == batch]
            if rows:
                ax.plot(*series(rows, y="bandwidth_util"), marker="o", label=op)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="copy bandwidth")
        ax.set_title(f"B = {batch}, {kept:.0%} kept", fontsize=9)
        context_axis(ax, "fraction of copy bandwidth", contexts(used))
    return finish(fig, path)


def plot_reuse_speedup(results, data_files, path):
    model, _, batches = ops_focus(results)
    used = ok_rows(results, op="compress_layers", model=model)
    if not used:
        return None
    fig, axes = figure(
        len(batches),
        f"Layer-wise index reuse, {model}, {used[0]['layers']} layers",
        results,
        used,
        data_files,
    )
    for ax, batch in zip(axes, batches):
        for seq_len in sorted({row["T"] for row in used if row["B"] == batch}):
            rows = {row["reuse"]: row for row in used if row["B"] == batch and row["T"] == seq_len}
            if 1 in rows:
                reuse = sorted(rows)
                ax.plot(
                    reuse,
                    [rows[1]["median_ms"] / rows[n]["median_ms"] for n in reuse],
                    marker="o",
                    label=f"T = {tokens_label(seq_len)}",
                )
        if 1 in rows:  # the byte floors' ratio: the speed-up of a memory-bound implementation
            ax.plot(
                reuse,
                [rows[1]["floor_bytes"] / rows[n]["floor_bytes"] for n in reuse],
                linestyle="--",
                color="black",
                label=f"floor bytes ratio, T = {tokens_label(seq_len)}",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(
            sorted({row["reuse"] for row in used}),
            [str(n) for n in sorted({row["reuse"] for row in used})],
        )
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("reuse N (layers sharing one selection)")
        ax.set_ylabel("speed-up over N = 1")
        ax.set_title(f"B = {batch}, {used[0]['kept']:.0%} kept", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return finish(fig, path)


def plot_e2e_tokens(results, data_files, path):
    used = ok_rows(results, suite="e2e")
    if not used:
        return None
    batches = sorted({row["B"] for row in used})
    fig, axes = figure(
        len(batches),
        f"HF generate decode throughput, {used[0]['model']}",
        results,
        used,
        data_files,
    )
    for ax, batch in zip(axes, batches):
        configs = sorted(
            {(row["impl"], row["reuse"]) for row in used if row["B"] == batch},
            key=lambda c: (c[0] != "hf-full", c[0], c[1] or 0),
        )
        for impl, reuse in configs:
            rows = [
                row
                for row in used
                if row["B"] == batch and row["impl"] == impl and row["reuse"] == reuse
            ]
            label = impl if reuse is None else f"{impl}, reuse N={reuse}"
            ax.plot(*series(rows, y="decode_tokens_per_s"), marker="o", label=label)
        ax.set_title(f"B = {batch}", fontsize=9)
        context_axis(ax, "decode tokens / s", contexts(used))
        ax.set_xlabel("prompt length (tokens)")
    return finish(fig, path)


PLOTS = {
    "decode_latency": plot_decode_latency,
    "compress_vs_floor": plot_compress_vs_floor,
    "bandwidth_util": plot_bandwidth_util,
    "reuse_speedup": plot_reuse_speedup,
    "e2e_tokens_per_s": plot_e2e_tokens,
}


def make_plots(data_files, out_dir) -> list[Path]:
    results = load_results(*data_files)
    slug = results["runs"][0]["device_slug"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, plot in PLOTS.items():
        path = plot(results, data_files, out_dir / f"{slug}_{name}.png")
        print(f"{name}: {path or 'no rows, skipped'}")
        if path:
            written.append(path)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results JSON files of one device")
    parser.add_argument("--out-dir", default="benchmarks/plots")
    args = parser.parse_args(argv)
    make_plots(args.results, args.out_dir)


if __name__ == "__main__":
    main()

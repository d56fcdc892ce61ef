"""Performance-regression check: fail when a row is slower than the device's baseline.

    python -m benchmarks.compare NEW.json [MORE.json ...] --threshold 0.10 [--baseline PATH]

Rows are matched by ``id``. A row of this package (``impl`` starting with ``chunkkv``; with
``--all``, the peers too) fails when one of its times (``median_ms``, ``prefill_ms``,
``decode_ms_per_step``) exceeds the baseline's by more than ``threshold`` (0.10 = 10 %), or
when it measured in the baseline and now errors or runs out of memory. Rows skipped for time,
and rows the baseline lacks, are listed but never fail. Exit status: 0 pass, 1 regression,
2 the comparison cannot be made (no baseline, another device).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import BASELINES, load_results

TIMES = ("median_ms", "prefill_ms", "decode_ms_per_step")  # lower is better


def device_of(results: dict, what: str) -> str:
    slugs = {run["device_slug"] for run in results["runs"]}
    if len(slugs) != 1:
        raise SystemExit(f"{what} mixes devices {sorted(slugs)}; compare one device at a time")
    return slugs.pop()


def compare(new: dict, baseline: dict, threshold: float, all_impls: bool = False) -> dict:
    """``{"regressions", "compared", "not_measured", "new_rows"}``: lists of
    ``(id, time, baseline, new, ratio or reason)``."""
    base_rows = {row["id"]: row for row in baseline["rows"] if row["status"] == "ok"}
    report = {"regressions": [], "compared": [], "not_measured": [], "new_rows": []}
    for row in new["rows"]:
        if not (all_impls or row["impl"].startswith("chunkkv")):
            continue
        base = base_rows.get(row["id"])
        if base is None:
            report["new_rows"].append((row["id"], None, None, None, row["status"]))
        elif row["status"] == "skipped":
            report["not_measured"].append((row["id"], None, None, None, row.get("note", "")))
        elif row["status"] != "ok":
            report["regressions"].append(
                (row["id"], None, None, None, f"{row['status']}: {row.get('note', '')}")
            )
        else:
            for time in TIMES:
                if row.get(time) is None or base.get(time) is None:
                    continue
                entry = (row["id"], time, base[time], row[time], row[time] / base[time])
                report["compared"].append(entry)
                if row[time] > base[time] * (1 + threshold):
                    report["regressions"].append(entry)
    return report


def format_entry(entry) -> str:
    row_id, time, base, new, ratio = entry
    if time is None:
        return f"  {row_id}: {ratio}"
    return f"  {row_id} [{time}]: {base:.4g} -> {new:.4g} ms (x{ratio:.2f})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results JSON files of one device")
    parser.add_argument(
        "--threshold",
        type=float,
        required=True,
        help="allowed slowdown, as a fraction (0.10: fail above +10 %%)",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="baseline JSON (default: benchmarks/baselines/<device>.json)",
    )
    parser.add_argument("--all", action="store_true", help="also compare the torch peers")
    parser.add_argument("--verbose", action="store_true", help="list every compared row")
    args = parser.parse_args(argv)
    if args.threshold < 0:
        parser.error(f"--threshold must be >= 0, got {args.threshold}")
    new = load_results(*args.results)
    device = device_of(new, "the new results")
    path = Path(args.baseline) if args.baseline else BASELINES / f"{device}.json"
    if not path.exists():
        print(f"compare: no baseline {path} for device {device}", file=sys.stderr)
        return 2
    baseline = load_results(path)
    if device_of(baseline, str(path)) != device:
        print(
            f"compare: {path} is a baseline of {device_of(baseline, str(path))}, the results "
            f"are from {device}",
            file=sys.stderr,
        )
        return 2
    report = compare(new, baseline, args.threshold, args.all)
    ratios = sorted(entry[4] for entry in report["compared"])
    print(
        f"compare: {len(report['compared'])} times against {path} (threshold +{args.threshold:.0%})"
    )
    if ratios:
        print(
            f"  new / baseline: best x{ratios[0]:.2f}, median x{ratios[len(ratios) // 2]:.2f}"
            f", worst x{ratios[-1]:.2f}"
        )
    if args.verbose:
        for entry in report["compared"]:
            print(format_entry(entry))
    for title in ("not_measured", "new_rows"):
        if report[title]:
            print(f"{title.replace('_', ' ')} ({len(report[title])}, not failing):")
            for entry in report[title][:20]:
                print(format_entry(entry))
    if report["regressions"]:
        print(f"REGRESSIONS ({len(report['regressions'])}):")
        for entry in report["regressions"]:
            print(format_entry(entry))
        return 1
    print("compare: no regression")
    return 0


if __name__ == "__main__":
    sys.exit(main())

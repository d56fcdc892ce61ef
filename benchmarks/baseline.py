"""Fold measured rows into the device's baseline, ``benchmarks/baselines/<device>.json``.

    python -m benchmarks.baseline NEW.json [MORE.json ...] [--out PATH]

A measured (``ok``) row replaces the baseline row with the same ``id``; rows that failed or
were skipped leave the baseline as it was. Runs no row refers to any more are dropped, so
every baseline number still names its device, date, commit and command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import BASELINES, SCHEMA, load_results
from .compare import device_of


def fold(baseline: dict, new: dict) -> dict:
    measured = {row["id"]: row for row in new["rows"] if row["status"] == "ok"}
    kept = [(baseline, row) for row in baseline["rows"] if row["id"] not in measured]
    rows_by_source = kept + [(new, row) for row in measured.values()]
    runs, run_index, rows = [], {}, []
    for source, row in rows_by_source:
        key = (id(source), row["run"])
        if key not in run_index:
            run_index[key] = len(runs)
            runs.append(source["runs"][row["run"]])
        rows.append({**row, "run": run_index[key]})
    return {"schema": SCHEMA, "runs": runs, "rows": rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results JSON files of one device")
    parser.add_argument(
        "--out",
        default=None,
        help="baseline to update (default: benchmarks/baselines/<device>.json)",
    )
    args = parser.parse_args(argv)
    new = load_results(*args.results)
    device = device_of(new, "the new results")
    path = Path(args.out) if args.out else BASELINES / f"{device}.json"
    baseline = load_results(path) if path.exists() else {"schema": SCHEMA, "runs": [], "rows": []}
    if baseline["runs"] and device_of(baseline, str(path)) != device:
        raise SystemExit(f"{path} is a baseline of another device than {device}")
    merged = fold(baseline, new)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=1) + "\n")
    print(f"baseline {path}: {len(merged['rows'])} rows from {len(merged['runs'])} runs")


if __name__ == "__main__":
    main()

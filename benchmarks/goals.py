"""The performance goals of issue 8, measured against target, from results files.

    python -m benchmarks.goals OPS.json [E2E.json ...]

Llama-3-8B shape (Hq 32, Hkv 8, D 128), bfloat16, c = 10, w = 32, 10 % kept. A goal whose rows
were not measured (another device's shapes, a skipped or failed row) reads ``missing``.
"""

from __future__ import annotations

import argparse
import operator
from dataclasses import dataclass

from .common import load_results, row_id

MODEL = "llama3-8b"
E2E_MODEL = "llama3-8b-random"
DTYPE = "bfloat16"
KEPT = 0.1
DECODE_SHAPES = [(b, t) for t in (8192, 32768, 131072) for b in (1, 8, 32)]


def ops_id(op, impl, batch, seq_len, kept=KEPT, reuse=None) -> str:
    return row_id(
        suite="ops",
        op=op,
        impl=impl,
        model=MODEL,
        B=batch,
        T=seq_len,
        dtype=DTYPE,
        kept=kept,
        reuse=reuse,
    )


def e2e_id(impl, batch, seq_len, reuse=None) -> str:
    return row_id(
        suite="e2e",
        impl=impl,
        model=E2E_MODEL,
        B=batch,
        T=seq_len,
        dtype=DTYPE,
        kept=None if impl == "hf-full" else KEPT,
        reuse=reuse,
    )


@dataclass
class Goal:
    name: str
    shape: str
    target: str
    measured: float | None
    passed: bool | None
    why_missing: str = ""


class Rows:
    def __init__(self, rows):
        self.by_id = {row["id"]: row for row in rows}

    def value(self, row_id_: str, field: str):
        """``(value, None)``, or ``(None, why)`` when the row has no measurement."""
        row = self.by_id.get(row_id_)
        if row is None:
            return None, "not measured"
        if row["status"] != "ok":
            return None, row["status"]
        return row[field], None

    def ratio(self, numerator: tuple, denominator: tuple):
        top, why = self.value(*numerator)
        bottom, why_bottom = self.value(*denominator)
        if why or why_bottom:
            return None, why or why_bottom
        return top / bottom, None


def goal(name, shape, target_text, limit, compare, measured) -> Goal:
    value, why = measured
    passed = None if value is None else compare(value, limit)
    return Goal(name, shape, target_text, value, passed, why or "")


def evaluate(rows) -> list[Goal]:
    rows = rows if isinstance(rows, Rows) else Rows(rows)
    le, ge = operator.le, operator.ge
    compress = ops_id("compress", "chunkkv", 1, 32768)
    goals = [
        goal(
            "compress time / HBM floor",
            "B1 T32K",
            "<= 2.0",
            2.0,
            le,
            rows.value(compress, "time_over_floor"),
        ),
        goal(
            "compress speed-up vs materializing torch",
            "B1 T32K",
            ">= 20",
            20.0,
            ge,
            rows.ratio(
                (ops_id("compress", "torch-materialized", 1, 32768), "median_ms"),
                (compress, "median_ms"),
            ),
        ),
        goal(
            "reuse N=4 vs N=1 compress speed-up",
            "B1 T32K, 8 layers",
            ">= 3",
            3.0,
            ge,
            rows.ratio(
                (ops_id("compress_layers", "chunkkv", 1, 32768, reuse=1), "median_ms"),
                (ops_id("compress_layers", "chunkkv", 1, 32768, reuse=4), "median_ms"),
            ),
        ),
    ]
    for batch, seq_len in DECODE_SHAPES:
        shape = f"B{batch} T{seq_len // 1024}K"
        sparse = ops_id("sparse_decode", "chunkkv", batch, seq_len)
        goals.append(
            goal(
                "sparse_decode copy-bandwidth use",
                shape,
                ">= 80%",
                0.8,
                ge,
                rows.value(sparse, "bandwidth_util"),
            )
        )
        goals.append(
            goal(
                "sparse_decode time / compacted SDPA",
                shape,
                "<= 1.05",
                1.05,
                le,
                rows.ratio(
                    (sparse, "median_ms"),
                    (ops_id("sparse_decode", "sdpa-compacted", batch, seq_len), "median_ms"),
                ),
            )
        )
        if seq_len == 32768:
            goals.append(
                goal(
                    "sparse_decode speed-up vs full SDPA",
                    shape,
                    ">= 7",
                    7.0,
                    ge,
                    rows.ratio(
                        (
                            ops_id("sparse_decode", "sdpa-full", batch, seq_len, kept=None),
                            "median_ms",
                        ),
                        (sparse, "median_ms"),
                    ),
                )
            )
    for batch in (1, 4):
        shape = f"B{batch} T32K"
        for mode in ("evict", "sparse"):
            goals.append(
                goal(
                    f"HF generate decode tok/s, {mode} vs FullKV",
                    shape,
                    ">= 1.5",
                    1.5,
                    ge,
                    rows.value(e2e_id(f"chunkkv-{mode}", batch, 32768, reuse=1), "decode_speedup"),
                )
            )
        goals.append(
            goal(
                "HF generate KV bytes, evict / FullKV",
                shape,
                "<= 11%",
                0.11,
                le,
                rows.value(e2e_id("chunkkv-evict", batch, 32768, reuse=1), "kv_fraction"),
            )
        )
    return goals


def needed_ids() -> set[str]:
    """The id of every row some goal reads (what ``--preset goals`` of the sweeps measures)."""

    class Recorded(dict):
        def get(self, key, default=None):
            seen.add(key)
            return default

    seen: set[str] = set()
    rows = Rows([])
    rows.by_id = Recorded()
    evaluate(rows)
    return seen


def format_value(goal_: Goal) -> str:
    if goal_.measured is None:
        return "-"
    return f"{goal_.measured:.1%}" if goal_.target.endswith("%") else f"{goal_.measured:.2f}"


def table(goals: list[Goal]) -> str:
    lines = ["| goal | shape | measured | target | result |", "| --- | --- | --- | --- | --- |"]
    for g in goals:
        result = (
            ("PASS" if g.passed else "FAIL")
            if g.passed is not None
            else (f"missing ({g.why_missing})")
        )
        lines.append(f"| {g.name} | {g.shape} | {format_value(g)} | {g.target} | {result} |")
    passed = sum(g.passed is True for g in goals)
    failed = sum(g.passed is False for g in goals)
    lines.append(f"\n{passed} pass, {failed} fail, {len(goals) - passed - failed} missing")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results JSON files")
    args = parser.parse_args(argv)
    results = load_results(*args.results)
    devices = sorted({run["device"] for run in results["runs"]})
    print(
        f"Goals (issue 8) on {', '.join(devices)}; Llama-3-8B shape, {DTYPE}, c 10, w 32, "
        f"{KEPT:.0%} kept\n"
    )
    print(table(evaluate(results["rows"])))


if __name__ == "__main__":
    main()

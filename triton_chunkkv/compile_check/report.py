"""The compile report: one entry per compiled kernel variant, its rules and its diff.

A report is JSON with one variant per line, sorted by id, so that ``git diff`` shows exactly
the variants whose registers, local memory (spills) or shared memory changed. Compile times (CPU
seconds, ptxas included, of a cold compile) sit in their own block at the end: they vary a
little run to run, the resources do not.
"""

from __future__ import annotations

import json
from pathlib import Path

import triton

from .aot import MAX_SHARED_BYTES, TARGET

REPORT_DIR = Path(__file__).resolve().parent.parent.parent / "benchmarks" / "compile_reports"
RESOURCE_FIELDS = ("registers", "spill_bytes", "shared_bytes", "dot")
SIXTEEN_BIT = ("bf16", "fp16")


def default_report_path(version: str | None = None) -> Path:
    return REPORT_DIR / f"sm{TARGET.arch}-triton-{version or triton.__version__}.json"


def violations(entry: dict) -> list[str]:
    """Why this variant fails the check: a compile error, shared memory over the sm_90 limit,
    or any spill (local memory) in a 16-bit variant with head dim <= 128."""
    if "error" in entry:
        return [f"compile error: {entry['error']}"]
    found = []
    if entry["shared_bytes"] > MAX_SHARED_BYTES:
        found.append(f"shared memory {entry['shared_bytes']} B > {MAX_SHARED_BYTES} B")
    small_head = entry["head_dim"] is None or entry["head_dim"] <= 128
    if entry["spill_bytes"] > 0 and entry["dtype"] in SIXTEEN_BIT and small_head:
        found.append(f"spills: {entry['spill_bytes']} B of local memory per thread")
    return found


def resource_text(entry: dict) -> str:
    if "error" in entry:
        return "error"
    return (
        f"{entry['registers']} regs, {entry['spill_bytes']} B spilled, "
        f"{entry['shared_bytes']} B shared, {entry['dot']}"
    )


def differences(entries: list[dict], committed: dict) -> list[str]:
    """Lines naming each variant whose resources differ from the committed report's (or that
    the committed report lacks)."""
    before = {entry["id"]: entry for entry in committed.get("variants", [])}
    lines = []
    for entry in entries:
        old = before.get(entry["id"])
        if old is None:
            lines.append(f"new      {entry['id']}: {resource_text(entry)}")
        elif any(old.get(f) != entry.get(f) for f in RESOURCE_FIELDS) or "error" in entry:
            lines.append(f"changed  {entry['id']}: {resource_text(old)} -> {resource_text(entry)}")
    return lines


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def write(path: Path, meta: dict, entries: list[dict], previous: dict) -> None:
    """``entries`` merged into ``previous`` (a subset run keeps the other variants), sorted."""
    merged = {entry["id"]: entry for entry in previous.get("variants", [])}
    seconds = dict(previous.get("compile_seconds", {}))
    for entry in entries:
        merged[entry["id"]] = {k: v for k, v in entry.items() if k != "compile_s"}
        seconds[entry["id"]] = round(entry["compile_s"], 1)
    lines = ["{"]
    for name, value in meta.items():
        lines.append(f"  {json.dumps(name)}: {json.dumps(value)},")
    lines.append('  "variants": [')
    rows = [json.dumps(merged[key], sort_keys=True) for key in sorted(merged)]
    lines.append(",\n".join(f"    {row}" for row in rows))
    lines.append("  ],")
    lines.append('  "compile_seconds": {')
    rows = [f"    {json.dumps(key)}: {seconds[key]}" for key in sorted(seconds) if key in merged]
    lines.append(",\n".join(rows))
    lines.append("  }")
    lines.append("}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def estimated_compile_time(ids) -> str:
    """The compile time of variants ``ids`` by the committed report of this Triton (CPU seconds
    of a cold compile where the report was made; variants it lacks at its mean)."""
    seconds = load(default_report_path()).get("compile_seconds", {})
    if not seconds:
        return "no committed compile report for this Triton to estimate their compile time"
    mean = sum(seconds.values()) / len(seconds)
    known = [seconds.get(variant) for variant in ids]
    total = sum(mean if s is None else s for s in known)
    missing = sum(s is None for s in known)
    return (
        f"{total:.0f} CPU s of compile by the committed report "
        f"({missing} of them not in it, counted at its mean {mean:.1f} s)"
    )


def summary_markdown(reports: list[dict]) -> str:
    """Per kernel and report: variants, compile time, the largest resources, and every
    variant that spills."""
    out = []
    for report in reports:
        variants = report["variants"]
        seconds = report.get("compile_seconds", {})
        out.append(
            f"### triton {report['triton']} (ptxas {report['ptxas']}), {report['date']}, "
            f"commit {report['commit']}\n"
        )
        out.append(
            f"`{report['command']}`: {len(variants)} variants, "
            f"{sum(seconds.values()):.0f} s of compile in all.\n"
        )
        out.append(
            "| kernel | variants | compile s (sum / max) | max registers | max shared B | "
            "spilling variants |"
        )
        out.append("| --- | --- | --- | --- | --- | --- |")
        for kernel in sorted({v["kernel"] for v in variants}):
            mine = [v for v in variants if v["kernel"] == kernel and "error" not in v]
            times = [seconds.get(v["id"], 0.0) for v in mine]
            spills = sum(v["spill_bytes"] > 0 for v in mine)
            out.append(
                f"| `{kernel}` | {len(mine)} | {sum(times):.0f} / {max(times):.1f} | "
                f"{max(v['registers'] for v in mine)} | "
                f"{max(v['shared_bytes'] for v in mine)} | {spills} |"
            )
        spilling = [v for v in variants if v.get("spill_bytes", 0) > 0]
        if spilling:
            out.append("\nSpilling variants (local memory per thread):\n")
            for v in spilling:
                out.append(
                    f"- `{v['id']}`: {v['spill_bytes']} B, {v['registers']} registers, "
                    f"{seconds.get(v['id'], 0.0):.1f} s"
                )
        errors = [v for v in variants if "error" in v]
        for v in errors:
            out.append(f"- error `{v['id']}`: {v['error']}")
        out.append("")
    return "\n".join(out)

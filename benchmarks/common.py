"""What every benchmark shares: the device and provenance of a run, the timer, the copy
bandwidth, and the results file.

Results file (JSON)::

    {"schema": 1,
     "runs": [{"device", "device_slug", "date", "commit", "command", "timer", ...}],
     "rows": [{"id", "suite", "run", "status", ...measurements}]}

``run`` indexes ``runs``, so a baseline folded together from several runs still says where
each number came from. ``id`` names what was measured (op, implementation, shape) and is what
:mod:`benchmarks.compare` matches on; ``status`` is ``ok``, ``oom``, ``error`` or ``skipped``.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from triton_chunkkv.provenance import device_name, git_commit

SCHEMA = 1
ROOT = Path(__file__).resolve().parent.parent
BASELINES = Path(__file__).resolve().parent / "baselines"


# ---------------------------------------------------------------------------------------------
# Device and provenance
# ---------------------------------------------------------------------------------------------


def sweep_arguments(parser, presets: dict, what: str) -> None:
    """The options every sweep script takes: preset, output, device, threads, time budget."""
    parser.add_argument(
        "--preset",
        default=None,
        choices=sorted(presets),
        help=f"{what} (default: gpu on CUDA, cpu otherwise)",
    )
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if any)")
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch threads on a CPU")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds after which the remaining rows are skipped",
    )


def pick_device(name: str | None, cpu_threads: int = 1) -> torch.device:
    """The device to measure on (default: CUDA if any). On a CPU, torch uses ``cpu_threads``
    threads: one thread gives steadier numbers on a shared machine than spinning workers."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads)
    return device


def device_slug(device: torch.device) -> str:
    """File-name form of the device: ``cpu`` or the GPU's name (``NVIDIA_H100_80GB_HBM3``)."""
    if device.type == "cuda":
        from triton_chunkkv.ops._runtime import gpu_name

        return gpu_name()
    return "cpu"


def run_meta(device: torch.device, module: str, argv, timer: str, **extra) -> dict:
    """Provenance of one run: what ran where, when, from which commit, timed how."""
    import triton

    meta = {
        "device": device_name(device),
        "device_slug": device_slug(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "command": shlex.join(["python", "-m", module, *argv]),
        "timer": timer,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    if device.type == "cpu":
        # Other processes on a shared CPU slow the numbers down: say how busy it was.
        meta["load_average_at_start"] = round(os.getloadavg()[0], 2)
    meta.update(extra)
    return meta


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer_description(device: torch.device) -> str:
    if device.type == "cuda":
        return (
            "triton.testing.do_bench (CUDA events, L2 flushed before each call, "
            "25 ms warm-up, 100 ms of timed calls, median)"
        )
    return "time.perf_counter per call after one warm-up call per input set, median"


def time_ms(
    fn,
    input_sets,
    device: torch.device,
    min_reps: int = 5,
    min_time_s: float = 0.2,
    max_reps: int = 200,
) -> dict:
    """Median, 20th and 80th percentile milliseconds of ``fn(inputs)``, cycling through
    ``input_sets`` so that consecutive calls do not find their inputs in cache."""
    sets = itertools.cycle(input_sets)
    if device.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(
            lambda: fn(next(sets)), warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]
        )
        return {"median_ms": p50, "p20_ms": p20, "p80_ms": p80}
    for inputs in input_sets:
        fn(inputs)
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (
        time.perf_counter() - start < min_time_s and len(times) < max_reps
    ):
        inputs = next(sets)
        begin = time.perf_counter()
        fn(inputs)
        times.append((time.perf_counter() - begin) * 1e3)
    p20, p50, p80 = statistics.quantiles(times, n=10, method="inclusive")[1:8:3]
    return {"median_ms": p50, "p20_ms": p20, "p80_ms": p80, "reps": len(times)}


def copy_bandwidth(device: torch.device, nbytes: int, **timer_options) -> float:
    """Bytes per second of a device-to-device copy (read + write counted), measured now."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)  # ones: no zero-page tricks
    dst = torch.empty_like(src)
    median_ms = time_ms(lambda _: dst.copy_(src), [None], device, **timer_options)["median_ms"]
    return 2 * nbytes / (median_ms / 1e3)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def error_note(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Results files
# ---------------------------------------------------------------------------------------------


class ResultsWriter:
    """One run's results, rewritten after every row so that a run cut short (device time
    limit) still leaves everything it measured."""

    def __init__(self, path, meta: dict):
        self.path = Path(path)
        self.data = {"schema": SCHEMA, "runs": [meta], "rows": []}
        self.save()

    def add(self, row: dict) -> dict:
        row = {"run": 0, **row}
        self.data["rows"].append(row)
        self.save()
        return row

    def finish(self, device: torch.device, start: float) -> None:
        meta = self.data["runs"][0]
        meta["elapsed_s"] = round(time.perf_counter() - start, 1)
        if device.type == "cpu":
            meta["load_average_at_end"] = round(os.getloadavg()[0], 2)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)


def load_results(*paths) -> dict:
    """The runs and rows of several results files as one (``run`` indices renumbered)."""
    merged = {"schema": SCHEMA, "runs": [], "rows": []}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if data.get("schema") != SCHEMA:
            raise ValueError(f"{path}: results schema {data.get('schema')!r}, expected {SCHEMA}")
        offset = len(merged["runs"])
        merged["runs"].extend(data["runs"])
        merged["rows"].extend({**row, "run": row["run"] + offset} for row in data["rows"])
    return merged


def row_id(**fields) -> str:
    """Stable name of a measured case: ``key=value`` pairs, ``None`` fields left out."""
    return " ".join(f"{key}={value}" for key, value in fields.items() if value is not None)


def argv_or_sys(argv) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)

"""``python -m triton_chunkkv.compile_check``: compile the kernels for sm_90 without a GPU.

    python -m triton_chunkkv.compile_check                 # CI subset, check + diff
    python -m triton_chunkkv.compile_check --full --write  # whole matrix, update the report
    python -m triton_chunkkv.compile_check --count         # record only: how many compiles
    python -m triton_chunkkv.compile_check --summary docs/COMPILE_REPORT.md

Exit status: 0 when every compiled variant passes the rules of :func:`.report.violations`,
1 otherwise, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import functools
import multiprocessing
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m triton_chunkkv.compile_check",
        description="Compile every kernel for sm_90 without a GPU and check its resources.",
    )
    parser.add_argument("--full", action="store_true", help="the whole matrix, not the CI subset")
    parser.add_argument(
        "-j", "--jobs", type=int, default=os.cpu_count(), help="compile processes (default: cores)"
    )
    parser.add_argument("--count", action="store_true", help="record the compiles, compile none")
    parser.add_argument(
        "--write", action="store_true", help="merge this run's variants into the report"
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="compile into a fresh Triton cache (timings of a cold start; --write implies it)",
    )
    parser.add_argument("--report", type=Path, default=None, help="report JSON to compare/write")
    parser.add_argument(
        "--summary",
        type=Path,
        default=None,
        help="only write the Markdown summary of the committed reports (docs/COMPILE_REPORT.md)",
    )
    parser.add_argument(
        "--ops",
        nargs="+",
        default=None,
        help="only these ops' variants (e.g. after a kernel change)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print every variant")
    return parser.parse_args(argv)


def ensure_compiled_kernels(argv) -> None:
    """Triton decides at definition time whether the kernels are interpreted: re-run this
    module with ``TRITON_INTERPRET=0`` if it was set (as the test suite sets it)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        command = [sys.executable, "-m", "triton_chunkkv.compile_check", *argv]
        os.execve(sys.executable, command, env)


def kept_entries(args, committed: dict, entries: list[dict]) -> dict:
    """What of the committed report a ``--write`` keeps: everything for a subset run (it only
    updates its variants); for ``--full``, nothing, or with ``--ops`` the other kernels'
    variants (the run replaces its kernels' variants, dropping those of removed configs)."""
    if not args.full:
        return committed
    if args.ops is None:
        return {}
    replaced = {entry["id"].split()[0] for entry in entries}
    variants = [v for v in committed.get("variants", []) if v["id"].split()[0] not in replaced]
    return {**committed, "variants": variants}


def calls_for(args):
    from . import variants

    calls = variants.full_matrix() if args.full else variants.ci_subset()
    return [call for call in calls if args.ops is None or call.op in args.ops]


def record(calls):
    """The deduplicated compile jobs of ``calls`` (nothing compiled)."""
    from triton_chunkkv.ops._runtime import TUNED_KERNELS, environment

    from .aot import LaunchRecorder, recording_launches

    autotuners = [tuner for kernel in TUNED_KERNELS.values() for tuner in kernel.autotuners()]
    recorder = LaunchRecorder()
    with recording_launches(recorder):
        for call in calls:
            for autotuner in autotuners:  # each call records every config, tuned before or not
                autotuner.cache.clear()
            recorder.label = call.label
            recorder.dtype = call.dtype
            recorder.head_dim = None if call.op in ("chunk_sum", "select_chunks") else call.head_dim
            one = {"TRITON_CHUNKKV_ONE_CONFIG": "1" if call.first_config_only else "0"}
            with environment(one):
                call.launch()
    return recorder


DERIVED = {"HEAD_DIM", "HEAD_DIM_PAD", "BLOCK_D", "DOT_IN_FP32", "DOT_PRECISION"}


def describe(job) -> dict:
    """The report's fields of a job: a readable, stable id and what it was compiled for."""
    from triton_chunkkv.ops._runtime import TUNED_KERNELS

    tuned = TUNED_KERNELS.get(job.name)
    tuned_names = set(tuned.configs[0].kwargs) if tuned else set()
    constexprs = {p.name for p in job.kernel().params if p.is_constexpr}
    flags = [
        f"{name}={int(value) if isinstance(value, bool) else value}"
        for name, value in sorted(job.kwargs.items())
        if name in constexprs and name not in tuned_names and name not in DERIVED
    ]
    config = [f"{name}={job.kwargs[name]}" for name in sorted(tuned_names)]
    config += [f"w{job.kwargs['num_warps']}", f"s{job.kwargs['num_stages']}"]
    head = f"D{job.head_dim}" if job.head_dim else "-"
    return {
        "id": " ".join([job.name, job.dtype or "-", head, *flags, "|", *config]),
        "kernel": job.name,
        "dtype": job.dtype,
        "head_dim": job.head_dim,
        "config": " ".join(config),
        "calls": sorted(job.labels),
    }


def describe_all(jobs) -> list[dict]:
    """:func:`describe` of each job; variants whose ids coincide (they differ in a runtime
    argument's specialization: a pointer's dtype, an int's divisibility by 16) get those
    differences appended, e.g. ``[chunk_idx_ptr=('*i64', 'D')]``."""
    described = [describe(job) for job in jobs]
    groups = {}
    for index, entry in enumerate(described):
        groups.setdefault(entry["id"], []).append(index)
    for indices in groups.values():
        if len(indices) == 1:
            continue
        keys = [dict(jobs[i].key[1]) for i in indices]
        differing = sorted(name for name in keys[0] if len({k[name] for k in keys}) > 1)
        for i, key in zip(indices, keys):
            described[i]["id"] += " [" + ", ".join(f"{n}={key[n]}" for n in differing) + "]"
    return described


@functools.cache
def _full_matrix_ids() -> dict:
    from . import variants

    jobs = sorted_jobs(record(variants.full_matrix()).jobs.values())
    return {job.key: entry["id"] for job, entry in zip(jobs, describe_all(jobs))}


def variant_ids(jobs) -> list[str]:
    """The report ids of ``jobs``: a variant of the full matrix has its id there whatever else
    is compiled with it (a subset run compares with the committed full report); the others
    are disambiguated among themselves."""
    known = _full_matrix_ids()
    others = [job for job in jobs if job.key not in known]
    other_ids = dict(zip((job.key for job in others), (e["id"] for e in describe_all(others))))
    return [known.get(job.key) or other_ids[job.key] for job in jobs]


def sorted_jobs(jobs) -> list:
    """A stable order: by id, then by Triton's key."""
    return sorted(jobs, key=lambda job: (describe(job)["id"], repr(job.key)))


def compile_all(jobs, workers: int, expected_seconds: dict, verbose: bool) -> list[dict]:
    """Compile ``jobs`` in ``workers`` processes, slowest first (by the committed seconds),
    and return the report entries in job order."""
    from .aot import compile_job
    from .report import resource_text, violations

    described = [dict(describe(job), id=name) for job, name in zip(jobs, variant_ids(jobs))]

    def expected(i):  # without a committed time: float32 compiles are the slow ones
        return expected_seconds.get(described[i]["id"], 3.0 if jobs[i].dtype == "fp32" else 1.0)

    order = sorted(range(len(jobs)), key=lambda i: (-expected(i), i))
    entries = [None] * len(jobs)
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)
    with contextlib.closing(_Shutdown(pool)):
        futures = {pool.submit(compile_job, jobs[i]): i for i in order}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            i = futures[future]
            entries[i] = {**described[i], **future.result()}
            bad = violations(entries[i])
            if verbose or bad:
                print(
                    f"[{done}/{len(jobs)}] {entries[i]['compile_s']:6.1f} s  {entries[i]['id']}: "
                    f"{resource_text(entries[i])}{'  FAIL: ' + '; '.join(bad) if bad else ''}",
                    flush=True,
                )
    return entries


class _Shutdown:
    """Closing it stops the pool without waiting for compiles nobody will read (an error or
    Ctrl-C in the parent)."""

    def __init__(self, pool):
        self.pool = pool

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


def run_meta(args, argv) -> dict:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version

    from .aot import MAX_SHARED_BYTES, TARGET

    ptxas = get_ptxas_version(TARGET.arch)  # "... Cuda compilation tools, release 12.8, ..."
    return {
        "target": f"{TARGET.backend} sm_{TARGET.arch}",
        "triton": triton.__version__,
        "ptxas": ptxas.split("release")[-1].split(",")[0].strip(),
        "max_shared_bytes": MAX_SHARED_BYTES,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "commit": _commit(),
        "command": shlex.join(["python", "-m", "triton_chunkkv.compile_check", *argv]),
        "machine": f"{os.cpu_count()} cores, {args.jobs} compile processes",
    }


def _commit() -> str:
    """Short commit (``+dirty`` with changes), or ``CHUNKKV_COMMIT`` where there is no .git."""
    if os.environ.get("CHUNKKV_COMMIT"):
        return os.environ["CHUNKKV_COMMIT"]
    root = Path(__file__).resolve().parent.parent.parent

    def git(*command):
        return subprocess.run(
            ["git", *command], cwd=root, check=True, capture_output=True, text=True
        ).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    ensure_compiled_kernels(argv)
    from . import report

    if args.summary:
        reports = [report.load(path) for path in sorted(report.REPORT_DIR.glob("*.json"))]
        args.summary.write_text(report.summary_markdown(reports))
        print(f"wrote {args.summary}")
        return 0
    start = time.perf_counter()
    recorder = record(calls_for(args))
    jobs = sorted_jobs(recorder.jobs.values())
    print(
        f"compile check: {len(jobs)} variants to compile for sm_90 "
        f"({recorder.launches} launches recorded in {time.perf_counter() - start:.1f} s)",
        flush=True,
    )
    if args.count:
        for name in variant_ids(jobs):
            print(name)
        return 0

    path = args.report or report.default_report_path()
    committed = report.load(path)
    cold = args.cold or args.write
    from triton_chunkkv.ops._runtime import environment

    with contextlib.ExitStack() as stack:
        if cold:
            cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="triton-cache-"))
            stack.enter_context(environment({"TRITON_CACHE_DIR": cache}))
        compile_start = time.perf_counter()
        entries = compile_all(jobs, args.jobs, committed.get("compile_seconds", {}), args.verbose)
        wall = time.perf_counter() - compile_start

    failed = [(entry, report.violations(entry)) for entry in entries]
    failed = [(entry, why) for entry, why in failed if why]
    total = sum(entry["compile_s"] for entry in entries)
    cache = (
        "a fresh Triton cache" if cold else os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache")
    )
    print(
        f"compiled {len(entries)} variants in {wall:.0f} s wall, {total:.0f} CPU s of compile "
        f"in {args.jobs} processes, into {cache}"
    )
    diff = report.differences(entries, committed)
    if not committed:
        print(f"no committed report at {path}: nothing to compare")
    elif diff:
        print(f"{len(diff)} variants differ from {path.name}:")
        print("\n".join(f"  {line}" for line in diff))
    else:
        print(f"resources as in {path.name}")
    if args.write:  # --full replaces the report; a subset run updates its own variants
        report.write(path, run_meta(args, argv), entries, kept_entries(args, committed, entries))
        print(f"wrote {path}")
    for entry, why in failed:
        print(f"FAIL {entry['id']}: {'; '.join(why)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

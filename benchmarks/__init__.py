"""Benchmarks, performance-regression check, goal table and plots for ``triton_chunkkv``.

Entry points (each ``--help`` explains its options):

* ``python -m benchmarks.ops``: op benchmarks with their torch peers and byte floors.
* ``python -m benchmarks.e2e``: HF ``generate`` with FullKV / ChunkKV evict / ChunkKV sparse.
* ``python -m benchmarks.compare``: fail when an op is slower than the device's baseline.
* ``python -m benchmarks.baseline``: fold a run into ``benchmarks/baselines/<device>.json``.
* ``python -m benchmarks.goals``: the GPU performance goals, measured vs target.
* ``python -m benchmarks.plots``: the PNG plots of a results file.
* ``python -m benchmarks.floors``: the bytes each op must move, per SPEC.

On CUDA the ops are the Triton kernels timed with ``triton.testing.do_bench``; on CPU they are
the torch reference timed with ``time.perf_counter`` medians (never the Triton interpreter,
whose times say nothing about the kernels). Every results file names its device, date, commit
and command.
"""

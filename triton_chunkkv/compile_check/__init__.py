"""Compile every kernel for the GPU (sm_90) on a machine without one, and check its resources.

``python -m triton_chunkkv.compile_check`` (CI, every run) compiles a representative subset:
every kernel x every autotune config, 16-bit at the head dims that matter and the float32
lists; ``--full`` the whole matrix of :mod:`.variants`. It fails (exit 1) on a compile error,
shared memory over the sm_90 limit, or any spill in a 16-bit variant with head dim <= 128, and
prints how the resources differ from the committed report
(``benchmarks/compile_reports/sm90-triton-<version>.json``; ``--write`` updates it).
``python -m benchmarks.precompile`` uses the same machinery to compile what the one-command GPU
run (``scripts/gpu_suite.sh``) launches into Triton's cache in parallel. See :mod:`.aot` for how
compiling without a GPU works.
"""

"""How many CTAs of a kernel are resident on one SM, from its resources (sm_90 rules), and the
resources of the kernels whose grids are sized by it.

An SM of compute capability 9.0 (H100 / H200) holds at most 32 resident blocks, 2048 threads
(64 warps), 65536 32-bit registers (allocated per warp in units of 256, so a warp of ``r``
registers per thread takes ``ceil(32 r / 256) * 256``) and 228 KB of shared memory, of which
each block also takes 1 KB reserved by the system (CUDA C++ Programming Guide, "Technical
Specifications per Compute Capability" and "Shared Memory" for 9.0). The L1 / shared-memory
split is assumed set for the kernel's needs, as the driver does when a kernel asks for more
than the default carve-out.

Resource tables come from the committed sm_90 compile reports
(``benchmarks/compile_reports/sm90-triton-<version>.json``: registers from ``cuobjdump
-res-usage``, shared memory from Triton's metadata), the maximum over the Triton versions CI
compiles with and over the cache layouts; ``tests/test_sparse_decode.py`` checks them against
the reports, so a kernel change that moves them fails until they are refreshed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SMLimits:
    registers: int = 65536
    register_unit: int = 256  # registers are allocated per warp in units of this many
    shared_bytes: int = 228 * 1024
    shared_reserved_per_block: int = 1024
    blocks: int = 32
    threads: int = 2048
    warp_size: int = 32


SM90 = SMLimits()


def ctas_per_sm(registers: int, shared_bytes: int, num_warps: int, limits: SMLimits = SM90) -> int:
    """Resident CTAs per SM of a kernel using ``registers`` per thread, ``shared_bytes`` of
    shared memory per CTA and ``num_warps`` warps (at least 1: a kernel that compiled runs)."""
    warp_registers = -(-registers * limits.warp_size // limits.register_unit) * limits.register_unit
    by_registers = limits.registers // (max(warp_registers, 1) * num_warps)
    by_shared = limits.shared_bytes // (shared_bytes + limits.shared_reserved_per_block)
    by_threads = limits.threads // (num_warps * limits.warp_size)
    return max(1, min(by_registers, by_shared, by_threads, limits.blocks))


# _sparse_decode_split_kernel, first config of its lists (what TRITON_CHUNKKV_ONE_CONFIG and
# the GPU tests run; the autotuner may pick another): 16-bit BLOCK_N 32, 4 warps, 2 stages;
# float32 BLOCK_N 32, 8 warps, 2 stages. {(element bytes, BLOCK_D, BLOCK_G): (registers,
# shared bytes)}, max over triton 3.6 / 3.9 and the dense / HF / slot layouts.
SPARSE_DECODE_DEFAULT_WARPS = {2: 4, 4: 8}
SPARSE_DECODE_RESOURCES = {
    (2, 64, 16): (76, 11392),
    (2, 64, 64): (112, 24704),
    (2, 128, 16): (117, 21632),
    (2, 128, 64): (168, 49280),
    (2, 256, 16): (155, 42112),
    (2, 256, 64): (255, 98432),
    (4, 64, 16): (67, 22720),
    (4, 64, 64): (128, 41344),
    (4, 128, 16): (80, 43200),
    (4, 128, 64): (255, 73856),
    (4, 256, 16): (80, 84160),
    (4, 256, 64): (32, 139648),
}


def sparse_decode_ctas_per_sm(element_bytes: int, block_d: int, block_g: int) -> int:
    """Resident CTAs per SM of the split-decode kernel's default config at these block sizes.
    A ``BLOCK_G`` between the compiled ones (16: one query per row of a GQA group up to 16;
    64: several queries at once) uses the next larger entry, an upper bound on its resources;
    shapes outside the table (no report entry) count 1, as if nothing else fit."""
    entries = sorted(key for key in SPARSE_DECODE_RESOURCES if key[:2] == (element_bytes, block_d))
    larger = [key for key in entries if key[2] >= block_g]
    if not larger:
        return 1
    resources = SPARSE_DECODE_RESOURCES[larger[0]]
    return ctas_per_sm(*resources, SPARSE_DECODE_DEFAULT_WARPS.get(element_bytes, 4))

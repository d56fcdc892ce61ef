"""One module per op: its Triton kernels, its unchecked dispatcher (``_op``: the kernel, or the
torch reference where no kernel runs) and its public, checked function, which ``ops``
re-exports. Compositions (policies, the cache core) call the dispatchers."""

"""A stand-in for ``sgl_kernel`` (SGLang's compiled kernels, which have no CPU build on the
package registry), put on the path of the Engine test's processes only.

SGLang imports a few of its ``*_cpu`` ops at module level (KV-cache moves, req-to-token
assignment, speculative-decoding helpers); a Llama served by the ``triton`` and ``chunkkv``
attention backends calls none of them. Every name imports; calling one raises, naming it, so a
code path that starts needing one fails loudly (give it a torch implementation here then).
"""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def not_implemented(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is not in the test stub (tests/sglang/stubs)")

    not_implemented.__name__ = name
    return not_implemented

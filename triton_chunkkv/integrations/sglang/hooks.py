"""What the ``chunkkv`` backend changes in SGLang outside the attention backend, through SGLang's
own plugin mechanisms (``sglang.srt.plugins.hook_registry.HookRegistry`` and the server-argument
resolution hooks of ``sglang.srt.arg_groups.resolution_hooks``); :func:`install` registers them
from the plugin entry point, in every SGLang process.

Each hook is a no-op in a process without a ``chunkkv`` backend (:func:`activate` names the
process's backend) or for another ``--attention-backend``:

* :func:`cap_prefix_match`: a prefix-cache match never covers the observation window of a prompt
  that will be compressed, so its queries are computed by the request's own extend pass (not in
  dynamic mode, which reads no prompt query: the match is SGLang's own).
* :func:`record_prompt_lengths`: the prompt length of every request SGLang puts in an extend
  batch, by request id (:func:`prompt_length`), so selection knows where each prompt ends (the
  last chunk of a chunked prefill, the prompt inside a retracted request's re-run). They are
  kept here, not on the ``ForwardBatch``: SGLang's runners copy a batch field by field.
* :func:`report_internal_state`: ``get_server_info()`` (``/get_server_info``) shows the
  backend's :meth:`~.backend.ChunkKVAttnBackend.report` under ``"chunkkv"``.
* :func:`resolve_cuda_graphs`: prefill CUDA graphs are turned off with a warning (the extend
  pass keeps window queries and selects with host-side, data-dependent logic, which a graph
  captured on a dummy batch would not repeat); decode graphs stay as configured. A split
  prefill / decode backend with ``chunkkv`` on one side only is refused.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

logger = logging.getLogger(__name__)

BACKEND_NAME = "chunkkv"
# Request id -> prompt length, newest last; the backend forgets a request once its prompt is
# complete, and the oldest entries go first beyond this many (requests aborted mid-prefill).
MAX_PROMPT_LENGTHS = 1 << 16

_backend = None  # this process's ChunkKVAttnBackend
_installed = False
_prompt_lengths: OrderedDict[str, int] = OrderedDict()


def activate(backend) -> None:
    """Makes ``backend`` the one the hooks serve in this process, and applies the registered
    hooks (SGLang's plugin loader does that after the entry points ran; a backend built without
    it, as in the tests, applies them here; already applied targets are skipped)."""
    global _backend
    from sglang.srt.plugins.hook_registry import HookRegistry

    _backend = backend
    install()
    HookRegistry.apply_hooks()
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    # Without these two, selection would silently fall back to keeping every prompt whole.
    for target in (Req._compute_max_prefix_len, ForwardBatch.init_new):
        if getattr(target, "__wrapped__", None) is None:
            raise RuntimeError(
                f"SGLang's HookRegistry did not apply the chunkkv hook on {target.__qualname__} "
                "(see its log): the chunkkv attention backend cannot run without it"
            )


def install() -> None:
    """Registers the hooks below with SGLang (idempotent)."""
    global _installed
    if _installed:
        return
    from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.managers.schedule_batch.Req._compute_max_prefix_len",
        cap_prefix_match,
        HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
        record_prompt_lengths,
        HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler_components.internal_state."
        "SchedulerInternalStateController.get_internal_state",
        report_internal_state,
        HookType.AFTER,
    )
    # Runs after the attention backend is resolved; turning a graph off is its business too.
    register_resolution_hook("handle_attention_backend_compatibility")(resolve_cuda_graphs)
    _installed = True


def cap_prefix_match(max_prefix_len: int, req, *args, **kwargs):
    """``Req._compute_max_prefix_len``: at most ``T - window`` tokens of a prompt that selects
    come from the prefix cache (a retracted request's re-run too: ``T`` is its prompt)."""
    if _backend is None:
        return None
    limit = _backend.prefix_limit(len(req.origin_input_ids))
    return None if limit is None else min(max_prefix_len, limit)


def record_prompt_lengths(forward_batch, cls, batch, *args, **kwargs):
    """``ForwardBatch.init_new`` (a classmethod: ``cls`` first): the prompt length of each
    request of an extend batch."""
    if _backend is not None and forward_batch.forward_mode.is_extend():
        for req in batch.reqs:
            note_prompt_length(req.rid, len(req.origin_input_ids))


def note_prompt_length(rid: str, prompt_len: int) -> None:
    _prompt_lengths.pop(rid, None)
    _prompt_lengths[rid] = prompt_len
    while len(_prompt_lengths) > MAX_PROMPT_LENGTHS:
        _prompt_lengths.popitem(last=False)


def prompt_length(rid) -> int | None:
    """The prompt length of request ``rid`` (``None``: not a scheduled request, e.g. a warm-up
    or capture batch's)."""
    return _prompt_lengths.get(rid)


def forget_prompt_length(rid) -> None:
    _prompt_lengths.pop(rid, None)


def report_internal_state(result, *args, **kwargs):
    """``SchedulerInternalStateController.get_internal_state``: adds the backend's report."""
    if _backend is not None:
        result.internal_state[BACKEND_NAME] = _backend.report()


def resolve_cuda_graphs(server_args, previous) -> None:
    """After SGLang resolves the attention backends: ``chunkkv`` serves prefill and decode,
    and runs prefill eagerly (a warning says so when a prefill graph was configured)."""
    previous(server_args)
    from sglang.srt.arg_groups.overrides import (
        attention_backends_of,
        declare_resolution,
        resolved_view,
        resolving_view,
    )
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, with_phase

    prefill, decode = attention_backends_of(resolved_view(server_args))
    if BACKEND_NAME not in (prefill, decode):
        return
    if prefill != decode:
        raise ValueError(
            f"the chunkkv attention backend must serve prefill and decode (got prefill "
            f"{prefill!r}, decode {decode!r}): decode selects from queries its extend pass keeps"
        )
    config = resolving_view(server_args).cuda_graph_config
    if config.prefill.backend == Backend.DISABLED:
        return
    logger.warning(
        "chunkkv: disabling the %r prefill CUDA graph (prefill keeps each request's window "
        "queries and selects its chunks with host-side logic a captured graph would not "
        "repeat); decode CUDA graphs stay %r",
        config.prefill.backend,
        config.decode.backend,
    )
    declare_resolution(
        server_args,
        "chunkkv.resolve_cuda_graphs",
        cuda_graph_config=with_phase(config, Phase.PREFILL, backend=Backend.DISABLED),
    )

"""``ChunkKVAttnBackend``: SGLang's Triton backend with ChunkKV-sparse decode.

Prefill and extend run SGLang's own Triton kernels (dense). A request's selection is made in the
extend pass that computes its last prompt token, layer group by layer group, right after the
group leader's dense attention has written the prompt's keys to the pool: SPEC steps 1-6 on the
request's own prompt (its own chunk grid), through ``policies.select_prompt``.

What selection reads never depends on the cache state:

* The prompt length ``T`` is the request's own (``len(req.origin_input_ids)``, noted for every
  request of an extend batch by :func:`.hooks.record_prompt_lengths`), not the extent of this
  pass: a chunked prefill selects in its last chunk, and a retracted request re-run with its
  generated tokens selects on its prompt again (the generated tokens are in the dense tail).
* The observation window, the queries of positions ``[T - w, T)``, is always computed:
  :func:`.hooks.cap_prefix_match` never lets a radix-cache match cover it (the prefix cache
  serves at most ``T - w`` tokens of a prompt that will be compressed), and the window is
  collected by absolute position across the chunks of a chunked prefill.
* A request-pool row taken by a new request starts a new entry: entries remember the row's
  ``ReqToTokenPool.req_generation`` (bumped by SGLang on every allocation), so nothing a
  finished, aborted, retracted or flushed request left is read.

Decode reads the selections from device tables indexed by row (:class:`.tables.RowSelections`):
a step gathers its batch's rows with a few indexing ops, so the per-step metadata has no host
sync and no loop over rows, and ``ops.sparse_decode`` runs in its slot-map layout (positions
-> slots through ``req_to_token``), reading only the kept chunks and the dense tail. A batch
with no compressed request runs the Triton decode kernel unchanged (found from the batch's
request ids on the host). Under SGLang's CUDA-graph runner the same metadata is gathered
outside the graph into fixed buffers (:meth:`ChunkKVAttnBackend.init_cuda_graph_state`) and
every captured step runs ``sparse_decode(validate=False)`` on them (a dense row reads
``[0, seq_len)``).

Memory: with ``share_heads`` and ``reuse_layers`` >= the layer count, a request keeps one token
set for every head and layer, so its dropped slots go back to the allocator right after its
selection and their ``req_to_token`` entries are pointed at SGLang's padding slot 0 (never read:
they are outside the retained set). The allocator is told to skip slot 0 when the row is freed
at the end. In every other setting the slots stay allocated (other heads or layers still hold
those positions) and only decode reads shrink.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.runtime_context import get_memory, get_parallel, get_schedule, get_spec

from ...ops import reference
from ...ops.kernels.sparse_decode import sparse_decode
from ...policies import Selection, kept_length, observation_window, resolve_budget, select_prompt
from . import hooks
from .settings import ChunkKVSettings
from .tables import DecodeIndex, RowSelections

logger = logging.getLogger(__name__)

# SGLang's token allocators never hand out slot 0: padded tokens write there.
PADDING_SLOT = 0
KV_CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class RequestState:
    """One request-pool row's entry: the request that holds the row now."""

    generation: int  # the row's ReqToTokenPool.req_generation when this request took it
    rid: str | None
    prompt_len: int | None  # None: unknown (not a scheduled request), kept whole
    budget: int
    window: int  # how many of the last prompt queries selection reads
    done: bool  # selected, or nothing to select
    missing: int  # window positions not computed yet
    # Selecting layer id -> the window's queries [Hq, window, D], by position.
    window_queries: dict[int, torch.Tensor] = field(default_factory=dict)
    # Per layer group: the policy's Selection (chunk_idx [1, Hkv, n]), or None to keep the
    # whole prompt.
    selections: list[Selection | None] = field(default_factory=list)
    freed_slots: int = 0

    @property
    def compressed(self) -> bool:
        return any(selection is not None for selection in self.selections)


class ExtendPlan(NamedTuple):
    """What one extend pass does for ChunkKV."""

    token_rows: torch.Tensor  # int64: rows of the pass's q that are window queries, in order
    windows: list[tuple[RequestState, int, int]]  # (request, first window column, count)
    completing: list[tuple[int, RequestState]]  # (row, request) whose prompt ends in this pass


class SparseDecodeBatch(NamedTuple):
    """One decode batch in ``ops.sparse_decode``'s slot-map layout."""

    slot_map: torch.Tensor  # int32 [B, S]: req_to_token rows of the batch
    index: DecodeIndex  # per layer group: chunk_idx, chunk_counts, tail_start of each row
    seq_lens: torch.Tensor  # int32 [B]


class ChunkKVAttnBackend(TritonAttnBackend):
    """``--attention-backend chunkkv``; settings from :meth:`ChunkKVSettings.from_env`."""

    def __init__(self, model_runner):
        super().__init__(model_runner)
        self.settings = ChunkKVSettings.from_env()
        self.policy = self.settings.make_policy()
        self._check_supported(model_runner)
        self.num_layers = num_layers = model_runner.model_config.num_hidden_layers
        self.reuse_layers = self.settings.reuse_layers
        self.group_leaders = frozenset(range(0, num_layers, self.reuse_layers))
        # Token-level policies (no chunk_size attribute) keep one-token chunks.
        self.chunk_size = getattr(self.policy, "chunk_size", 1)
        self.requests: dict[int, RequestState] = {}
        self._compressed_rids: dict[str, int] = {}  # live compressed request id -> its row
        self.table = RowSelections(
            len(self.group_leaders), self.req_to_token.shape[0], self.num_kv_head, self.device
        )
        self._graph: SparseDecodeBatch | None = None
        self._extend_plan: ExtendPlan | None = None
        self._sparse_batch: SparseDecodeBatch | None = None
        self._reduce_scores = self._score_reduce(model_runner)
        self.frees_slots = self._can_free_slots(num_layers)
        if self.frees_slots:
            _skip_padding_slot_on_free(self.token_to_kv_pool_allocator)
        self.stats = dict(requests_compressed=0, requests_whole=0, prompt_tokens=0, kept_tokens=0)
        self.recent_selections: OrderedDict[str, dict] = OrderedDict()
        hooks.activate(self)

    # -- configuration ------------------------------------------------------------------------

    def _check_supported(self, model_runner) -> None:
        unsupported = {
            "MLA models": self.use_mla,
            "sliding-window models": self.sliding_window_size is not None,
            "decode context parallelism": self.dcp_size > 1,
            "pipeline parallelism": get_parallel().pp_size > 1,
            "speculative decoding": get_spec().speculative_algorithm is not None,
            "--enable-mixed-chunk": get_schedule().enable_mixed_chunk,
            "virtual (unified) KV pools": self.kv_index_translator.is_translating,
            f"KV cache dtype {model_runner.kv_cache_dtype}": model_runner.kv_cache_dtype
            not in KV_CACHE_DTYPES,
            f"policy {self.policy.name!r}, which reads every prompt query": self.policy.window
            is None,
            f"policy {self.policy.name!r}, which reads the prompt's text": self.policy.reads_text,
        }
        for what, present in unsupported.items():
            if present:
                raise ValueError(f"the chunkkv attention backend does not support {what}")

    def _can_free_slots(self, num_layers: int) -> bool:
        """One token set per request (every head, every layer) can give slots back."""
        if not (getattr(self.policy, "share_heads", False) and self.reuse_layers >= num_layers):
            return False
        if self.page_size != 1:
            logger.warning(
                "chunkkv keeps dropped KV slots allocated: page_size %d > 1", self.page_size
            )
            return False
        if not get_memory().disable_radix_cache:
            logger.warning(
                "chunkkv keeps dropped KV slots allocated: the radix cache would "
                "share them (pass --disable-radix-cache to free them)"
            )
            return False
        return True

    def _score_reduce(self, model_runner):
        """The policy's score hook under attention tensor parallelism (``None``: not needed).

        With ``share_heads`` each rank holds its own KV heads' chunk scores: their sum over
        the ranks is the sum over all heads. Without it, a rank's KV heads are its own unless
        there are fewer KV heads than ranks: then head ``h`` is replicated on ranks
        ``[h*r, (h+1)*r)`` (SGLang's ``QKVParallelLinear``), each holding ``g/r`` of its query
        heads, and each copy would select from its own queries only. The copies average their
        chunk scores instead (one all-reduce of a ``[1, total KV heads, n]`` tensor in which
        each rank fills its head's row): SPEC's score over all ``g`` query heads, so every copy
        selects the same chunks."""
        parallel = get_parallel()
        if parallel.attn_tp_size == 1:
            return None
        group = parallel.attn_tp_group
        if getattr(self.policy, "share_heads", False):
            return group.all_reduce
        total_kv_heads = model_runner.model_config.get_total_num_kv_heads()
        if parallel.attn_tp_size <= total_kv_heads:
            return None
        replicas = parallel.attn_tp_size // total_kv_heads
        head = parallel.attn_tp_rank // replicas

        def average_replicas(chunk_scores):  # [1, 1, n]: this rank's copy of KV head `head`
            rows = chunk_scores.new_zeros(
                chunk_scores.shape[0], total_kv_heads, chunk_scores.shape[2]
            )
            rows[:, head] = chunk_scores[:, 0]
            return group.all_reduce(rows)[:, head : head + 1] / replicas

        return average_replicas

    def selection_window(self, prompt_len: int) -> int | None:
        """How many of the last prompt queries the selection of a ``prompt_len`` prompt reads;
        ``None`` when the prompt is kept whole (it fits the budget or the window)."""
        window = observation_window(self.policy, prompt_len)
        budget = resolve_budget(prompt_len, self.settings.budget, self.settings.ratio)
        if prompt_len < window or budget >= prompt_len:
            return None
        return window

    def prefix_limit(self, prompt_len: int) -> int | None:
        """The most prompt tokens a prefix-cache match may serve (``None``: no limit), so that
        the observation window's queries are computed in this request's own extend pass."""
        window = self.selection_window(prompt_len)
        return prompt_len - window if window else None

    # -- CUDA graphs --------------------------------------------------------------------------

    def _max_chunks(self) -> int:
        """Chunks per KV head any selection keeps: a layer keeps at most its budget (DESIGN,
        "keeps the budget"), no layer's budget is above twice the uniform one (PyramidKV's
        first layer), and none is above the context."""
        context = self.req_to_token.shape[1]
        budget = resolve_budget(context, self.settings.budget, self.settings.ratio)
        return max(1, min(2 * budget, context) // self.chunk_size)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        """Fixed decode buffers for graphs of up to ``max_bs`` requests: the batch's rows of the
        selection tables, its int32 lengths and its ``req_to_token`` rows (the Triton decode
        kernel is never captured, so its graph state is not allocated)."""
        groups, chunks = len(self.group_leaders), self._max_chunks()
        self.table.max_chunks = chunks
        context = self.req_to_token.shape[1]

        def zeros(*shape):
            return torch.zeros(*shape, dtype=torch.int32, device=self.device)

        self._graph = SparseDecodeBatch(
            slot_map=zeros(max_bs, context),
            index=DecodeIndex(
                zeros(groups, max_bs, self.num_kv_head, chunks),
                zeros(groups, max_bs),
                zeros(groups, max_bs),
            ),
            seq_lens=zeros(max_bs),
        )
        size = sum(t.numel() * t.element_size() for t in (self._graph.slot_map, *self._graph.index))
        logger.info(
            "chunkkv decode CUDA-graph buffers: %d requests, %d chunks per KV head, %.1f MiB",
            max_bs,
            chunks,
            size / 2**20,
        )

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        """Before a decode graph's capture or replay: this batch's metadata into the fixed
        buffers (padded rows point at SGLang's padding row 0, which stays dense)."""
        if not forward_batch.forward_mode.is_decode():
            raise ValueError(
                "the chunkkv attention backend runs decode CUDA graphs only, got "
                f"{forward_batch.forward_mode} (its plugin turns prefill graphs off)"
            )
        batch, graph = forward_batch.batch_size, self._graph
        rows = forward_batch.req_pool_indices
        index = graph.index.rows(batch)
        self.table.gather_into(rows, index)
        graph.seq_lens[:batch].copy_(forward_batch.seq_lens)
        max_len = self._max_seq_len(forward_batch)
        graph.slot_map[:batch, :max_len].copy_(self.req_to_token[rows, :max_len])
        self._sparse_batch = SparseDecodeBatch(
            graph.slot_map[:batch], index, graph.seq_lens[:batch]
        )

    # -- per-batch metadata -------------------------------------------------------------------

    def init_forward_metadata(self, forward_batch):
        mode = forward_batch.forward_mode
        self._extend_plan = None
        self._sparse_batch = None
        if mode.is_decode():
            self._sparse_batch = self._prepare_decode(forward_batch)
            if self._sparse_batch is not None:
                self.forward_metadata = None  # the Triton kernels do not run in this step
                return
        super().init_forward_metadata(forward_batch)
        if mode.is_extend():
            self._extend_plan = self._plan_extend(forward_batch)

    def _plan_extend(self, forward_batch) -> ExtendPlan | None:
        """Which rows of this pass's queries are window queries, and whose prompt ends here;
        a row taken by a new request starts a new entry. ``None``: nothing to do."""
        rows = _host_list(forward_batch.req_pool_indices_cpu, forward_batch.req_pool_indices)
        prefix_lens = _host_list(
            forward_batch.extend_prefix_lens_cpu, forward_batch.extend_prefix_lens
        )
        extend_lens = _host_list(forward_batch.extend_seq_lens_cpu, forward_batch.extend_seq_lens)
        rids = forward_batch.rids or [None] * len(rows)
        # Known for the requests SGLang schedules (hooks.py); warm-up and capture batches' are
        # not, and keep everything.
        prompt_lens = [hooks.prompt_length(rid) for rid in rids]
        generations = self.req_to_token_pool.req_generation[rows].tolist()
        token_rows, windows, completing = [], [], []
        start = 0
        for row, rid, generation, prompt_len, prefix_len, extend_len in zip(
            rows, rids, generations, prompt_lens, prefix_lens, extend_lens
        ):
            state = self.requests.get(row)
            if state is None or state.generation != generation:
                state = self._new_request(row, rid, generation, prompt_len)
            if state.prompt_len is not None and prefix_len + extend_len >= state.prompt_len:
                hooks.forget_prompt_length(rid)  # complete: later passes are this entry's
            if not state.done:
                first = state.prompt_len - state.window
                lo, hi = max(prefix_len, first), min(prefix_len + extend_len, state.prompt_len)
                if hi > lo:
                    token_rows.extend(range(start + lo - prefix_len, start + hi - prefix_len))
                    windows.append((state, lo - first, hi - lo))
                    state.missing -= hi - lo
                if prefix_len + extend_len >= state.prompt_len:
                    completing.append((row, state))
            start += extend_len
        if not completing and not windows:
            return None
        token_rows = torch.tensor(token_rows, dtype=torch.int64, device=self.device)
        return ExtendPlan(token_rows, windows, completing)

    def _new_request(self, row: int, rid, generation: int, prompt_len) -> RequestState:
        """The entry of a request that just took ``row``: dense until it selects."""
        previous = self.requests.get(row)
        if previous is not None and self._compressed_rids.get(previous.rid) == row:
            del self._compressed_rids[previous.rid]
        self.table.reset(row)
        window = None if prompt_len is None else self.selection_window(prompt_len)
        state = self.requests[row] = RequestState(
            generation=generation,
            rid=rid,
            prompt_len=prompt_len,
            budget=0
            if prompt_len is None
            else resolve_budget(prompt_len, self.settings.budget, self.settings.ratio),
            window=window or 0,
            done=window is None,
            missing=window or 0,
            selections=[None] * len(self.group_leaders),
        )
        if window is None and prompt_len is not None:
            self.stats["requests_whole"] += 1
        return state

    def _prepare_decode(self, forward_batch) -> SparseDecodeBatch | None:
        """The batch's rows of the selection tables (device indexing only); ``None`` when no
        request in the batch is compressed (plain Triton decode)."""
        rids = forward_batch.rids
        if rids is not None and self._compressed_rids.keys().isdisjoint(rids):
            return None
        rows = forward_batch.req_pool_indices
        max_len = self._max_seq_len(forward_batch)
        return SparseDecodeBatch(
            slot_map=self.req_to_token[rows, :max_len],
            index=self.table.gather(rows),
            seq_lens=forward_batch.seq_lens.to(torch.int32),
        )

    def _max_seq_len(self, forward_batch) -> int:
        """The batch's longest sequence from host values (the whole context without them)."""
        if forward_batch.seq_lens_cpu is not None and forward_batch.batch_size:
            return int(forward_batch.seq_lens_cpu.max())
        return self.req_to_token.shape[1]

    # -- forward ------------------------------------------------------------------------------

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        out = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        plan = self._extend_plan
        if plan is None:
            return out
        if layer.layer_id in self.group_leaders:
            if plan.windows:
                self._keep_window_queries(q, layer, plan)
            for row, state in plan.completing:
                self._select(row, state, layer)
        if layer.layer_id == self.num_layers - 1:
            self._finish_selections(plan.completing)
        return out

    def _keep_window_queries(self, q, layer, plan: ExtendPlan) -> None:
        picked = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)[plan.token_rows]
        parts = picked.transpose(0, 1).split([count for _, _, count in plan.windows], dim=1)
        for (state, first, count), part in zip(plan.windows, parts):
            queries = state.window_queries.get(layer.layer_id)
            if queries is None:
                queries = state.window_queries[layer.layer_id] = q.new_empty(
                    layer.tp_q_head_num, state.window, layer.qk_head_dim
                )
            queries[:, first : first + count] = part

    def _select(self, row: int, state: RequestState, layer) -> None:
        """One layer group's selection for a request whose prompt is complete, from the
        window's queries and the prompt's keys in the pool (the request's own chunk grid)."""
        if state.missing:  # warned about in _finish_selections: the request is kept whole
            return
        prompt_len = state.prompt_len
        keys = self.token_to_kv_pool.get_key_buffer(layer.layer_id)[
            self.req_to_token[row, :prompt_len].long()
        ]  # [T, Hkv, D]
        queries = state.window_queries[layer.layer_id][None] if state.window else None
        selection = select_prompt(
            self.policy,
            queries,
            keys.transpose(0, 1)[None],
            budgets=[state.budget],
            layer=layer.layer_id,
            num_layers=self.num_layers,
            scaling=layer.scaling,
            reduce_scores=self._reduce_scores,
        )[0]
        if selection is not None and selection.chunk_size != self.chunk_size:
            raise ValueError(
                f"policy {self.policy.name!r} chose chunk size {selection.chunk_size}, but "
                f"decode reads chunks of its chunk_size {self.chunk_size}"
            )
        group = layer.layer_id // self.reuse_layers
        state.selections[group] = selection
        self.table.store(group, row, selection)

    def _finish_selections(self, completing) -> None:
        """After the pass's last layer: the requests that selected are done."""
        for row, state in completing:
            state.window_queries = {}
            state.done = True
            if state.missing:
                logger.warning(
                    "chunkkv keeps request %s whole: %d of its last %d prompt queries were "
                    "not computed (served from the prefix cache)",
                    state.rid,
                    state.missing,
                    state.window,
                )
            if not state.compressed:
                self.stats["requests_whole"] += 1
                continue
            self._compressed_rids[state.rid] = row
            kept = [kept_length(selection, state.prompt_len) for selection in state.selections]
            self.stats["requests_compressed"] += 1
            self.stats["prompt_tokens"] += state.prompt_len
            self.stats["kept_tokens"] += sum(kept) // len(kept)
            logger.debug(
                "chunkkv request %s keeps %s of %d prompt tokens per KV head (per layer group)",
                state.rid,
                kept,
                state.prompt_len,
            )
            self._record(state, kept)
            if self.frees_slots:
                state.freed_slots = self._free_dropped_slots(row, state)

    def _record(self, state: RequestState, kept: list[int]) -> None:
        """Keeps the last ``settings.record_selections`` retained sets for :meth:`report`."""
        if not self.settings.record_selections:
            return
        self.recent_selections[state.rid] = {
            "prompt_len": state.prompt_len,
            "budget": state.budget,
            "chunk_size": self.chunk_size,
            "kept": kept,
            "chunk_idx": [None if s is None else s.chunk_idx[0].tolist() for s in state.selections],
            "tail_start": [None if s is None else s.tail_start for s in state.selections],
        }
        while len(self.recent_selections) > self.settings.record_selections:
            self.recent_selections.popitem(last=False)

    def _free_dropped_slots(self, row: int, state: RequestState) -> int:
        """Gives the prompt slots outside the (single) retained set back to the allocator."""
        selection = state.selections[0]  # one token set: every head and group keeps it
        kept = reference.kept_positions(
            selection.chunk_idx[:1, :1],
            selection.chunk_size,
            selection.tail_start,
            state.prompt_len,
        )[0, 0]
        dropped = torch.ones(state.prompt_len, dtype=torch.bool, device=self.device)
        dropped[kept] = False
        positions = dropped.nonzero().squeeze(1)
        slots = self.req_to_token[row]
        self.token_to_kv_pool_allocator.free(slots[positions].long())
        slots[positions] = PADDING_SLOT
        return positions.numel()

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        batch = self._sparse_batch
        if batch is None:
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        if (
            layer.logit_cap
            or kwargs.get("sinks") is not None
            or layer.qk_head_dim != layer.v_head_dim
        ):
            raise ValueError(
                f"chunkkv decode does not support layer {layer.layer_id}: "
                "logit soft-capping, attention sinks or qk/v head dims differ"
            )
        if save_kv_cache:
            # What the Triton backend writes (no sliding-window pool here: no swa_loc).
            self._set_kv_buffer(
                forward_batch,
                layer,
                KVWriteLoc.for_batch(forward_batch),
                k,
                v,
                layer.k_scale,
                layer.v_scale,
            )
        group = layer.layer_id // self.reuse_layers
        out = sparse_decode(
            q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim),
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id),
            batch.index.chunk_idx[group],
            self.chunk_size,
            batch.index.tails[group],
            batch.seq_lens,
            scaling=layer.scaling,
            slot_map=batch.slot_map,
            chunk_counts=batch.index.counts[group],
            validate=False,
        )
        return out.view(-1, layer.tp_q_head_num * layer.v_head_dim)

    # -- observability ------------------------------------------------------------------------

    def report(self) -> dict:
        """What ``get_server_info()["internal_states"][rank]["chunkkv"]`` shows: the settings,
        how many requests were compressed or kept whole, their prompt and kept tokens (per KV
        head, averaged over layer groups), and the last ``record_selections`` retained sets
        (per layer group: ``chunk_idx`` per KV head and ``tail_start``), by request id."""
        return {
            "settings": self.settings.as_dict(),
            **self.stats,
            "selections": dict(self.recent_selections),
        }


def _host_list(host_values, device_values) -> list[int]:
    """The host copy SGLang already made where there is one, else a copy of the tensor."""
    values = device_values if host_values is None else host_values
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


def _skip_padding_slot_on_free(allocator) -> None:
    """Rows freed at a request's end name the padding slot where slots were dropped."""
    free = allocator.free

    def free_except_padding(indices):
        free(indices[indices != PADDING_SLOT])

    allocator.free = free_except_padding

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

Dynamic mode (``CHUNKKV_MODE=dynamic``): at that same moment every layer stores the per-chunk key
bounds of the request's whole prompt chunks before its SPEC tail (``ops.chunk_bounds`` of its own
keys) in :class:`.tables.RowBounds`, and every decode step, per layer, scores the batch's rows of
those bounds with its own query and keeps each KV head's best chunks
(``ops.select_decode_chunks``, as many as SPEC step 5 gives for the budget) before the same
``sparse_decode``: the selection runs inside the decode graph, on fixed-size tables.

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
from itertools import repeat
from typing import NamedTuple

import torch
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.runtime_context import get_memory, get_parallel, get_schedule, get_spec

from ...cache import chunk_grid
from ...ops import reference
from ...ops.kernels.decode_select import chunk_bounds, select_decode_chunks
from ...ops.kernels.sparse_decode import sparse_decode
from ...policies import Selection, kept_length, observation_window, resolve_budget, select_prompt
from . import hooks
from .settings import ChunkKVSettings
from .tables import DecodeIndex, DynamicRows, RowBounds, RowSelections

logger = logging.getLogger(__name__)

# SGLang's token allocators never hand out slot 0: padded tokens write there.
PADDING_SLOT = 0
KV_CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class DynamicPlan(NamedTuple):
    """Dynamic mode: what a compressed request's decode steps read."""

    chunks: int  # whole chunks before the SPEC tail: the ones with key bounds
    keep: int  # how many of them a decode step reads (SPEC step 5 for the budget)
    tail_start: int  # SPEC step 3's P0


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
    # Dynamic mode: set when the request will be compressed (its bounds are stored by the
    # pass that ends its prompt).
    dynamic: DynamicPlan | None = None

    @property
    def compressed(self) -> bool:
        if self.dynamic is not None:
            return self.done
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


class DynamicDecodeBatch(NamedTuple):
    """One dynamic-mode decode batch: what each layer's selection and ``sparse_decode`` read."""

    slot_map: torch.Tensor  # int32 [B, S]: req_to_token rows of the batch
    rows: torch.Tensor  # int64 [B]: the batch's request-pool rows (for the bounds tables)
    index: DynamicRows  # chunk_counts, keep_counts, tails of each row
    seq_lens: torch.Tensor  # int32 [B]
    width: int  # chunks of the bounds a step scores (>= every row's chunk count)
    n_keep: int  # chunks a step selects per KV head (>= every row's keep count)

    def first(self, batch: int) -> DynamicDecodeBatch:
        return self._replace(
            slot_map=self.slot_map[:batch],
            rows=self.rows[:batch],
            index=self.index.rows(batch),
            seq_lens=self.seq_lens[:batch],
        )


class ChunkKVAttnBackend(TritonAttnBackend):
    """``--attention-backend chunkkv``; settings from :meth:`ChunkKVSettings.from_env`."""

    def __init__(self, model_runner):
        super().__init__(model_runner)
        self.settings = ChunkKVSettings.from_env()
        self.policy = self.settings.make_policy()
        self._check_supported(model_runner)
        self.num_layers = num_layers = model_runner.model_config.num_hidden_layers
        self.dynamic = self.settings.mode == "dynamic"
        self.reuse_layers = 1 if self.dynamic else self.settings.reuse_layers
        self.group_leaders = frozenset(range(0, num_layers, self.reuse_layers))
        # Token-level policies (no chunk_size attribute) keep one-token chunks; dynamic mode
        # uses the policy's chunk grid as the transformers adapter does (SPEC's by default).
        self.chunk_size = getattr(self.policy, "chunk_size", 1)
        self.window = None
        if self.dynamic:
            self.chunk_size, self.window = chunk_grid(self.policy)
            self._warn_ignored_settings()
        self.requests: dict[int, RequestState] = {}
        self._compressed_rids: dict[str, int] = {}  # live compressed request id -> its row
        # Dynamic mode, by live compressed request id: its chunk count and keep count (what an
        # eager decode step sizes its selection from, on the host).
        self._dynamic_chunks: dict[str, int] = {}
        self._dynamic_keeps: dict[str, int] = {}
        self.table = self.bounds = None
        if self.dynamic:
            self.bounds = self._bounds_tables()
        else:
            self.table = RowSelections(
                len(self.group_leaders), self.req_to_token.shape[0], self.num_kv_head, self.device
            )
        self._graph: SparseDecodeBatch | DynamicDecodeBatch | None = None
        self._extend_plan: ExtendPlan | None = None
        self._sparse_batch: SparseDecodeBatch | DynamicDecodeBatch | None = None
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

    def _warn_ignored_settings(self) -> None:
        defaults = ChunkKVSettings()
        ignored = [
            name
            for name in ("reuse_layers", "share_heads", "pool_kernel", "policy_options")
            if getattr(self.settings, name) != getattr(defaults, name)
        ]
        if self.settings.policy != defaults.policy:
            ignored.append("policy (but for its chunk_size and window)")
        if ignored:
            logger.warning(
                "chunkkv dynamic mode selects at every decode step from each layer's own key "
                "bounds: %s do not apply",
                ", ".join(ignored),
            )

    def _bounds_tables(self) -> RowBounds:
        """Dynamic mode's per-row key bounds, sized for a prompt as long as the context."""
        rows, context = self.req_to_token.shape
        keys = self.token_to_kv_pool.get_key_buffer(0)
        bounds = RowBounds(
            self.num_layers,
            rows,
            self.num_kv_head,
            max(1, (context - self.window) // self.chunk_size),
            keys.shape[-1],
            keys.dtype,
            self.device,
        )
        logger.info(
            "chunkkv dynamic mode: key bounds for %d request rows x %d chunks x %d layers, "
            "%.1f MiB",
            rows,
            bounds.max_chunks,
            self.num_layers,
            bounds.nbytes / 2**20,
        )
        return bounds

    def _can_free_slots(self, num_layers: int) -> bool:
        """One token set per request (every head, every layer) can give slots back."""
        if self.dynamic:  # every decode step may read any chunk
            return False
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
        """How many of the last prompt queries the selection of a ``prompt_len`` prompt reads
        (dynamic mode: the window of its SPEC tail); ``None`` when the prompt is kept whole (it
        fits the budget or the window)."""
        window = self.window if self.dynamic else observation_window(self.policy, prompt_len)
        budget = resolve_budget(prompt_len, self.settings.budget, self.settings.ratio)
        if prompt_len < window or budget >= prompt_len:
            return None
        return window

    def prefix_limit(self, prompt_len: int) -> int | None:
        """The most prompt tokens a prefix-cache match may serve (``None``: no limit), so that
        the observation window's queries are computed in this request's own extend pass.
        Dynamic mode reads no prompt query: the key bounds are the same from the cache."""
        if self.dynamic:
            return None
        window = self.selection_window(prompt_len)
        return prompt_len - window if window else None

    def _dynamic_plan(self, prompt_len: int, budget: int) -> DynamicPlan | None:
        """What a dynamic-mode request that does not fit its budget reads; ``None`` when its
        prompt has no whole chunk before the tail (nothing to choose: it stays dense)."""
        tail_start = reference.tail_start(prompt_len, self.chunk_size, self.window)
        chunks = tail_start // self.chunk_size
        if chunks == 0:
            return None
        keep = reference.num_kept_chunks(prompt_len, budget, self.chunk_size, self.window)
        return DynamicPlan(chunks, keep, tail_start)

    # -- CUDA graphs --------------------------------------------------------------------------

    def _max_chunks(self) -> int:
        """Chunks per KV head any selection keeps: a layer keeps at most its budget (DESIGN,
        "keeps the budget"), no layer's budget is above twice the uniform one (PyramidKV's
        first layer), and none is above the context."""
        context = self.req_to_token.shape[1]
        budget = resolve_budget(context, self.settings.budget, self.settings.ratio)
        return max(1, min(2 * budget, context) // self.chunk_size)

    def _max_keep(self) -> int:
        """Dynamic mode: chunks any decode step reads per KV head (SPEC step 5 keeps at most
        ``L / c``, and no prompt's budget is above the full context's)."""
        context = self.req_to_token.shape[1]
        budget = resolve_budget(context, self.settings.budget, self.settings.ratio)
        return max(1, min(self.bounds.max_chunks, budget // self.chunk_size))

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        """Fixed decode buffers for graphs of up to ``max_bs`` requests: the batch's rows of the
        selection tables (dynamic mode: its request-pool rows and their counts; the bounds
        tables themselves never move), its int32 lengths and its ``req_to_token`` rows (the
        Triton decode kernel is never captured, so its graph state is not allocated)."""
        context = self.req_to_token.shape[1]

        def zeros(*shape, dtype=torch.int32):
            return torch.zeros(*shape, dtype=dtype, device=self.device)

        if self.dynamic:
            self._graph = DynamicDecodeBatch(
                slot_map=zeros(max_bs, context),
                rows=zeros(max_bs, dtype=torch.int64),
                index=DynamicRows(zeros(max_bs), zeros(max_bs), zeros(max_bs)),
                seq_lens=zeros(max_bs),
                width=self.bounds.max_chunks,
                n_keep=self._max_keep(),
            )
            logger.info(
                "chunkkv dynamic-mode decode CUDA graphs: %d requests, each step scores %d "
                "chunks and reads %d per KV head",
                max_bs,
                self._graph.width,
                self._graph.n_keep,
            )
            return
        groups, chunks = len(self.group_leaders), self._max_chunks()
        self.table.max_chunks = chunks
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
        max_len = self._max_seq_len(forward_batch)
        if self.dynamic:
            graph.rows[:batch].copy_(rows)
            self.bounds.gather_into(rows, graph.index)
            graph.seq_lens[:batch].copy_(forward_batch.seq_lens)
            graph.slot_map[:batch, :max_len].copy_(self.req_to_token[rows, :max_len])
            self._sparse_batch = graph.first(batch)
            return
        index = graph.index.rows(batch)
        self.table.gather_into(rows, index)
        graph.seq_lens[:batch].copy_(forward_batch.seq_lens)
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
            self._dynamic_chunks.pop(previous.rid, None)
            self._dynamic_keeps.pop(previous.rid, None)
        (self.bounds if self.dynamic else self.table).reset(row)
        budget = (
            0
            if prompt_len is None
            else resolve_budget(prompt_len, self.settings.budget, self.settings.ratio)
        )
        window = None if prompt_len is None else self.selection_window(prompt_len)
        plan = None
        if self.dynamic and window is not None:
            plan = self._dynamic_plan(prompt_len, budget)
            window = None if plan is None else 0  # no prompt query is read
        state = self.requests[row] = RequestState(
            generation=generation,
            rid=rid,
            prompt_len=prompt_len,
            budget=budget,
            window=window or 0,
            done=window is None,
            missing=window or 0,
            selections=[None] * len(self.group_leaders),
            dynamic=plan,
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
        if self.dynamic:
            if rids is None:
                width, n_keep = self.bounds.max_chunks, self._max_keep()
            else:  # the batch's largest counts, from host values (no loop in Python)
                width = max(map(self._dynamic_chunks.get, rids, repeat(0)))
                n_keep = max(map(self._dynamic_keeps.get, rids, repeat(0)))
            return DynamicDecodeBatch(
                slot_map=self.req_to_token[rows, :max_len],
                rows=rows,
                index=self.bounds.gather(rows),
                seq_lens=forward_batch.seq_lens.to(torch.int32),
                width=max(width, 1),
                n_keep=max(n_keep, 1),
            )
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
        if self.dynamic:
            for row, state in plan.completing:
                self._store_bounds(row, state, layer)
        elif layer.layer_id in self.group_leaders:
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

    def _store_bounds(self, row: int, state: RequestState, layer) -> None:
        """Dynamic mode: this layer's key bounds of a request whose prompt is complete, from
        the keys of its whole chunks in the pool (the request's own chunk grid)."""
        if state.dynamic is None:
            return
        chunks = state.dynamic.chunks
        keys = self.token_to_kv_pool.get_key_buffer(layer.layer_id)[
            self.req_to_token[row, : chunks * self.chunk_size].long()
        ]  # [n * c, Hkv, D]
        kmin, kmax = chunk_bounds(keys.transpose(0, 1)[None], self.chunk_size, chunks)
        self.bounds.store_bounds(layer.layer_id, row, kmin[0], kmax[0])

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
            if state.dynamic is not None:
                chunks, keep, tail_start = state.dynamic
                self.bounds.store_counts(row, chunks, keep, tail_start)
                self._dynamic_chunks[state.rid], self._dynamic_keeps[state.rid] = chunks, keep
                kept = [keep * self.chunk_size + state.prompt_len - tail_start] * self.num_layers
            else:
                kept = [kept_length(s, state.prompt_len) for s in state.selections]
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
        if state.dynamic is not None:  # chosen anew at every decode step
            self.recent_selections[state.rid] = {
                "prompt_len": state.prompt_len,
                "budget": state.budget,
                "chunk_size": self.chunk_size,
                "kept": kept,
                "mode": "dynamic",
                "chunks": state.dynamic.chunks,
                "keep_chunks": state.dynamic.keep,
                "tail_start": state.dynamic.tail_start,
            }
        else:
            self.recent_selections[state.rid] = {
                "prompt_len": state.prompt_len,
                "budget": state.budget,
                "chunk_size": self.chunk_size,
                "kept": kept,
                "chunk_idx": [
                    None if s is None else s.chunk_idx[0].tolist() for s in state.selections
                ],
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
        q = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        if isinstance(batch, DynamicDecodeBatch):
            # This step's own chunks: the bounds of the batch's rows scored with its query.
            kmin, kmax = self.bounds.batch_bounds(layer.layer_id, batch.rows, batch.width)
            chunk_idx = select_decode_chunks(
                q,
                kmin,
                kmax,
                batch.n_keep,
                keep_counts=batch.index.keep_counts,
                chunk_counts=batch.index.chunk_counts,
                validate=False,
            )
            tails, counts = batch.index.tails, batch.index.keep_counts
        else:
            group = layer.layer_id // self.reuse_layers
            chunk_idx = batch.index.chunk_idx[group]
            tails, counts = batch.index.tails[group], batch.index.counts[group]
        out = sparse_decode(
            q,
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id),
            chunk_idx,
            self.chunk_size,
            tails,
            batch.seq_lens,
            scaling=layer.scaling,
            slot_map=batch.slot_map,
            chunk_counts=counts,
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

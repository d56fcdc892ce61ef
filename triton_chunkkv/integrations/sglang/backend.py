"""``ChunkKVAttnBackend``: SGLang's Triton backend with ChunkKV-sparse decode.

Prefill and extend run SGLang's own Triton kernels (dense). On the way, the extend pass keeps
the last ``window`` queries of each request for every layer that selects (rolling across the
chunks of a chunked prefill). The first decode step of a request means its prompt is complete:
before that step's forward, the backend selects each layer group's chunks from those queries
and the prompt's keys in the token pool (SPEC steps 1-6, per request, on its own chunk grid)
and keeps them in a side table indexed by request-pool slot. Decode then runs
``ops.sparse_decode`` in its slot-map layout (positions -> slots through ``req_to_token``), so
only the kept chunks and the dense tail are read.

Memory: with ``share_heads`` and ``reuse_layers`` >= the layer count, a request keeps one token
set for every head and layer, so its dropped slots go back to the allocator right after
selection and their ``req_to_token`` entries are pointed at SGLang's padding slot 0 (never read:
they are outside the retained set). The allocator is told to skip slot 0 when the row is freed
at the end. In every other setting the slots stay allocated (other heads or layers still hold
those positions) and only decode reads shrink.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.runtime_context import get_memory, get_parallel, get_schedule, get_spec

from ... import cache as core
from ...ops import reference
from ...ops.kernels.sparse_decode import sparse_decode
from ...policies import Selection, observation_window, resolve_budget, select_prompt
from .settings import ChunkKVSettings

logger = logging.getLogger(__name__)

# SGLang's token allocators never hand out slot 0: padded tokens write there.
PADDING_SLOT = 0
KV_CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class RequestState:
    """One request-pool slot's entry in the side table."""

    prompt_len: int
    # Selecting layer id -> its last queries [Hq, <= window, D]; emptied by selection.
    window_queries: dict[int, torch.Tensor] = field(default_factory=dict)
    selected: bool = False
    # Per layer group: the policy's Selection (chunk_idx [1, Hkv, n]), or None to keep the
    # whole prompt; None for every group: dense decode.
    selections: list[Selection | None] | None = None
    freed_slots: int = 0


class SparseDecodeBatch(NamedTuple):
    """One decode batch in ``ops.sparse_decode``'s slot-map layout."""

    slot_map: torch.Tensor  # int32 [B, S_max]: req_to_token rows of the batch
    # Per layer group: (chunk_idx int32 [B, Hkv, n_max], chunk_counts [B], tail_start [B]); a
    # dense row has no chunks and tail 0.
    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    chunk_size: int
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
        self.group_leaders = list(range(0, num_layers, self.reuse_layers))
        self.requests: dict[int, RequestState] = {}
        self.layer_scaling: dict[int, float] = {}
        self._extend_windows = None  # (token rows, [(state, how many)]) of this extend batch
        self._sparse_batch: SparseDecodeBatch | None = None
        self.frees_slots = self._can_free_slots(num_layers)
        _release_entries_on_free(self.req_to_token_pool, self.requests)
        if self.frees_slots:
            _skip_padding_slot_on_free(self.token_to_kv_pool_allocator)

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

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        raise ValueError(
            "the chunkkv attention backend does not support CUDA graphs yet: "
            "launch the server with --disable-cuda-graph"
        )

    # -- per-batch metadata -------------------------------------------------------------------

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        mode = forward_batch.forward_mode
        self._extend_windows = None
        self._sparse_batch = None
        if mode.is_decode():
            self._sparse_batch = self._prepare_decode(forward_batch)
        elif mode.is_extend():
            self._extend_windows = self._prepare_extend(forward_batch)

    def _prepare_extend(self, forward_batch):
        """Which token rows of this extend pass are the window queries, and whose."""
        window = self.policy.window
        slots = _host_list(forward_batch.req_pool_indices_cpu, forward_batch.req_pool_indices)
        prefix_lens = _host_list(
            forward_batch.extend_prefix_lens_cpu, forward_batch.extend_prefix_lens
        )
        extend_lens = _host_list(forward_batch.extend_seq_lens_cpu, forward_batch.extend_seq_lens)
        rows, owners = [], []
        start = 0
        for slot, prefix_len, extend_len in zip(slots, prefix_lens, extend_lens):
            state = self.requests.get(slot)
            # A later chunk of the same prompt continues its entry; anything else is new.
            if state is None or state.selected or state.prompt_len != prefix_len:
                state = self.requests[slot] = RequestState(prompt_len=prefix_len)
            state.prompt_len = prefix_len + extend_len
            count = min(extend_len, window)
            rows.extend(range(start + extend_len - count, start + extend_len))
            owners.append((state, count))
            start += extend_len
        return torch.tensor(rows, dtype=torch.int64, device=self.device), owners

    def _prepare_decode(self, forward_batch) -> SparseDecodeBatch | None:
        """Selects for requests decoding for the first time, then lays out the batch;
        ``None`` when no request in it is compressed (plain Triton decode)."""
        slots = forward_batch.req_pool_indices.tolist()
        states = [self.requests.get(slot) for slot in slots]
        for slot, state in zip(slots, states):
            if state is not None and not state.selected:
                self._select(slot, state)
        kept = [None if state is None else state.selections for state in states]
        if all(selections is None for selections in kept):
            return None
        groups = []
        for group in range(len(self.group_leaders)):
            rows = [None if selections is None else selections[group] for selections in kept]
            groups.append(
                core.pack_rows(
                    [None if s is None else s.chunk_idx[0] for s in rows],
                    [0 if s is None else s.tail_start for s in rows],
                    self.num_kv_head,
                    self.device,
                )
            )
        # One policy: one chunk size (a group that keeps everything packs no chunks).
        chunk_size = next(s.chunk_size for sel in kept if sel for s in sel if s is not None)
        seq_lens_cpu = forward_batch.seq_lens_cpu
        max_len = int(
            seq_lens_cpu.max() if seq_lens_cpu is not None else forward_batch.seq_lens.max()
        )
        return SparseDecodeBatch(
            slot_map=self.req_to_token[forward_batch.req_pool_indices, :max_len],
            groups=groups,
            chunk_size=chunk_size,
            seq_lens=forward_batch.seq_lens.to(torch.int32),
        )

    # -- selection ----------------------------------------------------------------------------

    def _select(self, slot: int, state: RequestState) -> None:
        """The policy's selection for one request whose prompt is complete, every layer group
        (each request on its own chunk grid)."""
        windows, state.window_queries = state.window_queries, {}
        state.selected = True
        prompt_len = state.prompt_len
        window = observation_window(self.policy, prompt_len)
        if prompt_len < window:
            return  # the prompt fits in the observation window: nothing to score
        if window and any(
            windows.get(leader) is None or windows[leader].shape[1] < window
            for leader in self.group_leaders
        ):
            logger.warning(
                "chunkkv keeps request %d whole: %d of its last %d queries were computed",
                slot,
                min(w.shape[1] for w in windows.values()) if windows else 0,
                window,
            )
            return
        budget = resolve_budget(prompt_len, self.settings.budget, self.settings.ratio)
        prompt_slots = self.req_to_token[slot, :prompt_len].long()
        selections = []
        for leader in self.group_leaders:
            keys = self.token_to_kv_pool.get_key_buffer(leader)[prompt_slots]  # [T, Hkv, D]
            selections.append(
                select_prompt(
                    self.policy,
                    windows[leader][None] if window else None,
                    keys.transpose(0, 1)[None],
                    budgets=[budget],
                    layer=leader,
                    num_layers=self.num_layers,
                    scaling=self.layer_scaling.get(leader),
                    reduce_scores=self._reduce_scores(),
                )[0]
            )
        if all(selection is None for selection in selections):
            return  # the budget covers the prompt: decode stays dense, as in Triton
        state.selections = selections
        if self.frees_slots:
            state.freed_slots = self._free_dropped_slots(slot, state)

    def _reduce_scores(self):
        """With shared heads, each attention-TP rank holds its own KV heads' chunk scores: the
        policy sums them across ranks (one all-reduce per request and layer group)."""
        parallel = get_parallel()
        if getattr(self.policy, "share_heads", False) and parallel.attn_tp_size > 1:
            return parallel.attn_tp_group.all_reduce
        return None

    def _free_dropped_slots(self, slot: int, state: RequestState) -> int:
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
        row = self.req_to_token[slot]
        self.token_to_kv_pool_allocator.free(row[positions].long())
        row[positions] = PADDING_SLOT
        return positions.numel()

    # -- forward ------------------------------------------------------------------------------

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        out = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        selects = layer.layer_id % self.reuse_layers == 0
        if self._extend_windows is not None and self.policy.window and selects:
            self._keep_window_queries(q, layer)
        return out

    def _keep_window_queries(self, q, layer) -> None:
        rows, owners = self._extend_windows
        window = self.policy.window
        self.layer_scaling[layer.layer_id] = layer.scaling
        picked = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)[rows].transpose(0, 1)
        parts = picked.split([count for _, count in owners], dim=1)
        for (state, count), part in zip(owners, parts):
            earlier = state.window_queries.get(layer.layer_id)
            if earlier is not None and count < window:
                part = torch.cat([earlier, part], dim=1)[:, -window:]
            state.window_queries[layer.layer_id] = part

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
        chunk_idx, chunk_counts, tail_start = batch.groups[layer.layer_id // self.reuse_layers]
        out = sparse_decode(
            q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim),
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id),
            chunk_idx,
            batch.chunk_size,
            tail_start,
            batch.seq_lens,
            scaling=layer.scaling,
            slot_map=batch.slot_map,
            chunk_counts=chunk_counts,
            validate=False,
        )
        return out.view(-1, layer.tp_q_head_num * layer.v_head_dim)


def _host_list(host_values, device_values) -> list[int]:
    """The host copy SGLang already made where there is one, else a copy of the tensor."""
    values = device_values if host_values is None else host_values
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


def _release_entries_on_free(req_to_token_pool, requests: dict) -> None:
    """A finished (or retracted) request frees its pool row: drop the row's entry with it."""
    free_rows = req_to_token_pool.free_rows

    def free_rows_and_entries(indices):
        for index in indices:
            requests.pop(index, None)
        free_rows(indices)

    req_to_token_pool.free_rows = free_rows_and_entries


def _skip_padding_slot_on_free(allocator) -> None:
    """Rows freed at a request's end name the padding slot where slots were dropped."""
    free = allocator.free

    def free_except_padding(indices):
        free(indices[indices != PADDING_SLOT])

    allocator.free = free_except_padding

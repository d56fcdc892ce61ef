"""A hand-built SGLang model runner: real ``ReqToTokenPool``, ``MHATokenToKVPool``, allocator,
``KVIndexTranslator`` and ``ForwardBatch`` objects around random queries, keys and values.

:class:`Harness` plays the scheduler and the model: it gives rows and KV slots to a batch of
requests of different lengths, runs their (optionally chunked) prefill and decode steps through
an attention backend layer by layer, and remembers every query, key and value so that tests
can rebuild what each layer saw. Its batches carry request ids, and it notes each request's
prompt length as ``hooks.record_prompt_lengths`` does for the requests SGLang schedules.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import transformers
from sglang.srt.configs.model_config import AttentionArch
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.kv_index_translator import KVIndexTranslator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

from triton_chunkkv.integrations.sglang import hooks, register

MAX_CONTEXT = 320
NUM_SLOTS = 2048


class Harness:
    def __init__(
        self,
        *,
        num_layers=2,
        q_heads=4,
        kv_heads=2,
        head_dim=16,
        dtype=torch.float16,
        max_requests=8,
        total_kv_heads=None,
        max_context=MAX_CONTEXT,
        num_slots=NUM_SLOTS,
    ):
        total_kv_heads = kv_heads if total_kv_heads is None else total_kv_heads
        self.num_layers, self.q_heads, self.kv_heads = num_layers, q_heads, kv_heads
        self.head_dim, self.dtype = head_dim, dtype
        self.req_to_token_pool = ReqToTokenPool(
            size=max_requests, max_context_len=max_context, device="cpu", enable_memory_saver=False
        )
        self.kv_pool = MHATokenToKVPool(
            size=num_slots,
            page_size=1,
            dtype=dtype,
            head_num=kv_heads,
            head_dim=head_dim,
            layer_num=num_layers,
            device="cpu",
            enable_memory_saver=False,
        )
        self.allocator = TokenToKVPoolAllocator(
            num_slots, dtype, "cpu", self.kv_pool, need_sort=False
        )
        self.translator = KVIndexTranslator(
            req_to_token=self.req_to_token_pool.req_to_token,
            token_to_kv_pool_allocator=self.allocator,
            token_to_kv_pool=self.kv_pool,
            page_size=1,
            device="cpu",
        )
        hf_config = transformers.LlamaConfig(
            num_attention_heads=q_heads,
            num_key_value_heads=kv_heads,
            hidden_size=q_heads * head_dim,
            num_hidden_layers=num_layers,
        )
        self.model_runner = SimpleNamespace(
            req_to_token_pool=self.req_to_token_pool,
            token_to_kv_pool=self.kv_pool,
            token_to_kv_pool_allocator=self.allocator,
            kv_index_translator=self.translator,
            sliding_window_size=None,
            page_size=1,
            device="cpu",
            gpu_id=0,
            is_draft_worker=False,
            spec_algorithm=None,
            kv_cache_dtype=dtype,
            use_mla_backend=False,
            decode_num_tokens_per_req=lambda: 1,
            model_config=SimpleNamespace(
                attention_arch=AttentionArch.MHA,
                hf_config=hf_config,
                get_max_num_attention_heads=lambda: q_heads,
                get_num_kv_heads=lambda tp_size, dcp_size=1: kv_heads,
                get_total_num_kv_heads=lambda: total_kv_heads,
                head_dim=head_dim,
                v_head_dim=head_dim,
                swa_v_head_dim=None,
                context_len=max_context,
                is_encoder_decoder=False,
                num_hidden_layers=num_layers,
                linear_attn_registry_result=None,
            ),
        )
        self.layers = [
            RadixAttention(
                num_heads=q_heads,
                head_dim=head_dim,
                scaling=head_dim**-0.5,
                num_kv_heads=kv_heads,
                layer_id=layer,
            )
            for layer in range(num_layers)
        ]
        self.rows: list[int] = []
        self.rids: list[str] = []
        self.lens: list[int] = []  # current lengths
        self.prompt_lens: list[int] = []
        self.requests_made = 0
        self.last_decode = None
        # Per layer, per request: every query / key / value it was given, in position order.
        self.queries = [[] for _ in range(num_layers)]
        self.keys = [[] for _ in range(num_layers)]
        self.values = [[] for _ in range(num_layers)]

    def backend(self, name: str):
        """A backend through SGLang's registry, as the model runner creates it."""
        register()
        return ATTENTION_BACKENDS[name](self.model_runner)

    # -- the scheduler's part -----------------------------------------------------------------

    def add_requests(self, lens):
        """Rows for new requests (no forward yet); their prompts have ``lens`` tokens."""
        self.rows = self.req_to_token_pool.alloc_rows(len(lens))
        self.rids = [f"req-{self.requests_made + i}" for i in range(len(lens))]
        self.requests_made += len(lens)
        self.lens = [0] * len(lens)
        self.prompt_lens = list(lens)
        for layer in range(self.num_layers):
            for store in (self.queries, self.keys, self.values):
                store[layer] = [[] for _ in lens]
        return self.rows

    def _write_slots(self, new_lens):
        """Slots for positions ``[lens[i], lens[i] + new_lens[i])`` of each request."""
        slots = self.allocator.alloc(sum(new_lens))
        slots = slots[torch.randperm(len(slots))]
        start = 0
        for i, (row, n) in enumerate(zip(self.rows, new_lens)):
            self.req_to_token_pool.req_to_token[row, self.lens[i] : self.lens[i] + n] = slots[
                start : start + n
            ].to(torch.int32)
            start += n
        return slots

    def _batch(self, mode, new_lens, out_cache_loc):
        rows = torch.tensor(self.rows, dtype=torch.int64)
        prefix = torch.tensor(self.lens, dtype=torch.int64)
        extend = torch.tensor(new_lens, dtype=torch.int64)
        seq_lens = prefix + extend
        batch = ForwardBatch(
            forward_mode=mode,
            batch_size=len(self.rows),
            input_ids=torch.zeros(int(extend.sum()), dtype=torch.int64),
            req_pool_indices=rows,
            seq_lens=seq_lens,
            out_cache_loc=out_cache_loc,
            seq_lens_sum=int(seq_lens.sum()),
            seq_lens_cpu=seq_lens.clone(),
            positions=torch.cat([torch.arange(p, p + n) for p, n in zip(self.lens, new_lens)]),
        )
        batch.rids = list(self.rids)
        if mode == ForwardMode.EXTEND:
            for rid, prompt_len in zip(self.rids, self.prompt_lens):
                hooks.note_prompt_length(rid, prompt_len)
            batch.extend_num_tokens = int(extend.sum())
            batch.extend_seq_lens, batch.extend_prefix_lens = extend, prefix
            batch.extend_start_loc = torch.cumsum(extend, 0) - extend
            batch.extend_seq_lens_cpu, batch.extend_prefix_lens_cpu = new_lens, list(self.lens)
        plan = self.translator.plan(
            req_pool_indices=rows,
            seq_lens=seq_lens,
            seq_lens_cpu=seq_lens.clone(),
            write_virtual=out_cache_loc,
        )
        plan.bind(batch, self.translator)
        return batch

    # -- the model's part ---------------------------------------------------------------------

    def _random_qkv(self, num_tokens):
        shape = (self.num_layers, num_tokens)
        return (
            torch.randn(*shape, self.q_heads * self.head_dim, dtype=self.dtype),
            torch.randn(*shape, self.kv_heads, self.head_dim, dtype=self.dtype),
            torch.randn(*shape, self.kv_heads, self.head_dim, dtype=self.dtype),
        )

    def _remember(self, new_lens, q, k, v):
        for layer in range(self.num_layers):
            parts = zip(
                q[layer].split(new_lens), k[layer].split(new_lens), v[layer].split(new_lens)
            )
            for i, (qi, ki, vi) in enumerate(parts):
                self.queries[layer][i].append(qi.view(-1, self.q_heads, self.head_dim))
                self.keys[layer][i].append(ki)
                self.values[layer][i].append(vi)

    def extend(self, backends, new_lens, qkv=None):
        """One extend pass (a prompt, or the next chunk of one) for every request, through one
        backend or several on the same batch (each writes the same keys and values). ``qkv``:
        the pass's queries, keys and values (default: random)."""
        return self._run(backends, ForwardMode.EXTEND, list(new_lens), qkv)

    def cached_prefix(self, lens, *, slots=None, qkv=None):
        """Positions ``[0, lens[i])`` of each request served from the prefix cache: no forward
        of this batch computes them. Without ``slots`` they get fresh slots holding random keys
        and values; with ``slots`` (one request) the row points at an earlier request's slots,
        and ``qkv`` is what that request computed there."""
        if slots is None:
            slots = self._write_slots(lens)
            qkv = self._random_qkv(sum(lens))
            for layer in range(self.num_layers):
                self.kv_pool.get_key_buffer(layer)[slots] = qkv[1][layer]
                self.kv_pool.get_value_buffer(layer)[slots] = qkv[2][layer]
        else:
            (row,) = self.rows
            self.req_to_token_pool.req_to_token[row, : lens[0]] = slots
        self._remember(lens, *qkv)
        self.lens = [n + m for n, m in zip(self.lens, lens)]

    def computed(self, request, start, end):
        """What request ``request`` computed at positions ``[start, end)``, in :meth:`extend`'s
        ``qkv`` layout (queries ``[layers, n, Hq*D]``, keys and values ``[layers, n, Hkv, D]``)."""

        def positions(store, flat):
            parts = [
                self.seen(store, layer, request)[:, start:end].transpose(0, 1)
                for layer in range(self.num_layers)
            ]
            stacked = torch.stack(parts)
            return stacked.flatten(2) if flat else stacked

        return (
            positions(self.queries, True),
            positions(self.keys, False),
            positions(self.values, False),
        )

    def decode_batch(self):
        """The next decode step's batch (one new slot per request), run by nobody yet."""
        out_cache_loc = self._write_slots([1] * len(self.rows))
        return self._batch(ForwardMode.DECODE, [1] * len(self.rows), out_cache_loc)

    def decode(self, backends, qkv=None):
        """One decode step; every backend in ``backends`` runs on the same batch and cache
        (each writes the same new key and value). Returns each one's ``[B, Hq*D]`` per layer;
        the step's batch, queries, keys and values stay in :attr:`last_decode`. ``qkv``: the
        step's queries, keys and values (default: random)."""
        batch = self.decode_batch()
        q, k, v = self._random_qkv(len(self.rows)) if qkv is None else qkv
        outputs = []
        for backend in backends:
            backend.init_forward_metadata(batch)
            outputs.append(
                [
                    backend.forward_decode(q[layer], k[layer], v[layer], self.layers[layer], batch)
                    for layer in range(self.num_layers)
                ]
            )
        self.last_decode = (batch, q, k, v)
        self._remember([1] * len(self.rows), q, k, v)
        self.lens = [n + 1 for n in self.lens]
        return outputs

    def _run(self, backends, mode, new_lens, qkv=None):
        if not isinstance(backends, (list, tuple)):
            backends = [backends]
        out_cache_loc = self._write_slots(new_lens)
        batch = self._batch(mode, new_lens, out_cache_loc)
        q, k, v = self._random_qkv(sum(new_lens)) if qkv is None else qkv
        outputs = []
        for backend in backends:
            backend.init_forward_metadata(batch)
            outputs.append(
                [
                    backend.forward_extend(q[layer], k[layer], v[layer], self.layers[layer], batch)
                    for layer in range(self.num_layers)
                ]
            )
        self._remember(new_lens, q, k, v)
        self.lens = [n + m for n, m in zip(self.lens, new_lens)]
        return outputs

    # -- what the tests compare with ----------------------------------------------------------

    def release(self, request):
        """What SGLang does when a request finishes, aborts or is retracted: its KV slots and
        its row go back to the pools."""
        row, length = self.rows[request], self.lens[request]
        self.allocator.free(self.req_to_token_pool.req_to_token[row, :length].long())
        self.req_to_token_pool.free_rows([row])

    def seen(self, store, layer, request):
        """``[Hkv or Hq, length, D]``: everything request ``request`` got in ``layer``."""
        return torch.cat(store[layer][request]).transpose(0, 1)

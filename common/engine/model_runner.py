"""Tensors in, tokens out: run one scheduled step on the model and sample.

The runner owns the paged KV cache, one tensor shaped
[num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim] (DESIGN.md;
kv_cache_tensor.py allocates it). A step packs the new tokens of every scheduled
request into one flat batch, runs one forward, and samples only for the requests whose
scheduled tokens reach the end of their known tokens (a prefill chunk that stops
mid-prompt samples nothing).

Inputs are packed on the host into persistent buffers (step_buffers.py); on CUDA those
are pinned and copied to persistent device buffers without blocking, so the only host
synchronization in a step is the sampler reading the chosen tokens back. On CUDA (unless enforce_eager),
a pure-decode step replays a CUDA graph captured at the next batch size up
(common/engine/cuda_graphs.py); mixed and prefill steps, and decode batches larger than
the largest captured size, run eagerly. The CPU path never uses graphs.

Under tensor parallelism (common/distributed/) the runner of rank 0 sends each step's
packed host inputs to the other ranks before its forward (`step_sender`), and each of
those ranks' runners rebuilds the same inputs (`run_step_message`) and runs the same
forward on its shard; only rank 0 gets logits and samples. Ranks run eagerly.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from common.attention.metadata import AttentionMetadata
from common.config.engine_config import DEFAULT_MAX_NUM_SEQS
from common.distributed import step_message
from common.engine import cuda_graphs as graphs_module
from common.engine.kv_cache_tensor import allocate_kv_cache, cache_model_config, resolve_kv_cache_dtype
from common.engine.outputs import SampledToken
from common.engine.sampler import Sampler
from common.engine.scheduled_batch import ScheduledBatch
from common.engine.step_buffers import StepBuffers, StepHandle, StepInputs
from common.lora.adapter_slots import AdapterSlots
from common.models.moe import experts_capture_in_cuda_graphs


class ModelRunner:
    def __init__(
        self,
        model,
        model_config,
        *,
        num_blocks: int,
        block_size: int,
        kv_cache_dtype: str | torch.dtype,
        device: torch.device | str,
        dtype: torch.dtype,
        seed: int = 0,
        max_model_len: int | None = None,
        max_num_seqs: int | None = None,
        enforce_eager: bool = False,
        cuda_graph_sizes: Sequence[int] | None = None,
        step_sender=None,
        lora_config=None,
        lora_cache=None,
        max_num_batched_tokens: int | None = None,
    ) -> None:
        """max_model_len (default: the model's context) bounds the block tables a captured
        decode graph takes; graphs are captured at cuda_graph_sizes (default: the list of
        cuda_graphs.cuda_graph_sizes up to max_num_seqs) on CUDA unless enforce_eager.
        step_sender (rank 0 of a tensor-parallel engine): its send_step(bytes) hands each
        step to the other ranks. lora_config with enable_lora (and lora_cache, the engine's
        AdapterCache): the model's linear layers get --max-loras adapter slots, and every
        step's requests run under their adapters (a step packs at most
        max_num_batched_tokens tokens)."""
        self.model = model
        self.step_sender = step_sender
        self.model_config = model_config
        self.device = torch.device(device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len or model_config.max_position_embeddings
        self.kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, dtype)
        self.kv_cache = allocate_kv_cache(
            cache_model_config(model, model_config), num_blocks, block_size, self.kv_cache_dtype, self.device
        )
        self.sampler = Sampler(seed)
        on_cuda = self.device.type == "cuda"
        self._host = StepBuffers(torch.device("cpu"), pin=on_cuda)
        self._eager = StepBuffers(self.device, pin=False) if on_cuda else self._host
        self._copies_done: torch.cuda.Event | None = None
        self._token_buffer_turn = 0
        self._rows: torch.Tensor | None = None
        self.cuda_graphs: graphs_module.DecodeCudaGraphs | None = None
        tensor_parallel = hasattr(model, "rank_config")
        self.lora_slots: AdapterSlots | None = None
        if lora_config is not None and lora_config.enable_lora:
            self.lora_slots = _attach_lora(
                model, lora_config, lora_cache, dtype, self.device, max_num_batched_tokens or 8192, max_num_seqs
            )
        graphs_can_run_lora = self.lora_slots is None or not self.lora_slots.host_groups
        if (
            on_cuda
            and not enforce_eager
            and not tensor_parallel
            and graphs_can_run_lora
            and _backend_supports_cuda_graphs(model)
        ):
            sizes = cuda_graph_sizes or graphs_module.cuda_graph_sizes(max_num_seqs or DEFAULT_MAX_NUM_SEQS)
            self.capture_cuda_graphs(sizes)

    def capture_cuda_graphs(self, sizes: Sequence[int] | None = None) -> None:
        """(Re)capture the decode graphs, at `sizes` or at the sizes captured before."""
        if self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; the CPU path always runs eagerly")
        if sizes is None:
            if self.cuda_graphs is None:
                raise ValueError("no batch sizes given and none captured before")
            sizes = self.cuda_graphs.sizes
        self.cuda_graphs = None  # release the old graphs' pool before capturing anew
        graphs = graphs_module.DecodeCudaGraphs(
            self.model,
            self.kv_cache,
            sizes,
            max_blocks_per_seq=-(-self.max_model_len // self.block_size),
            max_model_len=self.max_model_len,
            vocab_size=self.model_config.vocab_size,
            lora_slots=self.lora_slots,
        )
        graphs.capture()
        self.cuda_graphs = graphs

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> dict[str, SampledToken]:
        """Run one step; the sampled token of every request that reached its end, by id."""
        if not batch.requests or batch.total_num_scheduled_tokens == 0:
            return {}
        if batch.ahead:
            raise ValueError("a step scheduled ahead of its input tokens runs with launch(batch, feed)")
        inputs = self.prepare_inputs(batch, pad_to=self.graph_size_for(batch))
        if inputs.graph_size is not None:
            logits = self.cuda_graphs.replay(inputs.graph_size)
            if len(inputs.sample_requests) == inputs.num_reqs:
                logits = logits[: inputs.num_reqs]  # every row samples: no gather
            else:
                logits = logits[inputs.sample_rows]
        else:
            if self.step_sender is not None:
                self.step_sender.send_step(self.step_message(inputs))
            logits = self.forward(inputs)
        if not inputs.sample_requests:
            return {}
        sampled = self.sampler(logits, inputs.sample_requests)
        return {r.request_id: s for r, s in zip(inputs.sample_requests, sampled, strict=True)}

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, feed: StepHandle | None = None) -> StepHandle:
        """Start a pure-decode step in which every request samples, without waiting for its
        tokens (--async-scheduling): they stay on the device for the next step, and a copy
        to the host is under way; StepHandle.result() waits for it.

        `feed`: the launched step before this one, when `batch` was scheduled ahead of its
        tokens; each request's input token is then the one `feed` sampled for it, copied on
        the device."""
        if batch.ahead != (feed is not None):
            raise ValueError("a step scheduled ahead needs the step that feeds it, and only such a step")
        if self.step_sender is not None:
            raise ValueError(
                "--async-scheduling does not run with tensor parallelism; the ranks step in lockstep"
            )
        inputs = self.prepare_inputs(batch, pad_to=self.graph_size_for(batch))
        n = inputs.num_reqs
        if len(inputs.sample_requests) != n or inputs.input_ids.shape[0] < n or n == 0:
            raise ValueError("launch() runs pure-decode steps in which every request samples; use execute()")
        if feed is not None:
            rows = [feed.row_of.get(r.request_id) for r in batch.requests]
            if None in rows:
                missing = batch.requests[rows.index(None)].request_id
                raise ValueError(
                    f"request {missing} is in a step scheduled ahead but not in the step feeding it"
                )
            if rows == list(range(n)):  # the same requests in the same order (or the first n of them)
                tokens = feed.token_ids[:n]
            else:
                tokens = feed.token_ids[self._to_device_index(rows)]
            inputs.input_ids[:n].copy_(tokens)
        if inputs.graph_size is not None:
            logits = self.cuda_graphs.replay(inputs.graph_size)[:n]
        else:
            logits = self.forward(inputs)
        requests = inputs.sample_requests
        row_of = {r.request_id: i for i, r in enumerate(batch.requests)}
        if feed is not None and any(r.grammar is not None for r in requests):
            # the masks need `feed`'s tokens in the matchers: sample once the host has them
            # (StepHandle.sample), while this forward runs; the logits must outlive a replay
            pending = logits.clone() if inputs.graph_size is not None else logits
            return StepHandle(
                row_of, None, lambda: self._read_back_later(self.sampler.sample_token_ids(pending, requests))
            )
        return StepHandle(row_of, self._read_back_later(self.sampler.sample_token_ids(logits, requests)))

    def _to_device_index(self, rows: list[int]) -> torch.Tensor:
        index = torch.tensor(rows, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        return index.to(self.device, non_blocking=True)

    def _read_back_later(
        self, token_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]:
        """`token_ids`, a pinned host copy under way behind the step on its stream, and the
        event after that copy (StepHandle's `sampled`)."""
        if self.device.type != "cuda":
            return token_ids, token_ids, None
        # two host buffers in turn: the step launched before this one may not be read yet
        self._token_buffer_turn ^= 1
        name = ("token_ids_a", "token_ids_b")[self._token_buffer_turn]
        host = self._host.get(name, token_ids.shape[0])
        host.copy_(token_ids, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return token_ids, host, ready

    def forward(self, inputs: StepInputs) -> torch.Tensor | None:
        """The model on an eager step; the logits of its sampling rows (None when no row
        samples, or on a tensor-parallel rank other than 0)."""
        if inputs.lora is not None:
            self.lora_slots.context.batch = inputs.lora
        try:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.attn_metadata)
        finally:
            if inputs.lora is not None:
                self.lora_slots.context.batch = None
        if inputs.sample_rows.shape[0] == 0:
            return None
        return self.model.compute_logits(hidden[inputs.sample_rows])

    def step_message(self, inputs: StepInputs) -> bytes:
        """An eager step's packed host inputs, for the other tensor-parallel ranks."""
        meta = inputs.attn_metadata
        rows, width = meta.block_tables.shape
        sizes = {
            "input_ids": inputs.input_ids.shape[0],
            "positions": inputs.positions.shape[0],
            "slot_mapping": meta.slot_mapping.shape[0],
            "seq_lens": rows,
            "query_start_loc": rows + 1,
            "block_tables": rows * width,
            "sample_rows": inputs.sample_rows.shape[0],
        }
        arrays = {name: self._host.get(name, size).numpy() for name, size in sizes.items()}
        scalars = {"width": width, "max_query_len": meta.max_query_len, "max_seq_len": meta.max_seq_len}
        return step_message.encode_step(arrays, scalars)

    @torch.inference_mode()
    def run_step_message(self, message: bytes) -> bool:
        """Run the forward rank 0 sent (a tensor-parallel rank's step); False on shutdown."""
        op, arrays, scalars = step_message.decode(message)
        if op == step_message.SHUTDOWN:
            return False
        query_start_loc = arrays["query_start_loc"]
        seq_lens = arrays["seq_lens"]
        rows = seq_lens.shape[0]

        def device(name: str) -> torch.Tensor:
            return torch.from_numpy(arrays[name]).to(self.device, non_blocking=False)

        metadata = AttentionMetadata(
            query_start_loc=device("query_start_loc"),
            seq_lens=device("seq_lens"),
            block_tables=device("block_tables").view(rows, scalars["width"]),
            slot_mapping=device("slot_mapping"),
            max_query_len=scalars["max_query_len"],
            max_seq_len=scalars["max_seq_len"],
            query_lens_cpu=np.diff(query_start_loc).tolist(),
            seq_lens_cpu=seq_lens.tolist(),
        )
        inputs = StepInputs(
            input_ids=device("input_ids"),
            positions=device("positions"),
            attn_metadata=metadata,
            sample_rows=device("sample_rows"),
            sample_requests=[],
            num_reqs=rows,
        )
        self.forward(inputs)
        return True

    def graph_size_for(self, batch: ScheduledBatch) -> int | None:
        """The captured batch size a step replays: None unless it is pure decode (one token a
        request), fits a captured size and every block table fits the graphs' width."""
        graphs = self.cuda_graphs
        if graphs is None or any(n != 1 for n in batch.num_scheduled_tokens):
            return None
        if max(len(t) for t in batch.block_tables) > graphs.inputs.max_blocks_per_seq:
            return None
        return graphs.padded_size(len(batch.requests))

    @torch.inference_mode()  # the graphs' static inputs may be inference tensors
    def prepare_inputs(self, batch: ScheduledBatch, pad_to: int | None = None) -> StepInputs:
        """Pack the batch: token ids, positions, cache slots and attention metadata.

        With pad_to (a pure-decode batch of at most pad_to requests), the step takes the
        layout of a captured decode graph: pad_to rows, rows past the batch are padding
        (slot -1, sequence length 0), and block tables are max_model_len / block_size wide.
        On CUDA with graphs, that layout lands in the graphs' static inputs.
        """
        requests = batch.requests
        num_reqs = len(requests)
        query_lens = list(batch.num_scheduled_tokens)
        ahead = batch.ahead  # each request's token is the previous step's, not known here yet
        if ahead and any(n != 1 for n in query_lens):
            raise ValueError("a step scheduled ahead is pure decode: one token a request")
        starts = [r.num_computed_tokens + ahead for r in requests]
        seq_lens = [s + n for s, n in zip(starts, query_lens, strict=True)]
        total = sum(query_lens)
        if pad_to is not None:
            if pad_to < num_reqs or total != num_reqs:
                raise ValueError(
                    f"a padded step is pure decode of at most {pad_to} requests; got {num_reqs} "
                    f"requests with {total} tokens"
                )
            rows = tokens = pad_to
            width = -(-self.max_model_len // self.block_size)
        else:
            rows, tokens = num_reqs, total
            width = max(1, max(len(t) for t in batch.block_tables))

        if self._copies_done is not None:
            # the previous step's copies may still read the pinned buffers refilled below
            self._copies_done.synchronize()
        host = self._host
        graphs = self.cuda_graphs if pad_to is not None else None
        if graphs is not None:  # packed straight into the graphs' pinned twin of their inputs
            twin = graphs.host_inputs
            ids, positions = twin.input_ids[:tokens].numpy(), twin.positions[:tokens].numpy()
            slots, lens = twin.slot_mapping[:tokens].numpy(), twin.seq_lens[:rows].numpy()
            tables = twin.block_tables[:rows].numpy()  # [rows, width]: the graphs' width
        else:
            ids = host.get("input_ids", tokens).numpy()
            positions = host.get("positions", tokens).numpy()
            slots = host.get("slot_mapping", tokens).numpy()
            lens = host.get("seq_lens", rows).numpy()
            tables = host.get("block_tables", rows * width).numpy().reshape(rows, width)
        qsl = host.get("query_start_loc", rows + 1).numpy()

        if total == num_reqs:  # one token a request: decode (the common case), kept cheap
            if ahead:  # launch() puts the previous step's sampled tokens here, on the device
                ids[:num_reqs] = 0
            else:
                ids[:num_reqs] = [r.all_token_ids[s] for r, s in zip(requests, starts, strict=True)]
            positions[:num_reqs] = starts
            qsl[:] = np.arange(rows + 1)
        else:
            ids[:total] = np.fromiter(
                itertools.chain.from_iterable(
                    r.all_token_ids[s:e] for r, s, e in zip(requests, starts, seq_lens, strict=True)
                ),
                dtype=np.int64,
                count=total,
            )
            qsl[0] = 0
            np.cumsum(query_lens, out=qsl[1:])
            # position of packed token t of request i: starts[i] + (t - query_start_loc[i])
            positions[:total] = np.arange(total) + np.repeat(np.asarray(starts) - qsl[:-1], query_lens)
        lens[:num_reqs] = seq_lens
        if pad_to is None:
            tables.fill(0)  # a graph's rows keep stale entries: no kernel reads past a sequence
        for i, table in enumerate(batch.block_tables):
            tables[i, : len(table)] = table
        pos = positions[:total]
        req_of_token = np.repeat(np.arange(num_reqs), query_lens)
        slots[:total] = tables[req_of_token, pos // self.block_size].astype(np.int64) * self.block_size + (
            pos % self.block_size
        )
        if rows > num_reqs:  # padding rows of a graph step
            ids[num_reqs:] = 0
            positions[num_reqs:] = 0
            slots[num_reqs:] = -1
            lens[num_reqs:] = 0

        if ahead:
            sampling = list(range(num_reqs))
        else:
            sampling = [i for i, r in enumerate(requests) if seq_lens[i] == len(r.all_token_ids)]
        sample_rows = host.get("sample_rows", len(sampling)).numpy()
        sample_rows[:] = qsl[1:][sampling] - 1

        if graphs is not None:
            # one copy for every input (ahead, the ids are placeholders launch() overwrites)
            dest = graphs.inputs
            span = dest.packed_span(rows)
            dest.packed[:span].copy_(twin.packed[:span], non_blocking=True)
            metadata = dest.metadata(rows, self.max_model_len)
            input_ids, device_positions = dest.input_ids[:tokens], dest.positions[:tokens]
        else:
            input_ids = (
                self._eager.get("input_ids", tokens) if ahead else self._to_device("input_ids", tokens)
            )
            device_positions = self._to_device("positions", tokens)
            metadata = AttentionMetadata(
                query_start_loc=self._to_device("query_start_loc", rows + 1),
                seq_lens=self._to_device("seq_lens", rows),
                block_tables=self._to_device("block_tables", rows * width).view(rows, width),
                slot_mapping=self._to_device("slot_mapping", tokens),
                max_query_len=max(query_lens),
                max_seq_len=max(seq_lens),
                query_lens_cpu=query_lens + [1] * (rows - num_reqs),
                seq_lens_cpu=seq_lens + [0] * (rows - num_reqs),
            )
        if graphs is not None and len(sampling) == num_reqs:
            device_sample_rows = self._row_numbers(num_reqs)  # decode rows 0..n-1: no copy
        else:
            device_sample_rows = self._to_device("sample_rows", len(sampling))
        lora = None
        if self.lora_slots is not None and (graphs is not None or any(r.lora is not None for r in requests)):
            # a graph reads the slot buffers on every replay, so a graph step fills them always
            slots = self.lora_slots.assign([r.lora for r in requests])
            lora = self.lora_slots.prepare(slots, query_lens, tokens)
        if self.device.type == "cuda":
            if self._copies_done is None:
                self._copies_done = torch.cuda.Event()
            self._copies_done.record()
        return StepInputs(
            input_ids=input_ids,
            positions=device_positions,
            attn_metadata=metadata,
            sample_rows=device_sample_rows,
            sample_requests=[requests[i] for i in sampling],
            num_reqs=num_reqs,
            graph_size=pad_to if graphs is not None else None,
            lora=lora,
        )

    def _row_numbers(self, n: int) -> torch.Tensor:
        """0..n-1 as int64 on the device, from one tensor kept there."""
        if self._rows is None or self._rows.shape[0] < n:
            self._rows = torch.arange(max(n, 256), dtype=torch.int64, device=self.device)
        return self._rows[:n]

    def _to_device(self, name: str, size: int) -> torch.Tensor:
        """The first `size` entries of host buffer `name` in the eager device buffer."""
        if self._eager is self._host:
            return self._host.get(name, size)
        dest = self._eager.get(name, size)
        dest.copy_(self._host.get(name, size), non_blocking=True)
        return dest


def _attach_lora(model, lora_config, cache, dtype, device, max_num_batched_tokens, max_num_seqs) -> AdapterSlots:
    """The model's LoRA layers (common/lora/lora_layer.py) and their --max-loras slots."""
    from common.lora.lora_layer import attach_lora, triton_ops_available

    if cache is None:
        raise ValueError("--enable-lora needs the engine's adapter cache")
    lora_dtype = dtype if lora_config.lora_dtype == "auto" else getattr(torch, lora_config.lora_dtype)
    context, layers = attach_lora(model, lora_config.max_loras, lora_config.max_lora_rank, lora_dtype)
    graph_rows = graphs_module.cuda_graph_sizes(max_num_seqs or DEFAULT_MAX_NUM_SEQS)[-1]
    return AdapterSlots(
        context,
        layers,
        cache,
        num_slots=lora_config.max_loras,
        max_tokens=max(max_num_batched_tokens, graph_rows),
        device=device,
        host_groups=device.type != "cuda" or not triton_ops_available(),
    )


def _backend_supports_cuda_graphs(model) -> bool:
    # The plain-torch backend reads lengths back to the host and masks with host-side
    # shapes; only the Triton kernels launch grids fixed by the batch size. The same holds
    # for mixture-of-experts layers: the torch reference reads expert counts back.
    triton_attention = getattr(getattr(model, "attn_backend", None), "name", None) == "triton"
    return triton_attention and experts_capture_in_cuda_graphs(model)

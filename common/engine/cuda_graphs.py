"""CUDA graphs of pure-decode steps, one per captured batch size.

A decode step at small batch is hundreds of short kernel launches; launched from Python
their host cost exceeds the GPU's work. So the model's forward and its logits are captured
once per batch size in CUDA graphs and a decode step of n sequences replays the graph of
the smallest captured size >= n. Rows past n are padding: slot -1 (write_kv stores
nothing) and sequence length 0 (the decode kernel reads nothing and outputs zeros).

Every graph reads its inputs from one set of static device tensors (DecodeInputs) and
writes its logits into one static buffer; the runner fills the inputs before a replay.
The graphs share one memory pool and are captured largest first, so the smaller ones
reuse the largest one's intermediate memory; a replay allocates nothing.

A captured launch fixes every grid: the attention backend must choose decode's split
count from the batch size alone (TritonAttentionBackend with max_model_len does), and the
captured metadata carries max_model_len as max_seq_len so a backend that chooses per step
chooses the same.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.attention.metadata import AttentionMetadata

# Batch sizes past this run eagerly: at that size the step's weight read dwarfs launch cost.
DEFAULT_MAX_CAPTURE_SIZE = 512


def cuda_graph_sizes(max_num_seqs: int, max_capture_size: int = DEFAULT_MAX_CAPTURE_SIZE) -> list[int]:
    """The batch sizes to capture: 1, 2, 4, then every 8 up to 256, every 16 beyond,
    ending at min(max_num_seqs, max_capture_size) itself."""
    top = min(max_num_seqs, max_capture_size)
    if top < 1:
        raise ValueError(f"max_num_seqs must be at least 1 to capture CUDA graphs, got {max_num_seqs}")
    steps = [1, 2, 4, *range(8, 256, 8), *range(256, top + 1, 16)]
    return [s for s in steps if s < top] + [top]


def padded_batch_size(num_reqs: int, sizes: Sequence[int]) -> int | None:
    """The smallest captured size holding num_reqs rows (sizes ascending); None past the largest."""
    i = bisect.bisect_left(sizes, num_reqs)
    return sizes[i] if i < len(sizes) else None


@dataclass
class DecodeInputs:
    """The static device tensors every captured decode graph reads, rows [0, max_batch).

    All but query_start_loc are views of one int64 buffer, `packed` (input ids, positions and
    slots, then seq_lens and the block tables as int32), so a step's inputs travel to the
    device in one copy (`packed_span`); `host_twin()` gives pinned host tensors of the same
    layout to fill."""

    input_ids: torch.Tensor  # [max_batch] int64
    positions: torch.Tensor  # [max_batch] int64
    slot_mapping: torch.Tensor  # [max_batch] int64
    seq_lens: torch.Tensor  # [max_batch] int32
    query_start_loc: torch.Tensor  # [max_batch + 1] int32: 0, 1, 2, ... (one token a row)
    block_tables: torch.Tensor  # [max_batch, max_blocks_per_seq] int32
    packed: torch.Tensor | None = None  # [3 * max_batch + int32 words / 2] int64

    @classmethod
    def allocate(
        cls, max_batch: int, max_blocks_per_seq: int, device: torch.device, pin_memory: bool = False
    ) -> DecodeInputs:
        words32 = max_batch + max_batch * max_blocks_per_seq
        packed = torch.zeros(
            3 * max_batch + -(-words32 // 2), dtype=torch.int64, device=device, pin_memory=pin_memory
        )
        int32 = packed[3 * max_batch :].view(torch.int32)
        inputs = cls(
            input_ids=packed[:max_batch],
            positions=packed[max_batch : 2 * max_batch],
            slot_mapping=packed[2 * max_batch : 3 * max_batch],
            seq_lens=int32[:max_batch],
            query_start_loc=torch.arange(max_batch + 1, dtype=torch.int32, device=device),
            block_tables=int32[max_batch : max_batch + max_batch * max_blocks_per_seq].view(
                max_batch, max_blocks_per_seq
            ),
            packed=packed,
        )
        inputs.slot_mapping.fill_(-1)
        return inputs

    def host_twin(self) -> DecodeInputs:
        """Pinned host tensors in the same packed layout."""
        return DecodeInputs.allocate(
            self.max_batch, self.max_blocks_per_seq, torch.device("cpu"), pin_memory=True
        )

    def packed_span(self, rows: int) -> int:
        """Words of `packed` that hold every input of the first `rows` rows (a prefix)."""
        return 3 * self.max_batch + -(-(self.max_batch + rows * self.max_blocks_per_seq) // 2)

    @property
    def max_batch(self) -> int:
        return self.input_ids.shape[0]

    @property
    def max_blocks_per_seq(self) -> int:
        return self.block_tables.shape[1]

    def metadata(self, batch_size: int, max_seq_len: int) -> AttentionMetadata:
        """Metadata over the first batch_size rows. Its host copies hold bounds, not this
        step's lengths: the GPU kernels read lengths from the device tensors."""
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: batch_size + 1],
            seq_lens=self.seq_lens[:batch_size],
            block_tables=self.block_tables[:batch_size],
            slot_mapping=self.slot_mapping[:batch_size],
            max_query_len=1,
            max_seq_len=max_seq_len,
            query_lens_cpu=[1] * batch_size,
            seq_lens_cpu=[max_seq_len] * batch_size,
        )


class DecodeCudaGraphs:
    """One captured forward + logits per batch size, replayed over DecodeInputs."""

    def __init__(
        self,
        model,
        kv_cache: torch.Tensor,
        sizes: Sequence[int],
        *,
        max_blocks_per_seq: int,
        max_model_len: int,
        vocab_size: int,
        lora_slots=None,
    ) -> None:
        """lora_slots (common/lora/adapter_slots.py): the LoRA layers' static step
        buffers, which every graph reads (the runner fills them before a replay)."""
        if not sizes:
            raise ValueError("no batch sizes to capture")
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = sorted(set(sizes))
        self.max_model_len = max_model_len
        self.device = kv_cache.device
        self.inputs = DecodeInputs.allocate(self.sizes[-1], max_blocks_per_seq, self.device)
        self.host_inputs = self.inputs.host_twin()  # a step's inputs, packed on the host
        self.logits = torch.empty(self.sizes[-1], vocab_size, dtype=torch.float32, device=self.device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.lora_slots = lora_slots

    def _forward(self, batch_size: int) -> None:
        lora = self.lora_slots
        if lora is not None:
            lora.context.batch = lora.static_batch(batch_size)
        try:
            self._forward_model(batch_size)
        finally:
            if lora is not None:
                lora.context.batch = None

    def _forward_model(self, batch_size: int) -> None:
        inputs = self.inputs
        hidden = self.model(
            inputs.input_ids[:batch_size],
            inputs.positions[:batch_size],
            self.kv_cache,
            inputs.metadata(batch_size, self.max_model_len),
        )
        self.logits[:batch_size] = self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size (again, if captured before). The inputs are all padding
        meanwhile, so capturing writes nothing into the KV cache."""
        self._graphs.clear()
        inputs = self.inputs
        inputs.slot_mapping.fill_(-1)
        inputs.seq_lens.zero_()
        inputs.input_ids.zero_()
        inputs.positions.zero_()
        if self.lora_slots is not None:
            self.lora_slots.clear_buffers()
        # Warm up outside any capture: Triton compiles, cuBLAS picks its kernels and
        # allocates its workspace here, not inside a graph.
        stream = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            for size in self.sizes:
                self._forward(size)
        stream.wait_stream(side)
        torch.cuda.synchronize(self.device)
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(size)
            self._graphs[size] = graph
        torch.cuda.synchronize(self.device)

    def padded_size(self, num_reqs: int) -> int | None:
        return padded_batch_size(num_reqs, self.sizes)

    def replay(self, batch_size: int) -> torch.Tensor:
        """Run the graph of `batch_size` on the current inputs; its logits [batch_size, V]
        (a view of the static buffer, overwritten by the next replay)."""
        self._graphs[batch_size].replay()
        return self.logits[:batch_size]

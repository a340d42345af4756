"""Tensors in, tokens out: run one scheduled step on the model and sample.

The runner owns the paged KV cache, one tensor shaped
[num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim] (DESIGN.md). A step
packs the new tokens of every scheduled request into one flat batch (no padding),
runs one forward, and samples only for the requests whose scheduled tokens reach the
end of their known tokens (a prefill chunk that stops mid-prompt samples nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.attention.metadata import AttentionMetadata
from common.engine.outputs import SampledToken
from common.engine.request import Request
from common.engine.sampler import Sampler
from common.engine.scheduled_batch import ScheduledBatch
from common.sampling_params import SamplingParams

_KV_CACHE_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
}


def resolve_kv_cache_dtype(kv_cache_dtype: str | torch.dtype, model_dtype: torch.dtype) -> torch.dtype:
    """--kv-cache-dtype as a torch dtype; "auto" stores K/V in the model's dtype."""
    if isinstance(kv_cache_dtype, torch.dtype):
        return kv_cache_dtype
    if kv_cache_dtype == "auto":
        return model_dtype
    try:
        return _KV_CACHE_DTYPES[kv_cache_dtype]
    except KeyError:
        raise ValueError(
            f"--kv-cache-dtype {kv_cache_dtype!r} is not supported; use auto or one of {', '.join(_KV_CACHE_DTYPES)}"
        ) from None


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn_metadata: AttentionMetadata
    sample_rows: torch.Tensor  # [n] int64: packed row of each sampling request's last token
    sample_requests: list[Request]


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
    ) -> None:
        self.model = model
        self.model_config = model_config
        self.device = torch.device(device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, dtype)
        # Backends never read a slot past a sequence's end (they mask it and zero it), so
        # on CPU the cache is left unwritten: the OS then commits only the pages that K/V
        # reach, and a default 4 GiB cache costs what it holds. On a GPU zeros are cheap.
        allocate = torch.zeros if self.device.type == "cuda" else torch.empty
        self.kv_cache = allocate(
            num_blocks,
            model_config.num_hidden_layers,
            2,
            model_config.num_key_value_heads,
            block_size,
            model_config.head_dim,
            dtype=self.kv_cache_dtype,
            device=self.device,
        )
        self.sampler = Sampler(seed)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> dict[str, SampledToken]:
        """Run one step; the sampled token of every request that reached its end, by id."""
        if not batch.requests or batch.total_num_scheduled_tokens == 0:
            return {}
        inputs = self.prepare_inputs(batch)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.attn_metadata)
        if not inputs.sample_requests:
            return {}
        logits = self.model.compute_logits(hidden[inputs.sample_rows])
        sampled = self.sampler(logits, inputs.sample_requests)
        return {r.request_id: s for r, s in zip(inputs.sample_requests, sampled, strict=True)}

    def prepare_inputs(self, batch: ScheduledBatch) -> StepInputs:
        """Pack the batch: token ids, positions, cache slots and attention metadata."""
        requests = batch.requests
        query_lens = list(batch.num_scheduled_tokens)
        starts = [r.num_computed_tokens for r in requests]
        seq_lens = [s + n for s, n in zip(starts, query_lens, strict=True)]
        num_reqs = len(requests)

        token_ids: list[int] = []
        for request, start, end in zip(requests, starts, seq_lens, strict=True):
            token_ids.extend(request.all_token_ids[start:end])

        query_start_loc = np.zeros(num_reqs + 1, dtype=np.int64)
        np.cumsum(query_lens, out=query_start_loc[1:])
        total = int(query_start_loc[-1])
        lens = np.asarray(query_lens, dtype=np.int64)
        # position of packed token t of request i: starts[i] + (t - query_start_loc[i])
        positions = np.arange(total, dtype=np.int64) + np.repeat(
            np.asarray(starts, dtype=np.int64) - query_start_loc[:-1], lens
        )

        max_blocks = max(len(t) for t in batch.block_tables)
        block_tables = np.zeros((num_reqs, max(max_blocks, 1)), dtype=np.int32)
        for i, table in enumerate(batch.block_tables):
            block_tables[i, : len(table)] = table
        rows = np.repeat(np.arange(num_reqs), lens)
        slot_mapping = (
            block_tables[rows, positions // self.block_size].astype(np.int64) * self.block_size
            + positions % self.block_size
        )

        sampling = [i for i, r in enumerate(requests) if seq_lens[i] == len(r.all_token_ids)]
        device = self.device
        metadata = AttentionMetadata(
            query_start_loc=_to_device(query_start_loc.astype(np.int32), device),
            seq_lens=_to_device(np.asarray(seq_lens, dtype=np.int32), device),
            block_tables=_to_device(block_tables, device),
            slot_mapping=_to_device(slot_mapping, device),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
        return StepInputs(
            input_ids=torch.tensor(token_ids, dtype=torch.int64).to(device, non_blocking=True),
            positions=_to_device(positions, device),
            attn_metadata=metadata,
            sample_rows=_to_device(query_start_loc[1:][sampling] - 1, device),
            sample_requests=[requests[i] for i in sampling],
        )


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device, non_blocking=True)


def profile_forward(
    model,
    model_config,
    *,
    num_tokens: int,
    max_model_len: int,
    max_num_seqs: int,
    block_size: int,
    kv_cache_dtype: str | torch.dtype,
    device: torch.device | str,
    dtype: torch.dtype,
) -> None:
    """One step at the largest size the scheduler may build, on a throwaway cache.

    The prompts are split at --max-model-len, and logits are computed for
    --max-num-seqs rows, so the activation peak is the one serving can reach.
    """
    lengths = [max_model_len] * (num_tokens // max_model_len)
    if num_tokens % max_model_len:
        lengths.append(num_tokens % max_model_len)
    tables, next_block = [], 0
    for length in lengths:
        n = -(-length // block_size)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    runner = ModelRunner(
        model,
        model_config,
        num_blocks=next_block,
        block_size=block_size,
        kv_cache_dtype=kv_cache_dtype,
        device=device,
        dtype=dtype,
    )
    requests = [
        Request(f"profile-{i}", [0] * length, SamplingParams(temperature=0.0))
        for i, length in enumerate(lengths)
    ]
    with torch.inference_mode():
        inputs = runner.prepare_inputs(ScheduledBatch(requests, lengths, tables))
        hidden = model(inputs.input_ids, inputs.positions, runner.kv_cache, inputs.attn_metadata)
        rows = torch.zeros(max_num_seqs, dtype=torch.int64, device=hidden.device)
        logits = model.compute_logits(hidden[rows])
        runner.sampler(logits, [requests[0]] * max_num_seqs)
    del runner, hidden, logits

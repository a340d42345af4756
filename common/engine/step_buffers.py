"""What a step carries between host and device.

StepInputs: one step's packed inputs, on the device. StepBuffers: the persistent flat
tensors the runner packs them into (on CUDA a pinned host set and a device set, so a
step copies without blocking and allocates nothing once the buffers have grown).
StepHandle: a launched step whose sampled tokens are still on their way to the host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from common.attention.metadata import AttentionMetadata
from common.engine.outputs import SampledToken
from common.engine.request import Request


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64 (T padded to the graph's size for a graph step)
    positions: torch.Tensor  # [T] int64
    attn_metadata: AttentionMetadata
    sample_rows: torch.Tensor  # [n] int64: packed row of each sampling request's last token
    sample_requests: list[Request]
    num_reqs: int  # real requests; rows past it are padding
    graph_size: int | None = None  # the captured batch size this step replays, if any
    lora: Any = None  # the step's LoRABatch (common/lora/lora_ops.py); None: no adapter runs


class StepHandle:
    """A launched step (ModelRunner.launch) whose sampled tokens are on their way to the host.

    A step with grammars that was launched ahead of its input tokens samples later: its
    forward runs while the host takes the step before it, and its masks need that step's
    tokens in the matchers first. `sample()` then samples (the engine calls it once the
    tokens feeding the step are in); `result()` and a step fed by this one need it done.
    """

    def __init__(
        self,
        row_of: dict[str, int],
        sampled: tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None] | None,
        sample: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]] | None = None,
    ) -> None:
        """sampled: (token ids [n] int64 where the step ran, their host copy, the event after
        the copy); None while `sample` (which returns them) is still to run."""
        self.row_of = row_of  # request id -> its row in token_ids
        self._sampled = sampled
        self._sample = sample

    def sample(self) -> None:
        """Run the step's sampling if it was left for later (idempotent)."""
        if self._sampled is None:
            assert self._sample is not None
            self._sampled, self._sample = self._sample(), None

    @property
    def token_ids(self) -> torch.Tensor:
        """[n] int64 sampled tokens where the step ran."""
        if self._sampled is None:
            raise RuntimeError("the step's sampling was left for later; call sample() first")
        return self._sampled[0]

    def result(self) -> dict[str, SampledToken]:
        """The sampled token of every request, by id; waits for the step to end."""
        self.sample()
        assert self._sampled is not None
        _, host, ready = self._sampled
        if ready is not None:
            ready.synchronize()
        tokens = host.tolist()
        return {rid: SampledToken(tokens[row]) for rid, row in self.row_of.items()}


# name -> dtype of each flat step buffer
_BUFFERS = {
    "input_ids": torch.int64,
    "positions": torch.int64,
    "slot_mapping": torch.int64,
    "seq_lens": torch.int32,
    "query_start_loc": torch.int32,
    "block_tables": torch.int32,  # [rows, width] row-major in the first rows * width entries
    "sample_rows": torch.int64,
    "token_ids_a": torch.int64,  # a launched step's sampled tokens, read back (two in turn)
    "token_ids_b": torch.int64,
}


class StepBuffers:
    """One flat tensor per step input, grown (never shrunk) to fit; pinned when asked."""

    def __init__(self, device: torch.device, pin: bool) -> None:
        self.device = device
        self.pin = pin
        self.tensors = {name: self._new(name, 64) for name in _BUFFERS}

    def _new(self, name: str, size: int) -> torch.Tensor:
        return torch.zeros(size, dtype=_BUFFERS[name], device=self.device, pin_memory=self.pin)

    def get(self, name: str, size: int) -> torch.Tensor:
        tensor = self.tensors[name]
        if tensor.shape[0] < size:
            tensor = self.tensors[name] = self._new(name, max(size, 2 * tensor.shape[0]))
        return tensor[:size]

"""The tensor-parallel process group and the few collectives the model needs.

A group is a torch.distributed ProcessGroup object held by its engine, not the global
default group, so several engines (and tests) can come and go in one process. Ranks
meet through a TCPStore on the loopback interface that rank 0 (the engine's process)
opens; the store carries only the rendezvous, never step data.

NCCL when every rank has its own CUDA device; gloo on CPU, and on CUDA when there are
fewer devices than ranks (several ranks sharing one GPU, for checks on a one-GPU
machine), gloo then moving CUDA tensors through host memory.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

# Long enough for a first CUDA step of a large model on a slow rank; an idle engine
# waits on its step socket, never in a collective, so this never expires while idle.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=5)


def open_store(rank: int, size: int, port: int = 0) -> dist.TCPStore:
    """Rank 0 opens the store on a free loopback port (`store.port`); the others join it."""
    return dist.TCPStore(
        "127.0.0.1", port, size, rank == 0, timeout=RENDEZVOUS_TIMEOUT, wait_for_workers=False
    )


def group_backend(device: torch.device, size: int) -> str:
    """nccl when each of `size` ranks gets its own CUDA device, else gloo."""
    if device.type == "cuda" and torch.cuda.device_count() >= size:
        return "nccl"
    return "gloo"


def rank_device(device: torch.device, rank: int, size: int) -> torch.device:
    """The device rank `rank` runs on: cuda:rank when each rank has its own GPU."""
    if device.type != "cuda":
        return device
    if torch.cuda.device_count() >= size:
        return torch.device("cuda", rank)
    return torch.device("cuda", device.index or 0)


class TensorParallelGroup:
    """rank `rank` of `size`; the collectives block until every rank has called them."""

    def __init__(self, store: dist.Store, rank: int, size: int, device: torch.device, backend: str) -> None:
        self.rank = rank
        self.size = size
        self.device = device
        self.backend = backend
        prefixed = dist.PrefixStore("tp", store)
        if backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = COLLECTIVE_TIMEOUT
            self._pg = dist.ProcessGroupNCCL(prefixed, rank, size, options)
        elif backend == "gloo":
            self._pg = dist.ProcessGroupGloo(prefixed, rank, size, COLLECTIVE_TIMEOUT)
        else:
            raise ValueError(f"process group backend {backend!r} is not one of nccl, gloo")
        self._stage_on_host = backend == "gloo" and device.type != "cpu"

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """Reduce `tensor` over the ranks, in place; returns it."""
        options = dist.AllreduceOptions()
        options.reduceOp = op
        if self._stage_on_host:
            host = tensor.cpu()
            self._pg.allreduce([host], options).wait()
            tensor.copy_(host)
            return tensor
        self._pg.allreduce([tensor], options).wait()
        return tensor

    def min_int(self, value: int) -> int:
        """The smallest of every rank's `value`."""
        tensor = torch.tensor([value], dtype=torch.int64, device=self._comm_device())
        return int(self.all_reduce(tensor, dist.ReduceOp.MIN).item())

    def gather_to_first(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `tensor` (same shape everywhere) in rank order on rank 0; None elsewhere."""
        options = dist.GatherOptions()
        options.rootRank = 0
        source = tensor.cpu() if self._stage_on_host else tensor.contiguous()
        outputs = [[torch.empty_like(source) for _ in range(self.size)]] if self.is_first else []
        self._pg.gather(outputs, [source], options).wait()
        if not self.is_first:
            return None
        return [t.to(tensor.device) for t in outputs[0]] if self._stage_on_host else outputs[0]

    def broadcast_from_first(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` copied into every rank's `tensor`, in place; returns it."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        if self._stage_on_host:
            host = tensor.cpu()
            self._pg.broadcast([host], options).wait()
            tensor.copy_(host)
            return tensor
        self._pg.broadcast([tensor], options).wait()
        return tensor

    def close(self) -> None:
        pg, self._pg = self._pg, None
        if pg is not None and hasattr(pg, "shutdown"):
            try:
                pg.shutdown()
            except Exception:  # a peer that already exited leaves nothing to shut down
                pass

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

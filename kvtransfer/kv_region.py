"""The registered KV-cache tensor seen as `num_blocks` contiguous byte regions.

The layout [num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim] keeps one
block of every layer in one region, so a transfer moves one region per block. This
module owns the byte view, the bounds checks on block ids, and the copies between the
cache and host buffers that the TCP path sends or receives (through pinned host
memory when the cache lives on a GPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvtransfer.kv_cache_spec import KVCacheSpec


class KVRegion:
    def __init__(self, kv_cache: torch.Tensor, spec: KVCacheSpec) -> None:
        if not isinstance(kv_cache, torch.Tensor):
            raise TypeError(f"the KV cache must be a torch.Tensor, got {type(kv_cache).__name__}")
        if kv_cache.dim() != 6 or tuple(kv_cache.shape[1:]) != spec.kv_cache_shape(0)[1:]:
            raise ValueError(
                f"the KV cache has shape {tuple(kv_cache.shape)}, but the KVCacheSpec describes "
                f"[num_blocks, {', '.join(map(str, spec.kv_cache_shape(0)[1:]))}] "
                "([num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]); "
                "build the spec from the same model config as the cache"
            )
        if not kv_cache.is_contiguous():
            raise ValueError("the KV cache must be one contiguous tensor: blocks are sent as byte regions")
        if kv_cache.shape[0] < 1:
            raise ValueError("the KV cache has no blocks")
        self.tensor = kv_cache
        self.num_blocks = int(kv_cache.shape[0])
        self.block_len = kv_cache[0].numel() * kv_cache.element_size()
        self.base_addr = kv_cache.data_ptr()
        self.is_cuda = kv_cache.is_cuda
        self.device_id = (kv_cache.device.index or 0) if self.is_cuda else 0
        self.mem_type = "VRAM" if self.is_cuda else "DRAM"
        # one row of bytes per block; on CPU also a numpy view, whose rows zmq sends without a copy
        self.blocks = kv_cache.view(torch.uint8).view(self.num_blocks, self.block_len)
        self._blocks_np = None if self.is_cuda else self.blocks.numpy()
        self._stream = torch.cuda.Stream(kv_cache.device) if self.is_cuda else None

    def block_addresses(self) -> np.ndarray:
        """Rows (address, length, device id) of every block: NIXL's descriptor list."""
        rows = np.empty((self.num_blocks, 3), dtype=np.uint64)
        rows[:, 0] = self.base_addr + np.arange(self.num_blocks, dtype=np.uint64) * self.block_len
        rows[:, 1] = self.block_len
        rows[:, 2] = self.device_id
        return rows

    def read_blocks(self, block_ids: Sequence[int]) -> list[Any]:
        """One buffer per block, in order, for zero-copy sending.

        On CPU the buffers are views of the cache itself; on a GPU the blocks are first
        gathered into pinned host memory that the buffers keep alive.
        """
        if self._blocks_np is not None:
            return [self._blocks_np[b] for b in block_ids]
        index = torch.tensor(list(block_ids), dtype=torch.long, device=self.tensor.device)
        staging = torch.empty((len(block_ids), self.block_len), dtype=torch.uint8, pin_memory=True)
        with torch.cuda.stream(self._stream):
            staging.copy_(self.blocks.index_select(0, index), non_blocking=True)
        self._stream.synchronize()
        rows = staging.numpy()
        return [rows[i] for i in range(len(block_ids))]

    def write_blocks(self, block_ids: Sequence[int], buffers: Sequence[Any]) -> None:
        """Copy one received buffer of `block_len` bytes into each block."""
        if self._blocks_np is not None:
            for b, buf in zip(block_ids, buffers, strict=True):
                self._blocks_np[b] = np.frombuffer(buf, dtype=np.uint8)
            return
        staging = torch.empty((len(block_ids), self.block_len), dtype=torch.uint8, pin_memory=True)
        rows = staging.numpy()
        for i, buf in enumerate(buffers):
            rows[i] = np.frombuffer(buf, dtype=np.uint8)
        index = torch.tensor(list(block_ids), dtype=torch.long, device=self.tensor.device)
        with torch.cuda.stream(self._stream):
            self.blocks.index_copy_(0, index, staging.to(self.tensor.device, non_blocking=True))
        self._stream.synchronize()

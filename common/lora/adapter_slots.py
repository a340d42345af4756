"""The --max-loras device slots a forward pass reads, and each step's LoRABatch.

A step may mix up to --max-loras adapters (the scheduler admits no more) with base-model
requests. Before the step, `assign` makes sure each of its adapters sits in a slot,
writing an adapter's weights into the least recently used slot that this step does not
need; `prepare` then writes which slot every packed token uses into static device
buffers, the ones the captured CUDA graphs read too, so a replay needs no new tensors.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from common.lora.adapter_cache import AdapterCache
from common.lora.lora_layer import LinearLoRA, LoRAContext
from common.lora.lora_ops import LoRABatch
from common.lora.lora_request import LoRARequest


class AdapterSlots:
    def __init__(
        self,
        context: LoRAContext,
        layers: list[LinearLoRA],
        cache: AdapterCache,
        *,
        num_slots: int,
        max_tokens: int,
        device: torch.device,
        host_groups: bool,
    ) -> None:
        """max_tokens: the most tokens a step packs (the static buffers' size);
        host_groups: build the torch path's per-slot token lists (CPU, or CUDA without
        the Triton kernels)."""
        self.context = context
        self.layers = layers
        self.cache = cache
        self.num_slots = num_slots
        self.host_groups = host_groups
        self.device = device
        self._slot_of: OrderedDict[tuple[str, str], int] = OrderedDict()  # (name, path) -> slot, LRU first
        self._rank = [0] * num_slots
        self.num_slot_loads = 0  # adapters written into a slot since start
        pin = device.type == "cuda"
        # host staging and the device buffers: token_slots [max_tokens], sorted_tokens
        # [max_tokens], slot_starts [num_slots + 1], in one int32 tensor for one copy
        size = 2 * max_tokens + num_slots + 1
        self._host = torch.zeros(size, dtype=torch.int32, pin_memory=pin)
        self._device = (
            self._host if device.type == "cpu" else torch.zeros(size, dtype=torch.int32, device=device)
        )
        self.max_tokens = max_tokens

    # -- which adapter sits where ---------------------------------------------------

    def assign(self, loras: Sequence[LoRARequest | None]) -> list[int]:
        """The slot of each request's adapter (-1 for the base model), loading the ones
        not in a slot yet; LoRAError when one cannot be read, RuntimeError when the step
        needs more adapters than there are slots (the scheduler never asks that)."""
        needed = {lora.hash_key: lora for lora in loras if lora is not None}
        if len(needed) > self.num_slots:
            raise RuntimeError(
                f"a step needs {len(needed)} adapters but there are {self.num_slots} slots (--max-loras)"
            )
        for key, lora in needed.items():
            if key in self._slot_of:
                self._slot_of.move_to_end(key)
            else:
                self._load(key, lora, needed)
        return [-1 if lora is None else self._slot_of[lora.hash_key] for lora in loras]

    def _load(self, key: tuple[str, str], lora: LoRARequest, needed: dict) -> None:
        adapter = self.cache.get(lora)
        used = set(self._slot_of.values())
        free = [s for s in range(self.num_slots) if s not in used]
        if free:
            slot = free[0]
        else:  # the least recently used slot whose adapter this step does not run
            victim = next(k for k in self._slot_of if k not in needed)
            slot = self._slot_of.pop(victim)
        for layer in self.layers:
            layer.set_slot(slot, adapter)
        self._rank[slot] = adapter.rank
        self._slot_of[key] = slot
        self.num_slot_loads += 1

    def forget(self, name: str) -> None:
        """Free the slots of adapter `name` (unloaded): later steps load it again if asked."""
        for key in [k for k in self._slot_of if k[0] == name]:
            del self._slot_of[key]

    def names(self) -> list[str]:
        return [name for name, _ in self._slot_of]

    # -- one step's batch -----------------------------------------------------------

    def prepare(self, request_slots: Sequence[int], query_lens: Sequence[int], rows: int) -> LoRABatch:
        """The step's LoRABatch in the static buffers: request i's query_lens[i] tokens use
        slot request_slots[i]; tokens past sum(query_lens), up to `rows`, are padding."""
        tokens = rows
        if tokens > self.max_tokens:
            raise ValueError(f"a step of {tokens} tokens is more than the LoRA buffers' {self.max_tokens}")
        host = self._host.numpy()
        token_slots = host[:tokens]
        total = int(sum(query_lens))
        token_slots[:total] = np.repeat(np.asarray(request_slots, dtype=np.int32), query_lens)
        token_slots[total:] = -1
        keyed = np.where(token_slots < 0, self.num_slots, token_slots)
        order = np.argsort(keyed, kind="stable")
        sorted_tokens = host[self.max_tokens : self.max_tokens + tokens]
        sorted_tokens[:] = order
        starts = host[2 * self.max_tokens : 2 * self.max_tokens + self.num_slots + 1]
        starts[0] = 0
        np.cumsum(np.bincount(keyed, minlength=self.num_slots + 1)[: self.num_slots], out=starts[1:])
        if self._device is not self._host:
            self._device.copy_(self._host, non_blocking=True)
        groups: list[tuple[int, int, torch.Tensor]] = []
        if self.host_groups:
            index = torch.from_numpy(order.astype(np.int64)).to(self.device)
            for slot in range(self.num_slots):
                lo, hi = int(starts[slot]), int(starts[slot + 1])
                if hi > lo:
                    groups.append((slot, self._rank[slot], index[lo:hi]))
        return self._views(tokens, groups)

    def clear_buffers(self) -> None:
        """Every token padding (slot -1): the state graphs are captured in."""
        host = self._host.numpy()
        host[: self.max_tokens] = -1
        host[self.max_tokens : 2 * self.max_tokens] = np.arange(self.max_tokens)
        host[2 * self.max_tokens :] = 0
        if self._device is not self._host:
            self._device.copy_(self._host)

    def static_batch(self, tokens: int) -> LoRABatch:
        """The static buffers' first `tokens` tokens as a batch, as they are (a graph being
        captured reads them; nothing is copied)."""
        if tokens > self.max_tokens:
            raise ValueError(f"a step of {tokens} tokens is more than the LoRA buffers' {self.max_tokens}")
        return self._views(tokens, [])

    def _views(self, tokens: int, groups) -> LoRABatch:
        d, m = self._device, self.max_tokens
        return LoRABatch(
            token_slots=d[:tokens],
            sorted_tokens=d[m : m + tokens],
            slot_starts=d[2 * m : 2 * m + self.num_slots + 1],
            groups=groups,
        )

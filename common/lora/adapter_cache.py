"""The adapters a worker holds in host memory: read once from their folders, at most
--max-cpu-loras of them, the least recently used dropped first (and read again from
its folder if a request names it later)."""

from __future__ import annotations

from collections import OrderedDict

import torch

from common.lora.lora_request import LoRARequest
from common.lora.peft_adapter import LoRAError, PeftAdapter, load_peft_adapter


class AdapterCache:
    def __init__(self, model_config, *, capacity: int, max_rank: int, dtype: torch.dtype) -> None:
        self.model_config = model_config
        self.capacity = capacity
        self.max_rank = max_rank
        self.dtype = dtype
        self._adapters: OrderedDict[str, PeftAdapter] = OrderedDict()
        self.num_loads = 0  # adapters read from their folders since start

    def get(self, lora: LoRARequest) -> PeftAdapter:
        """The adapter `lora` names, read from its folder unless held; LoRAError when it
        cannot be served, or when its name is held for another folder."""
        adapter = self._adapters.get(lora.name)
        if adapter is not None:
            if adapter.path != lora.path:
                raise LoRAError(
                    f"LoRA adapter {lora.name!r} is already loaded from {adapter.path}, not {lora.path}; "
                    "unload it first or give the new one another name"
                )
            self._adapters.move_to_end(lora.name)
            return adapter
        adapter = load_peft_adapter(
            lora.name, lora.path, self.model_config, max_rank=self.max_rank, dtype=self.dtype
        )
        self.num_loads += 1
        self._adapters[lora.name] = adapter
        while len(self._adapters) > self.capacity:
            self._adapters.popitem(last=False)
        return adapter

    def drop(self, name: str) -> bool:
        """Forget adapter `name`; False when it was not held."""
        return self._adapters.pop(name, None) is not None

    def names(self) -> list[str]:
        """The adapters held, least recently used first."""
        return list(self._adapters)

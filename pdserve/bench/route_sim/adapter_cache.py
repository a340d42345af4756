"""A simulated worker's host cache of LoRA adapters (vLLM's --max-cpu-loras): at most
`capacity` adapters, the least recently used evicted for a new one. A request naming an
adapter the worker lacks makes it load the adapter (read it from disk, copy it to the
device); the engine step that admits the request waits for the load, as vLLM's model
runner loads adapters inside the step.

What it leaves out: the device slots (--max-loras) and their per-step cap on distinct
adapters; a swap between host and device memory is a copy of a few MB beside a load from
disk. An adapter evicted while requests using it still run keeps its device copy for them.
"""

from __future__ import annotations

from collections import OrderedDict


class AdapterCache:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"--max-cpu-loras must be at least 1, got {capacity}")
        self.capacity = capacity
        self._held: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.num_loads = 0

    def names(self) -> list[str]:
        """The adapters held, least recently used first (what a load report lists)."""
        return list(self._held)

    def __contains__(self, name: str) -> bool:
        return name in self._held

    def use(self, name: str | None) -> bool:
        """A request naming `name` (None: the base model) starts; True when the adapter had
        to be loaded for it."""
        if name is None:
            return False
        if name in self._held:
            self._held.move_to_end(name)
            return False
        self.num_loads += 1
        self._held[name] = None
        if len(self._held) > self.capacity:
            self._held.popitem(last=False)
        return True

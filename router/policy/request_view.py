"""What the scorers know about the request being routed: its prompt's size, per worker
how many of its leading blocks that worker already holds, and the LoRA adapter it names
with the workers that hold that adapter."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass
class RequestView:
    num_prompt_tokens: int
    num_prompt_blocks: int  # full blocks of the prompt, the ones that can be cached
    block_size: int
    overlap_blocks: dict[Hashable, int] = field(default_factory=dict)  # worker id -> cached leading blocks
    lora_name: str | None = None  # the adapter the request names; None: the base model
    # worker ids that hold `lora_name` (their last load report lists it, or the router just
    # sent them a request naming it: router/policy/lora_holders.py)
    lora_holders: frozenset[Hashable] = frozenset()

    def overlap_of(self, worker_id: Hashable) -> int:
        """Leading prompt blocks `worker_id` holds."""
        return self.overlap_blocks.get(worker_id, 0)

    def overlap_tokens_of(self, worker_id: Hashable) -> int:
        return min(self.overlap_of(worker_id) * self.block_size, self.num_prompt_tokens)

    def new_prefill_tokens_of(self, worker_id: Hashable) -> int:
        """Prompt tokens `worker_id` would have to compute."""
        return self.num_prompt_tokens - self.overlap_tokens_of(worker_id)

    def lacks_lora(self, worker_id: Hashable) -> bool:
        """Whether `worker_id` would have to load the request's adapter before running it."""
        return self.lora_name is not None and worker_id not in self.lora_holders

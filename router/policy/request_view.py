"""What the scorers know about the request being routed: its prompt's size and, per
worker, how many of its leading blocks that worker already holds."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass
class RequestView:
    num_prompt_tokens: int
    num_prompt_blocks: int  # full blocks of the prompt, the ones that can be cached
    block_size: int
    overlap_blocks: dict[Hashable, int] = field(default_factory=dict)  # worker id -> cached leading blocks

    def overlap_of(self, worker_id: Hashable) -> int:
        """Leading prompt blocks `worker_id` holds."""
        return self.overlap_blocks.get(worker_id, 0)

    def overlap_tokens_of(self, worker_id: Hashable) -> int:
        return min(self.overlap_of(worker_id) * self.block_size, self.num_prompt_tokens)

    def new_prefill_tokens_of(self, worker_id: Hashable) -> int:
        """Prompt tokens `worker_id` would have to compute."""
        return self.num_prompt_tokens - self.overlap_tokens_of(worker_id)

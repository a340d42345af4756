"""What the scheduler decided for one step: which requests run, and how many tokens each."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.engine.request import Request


@dataclass
class ScheduledBatch:
    # Requests in the order their tokens are packed. For request i the model computes
    # all_token_ids[num_computed_tokens : num_computed_tokens + num_scheduled_tokens[i]];
    # it samples a next token only when that reaches the end of all_token_ids.
    requests: list[Request]
    num_scheduled_tokens: list[int]
    # every block id the request holds, in order (its block table)
    block_tables: list[list[int]]
    preempted_request_ids: list[str] = field(default_factory=list)
    # requests finished (stopped, aborted) since the previous step: the runner drops
    # whatever it keeps per request for them
    finished_request_ids: list[str] = field(default_factory=list)
    # scheduled ahead (Scheduler.schedule_ahead), before the previous step's tokens were
    # known: request i computes the token at num_computed_tokens + 1, which that step
    # samples, and samples the one after it
    ahead: bool = False

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    def __len__(self) -> int:
        return len(self.requests)

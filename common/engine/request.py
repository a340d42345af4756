"""One request's state inside an engine: its tokens, progress and status."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from common.lora.lora_request import LoRARequest
from common.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    # decode side: admitted with blocks, waiting for its prompt's KV to arrive from a producer
    WAITING_FOR_REMOTE_KV = 6
    # prefill side (prefill_only): done here after its first token; its blocks stay held
    # for a decode worker to pull, so it finishes with no finish_reason
    FINISHED_REMOTE_DECODE = 7

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISHED = frozenset(
    {
        RequestStatus.FINISHED_STOPPED,
        RequestStatus.FINISHED_LENGTH,
        RequestStatus.FINISHED_ABORTED,
        RequestStatus.FINISHED_REMOTE_DECODE,
    }
)
_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    priority: int = 0  # lower runs first under --scheduling-policy priority
    arrival_time: float = field(default_factory=time.monotonic)
    cache_salt: str | None = None
    # consumer side: where a producer holds this prompt's KV (its first token is then
    # already an output); the scheduler pulls the blocks its own prefix cache lacks
    kv_transfer_params: dict[str, Any] | None = None
    # producer side: done here after the first token, its blocks held for a consumer
    prefill_only: bool = False
    # the LoRA adapter it runs under (its name and path enter every block hash); None: the base model
    lora: LoRARequest | None = None

    # prompt + output; the single source of truth for this request's tokens
    all_token_ids: list[int] = field(init=False)
    # tokens whose K/V are in the cache (cached prefix hits count as computed)
    num_computed_tokens: int = 0
    # prompt tokens found in the prefix cache at the first schedule; -1 before that
    num_cached_tokens: int = -1
    status: RequestStatus = RequestStatus.WAITING
    # hashes of the full blocks of all_token_ids, filled by the KV-cache manager
    block_hashes: list = field(default_factory=list)
    num_preemptions: int = 0
    stop_reason: int | None = None  # the stop token id that ended it, if one did
    # structured outputs: the grammar matcher (common/structured_output/matcher.py) that
    # every output token advances; None for free text
    grammar: Any = None
    # the grammar waits for sampling_params.structured_outputs_after (the end of reasoning)
    awaits_grammar: bool = field(init=False)
    # an output token the grammar refused (a producer's first token sampled without it):
    # the request cannot go on under its grammar and ends
    grammar_refused: bool = False

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        self.awaits_grammar = self.sampling_params.structured_outputs_after is not None

    @property
    def active_grammar(self) -> Any:
        """The matcher that constrains the next token, or None (free text, or reasoning)."""
        return None if self.awaits_grammar else self.grammar

    @property
    def awaits_remote_kv_admission(self) -> bool:
        """Its prompt's KV is at a producer and it has no blocks here yet."""
        return self.kv_transfer_params is not None and self.status == RequestStatus.WAITING

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids) :]

    def append_output_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
        if self.grammar is None:
            return
        if self.awaits_grammar:
            self.awaits_grammar = token_id != self.sampling_params.structured_outputs_after
        elif not self.grammar.accept_token(token_id):
            self.grammar_refused = True

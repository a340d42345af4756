"""What the engine reports after a step, per request that made progress."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]]  # the k most likely (token id, logprob), best first


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    stop_reason: int | None  # the stop token id, when one ended the request
    num_prompt_tokens: int
    num_cached_tokens: int
    # a prefill_only request's answer: where a decode worker pulls its KV blocks from
    kv_transfer_params: dict[str, Any] | None = None
    # set when the request failed (finish_reason "abort"): what went wrong, for the client
    error: str | None = None


@dataclass
class SampledToken:
    """The token the sampler chose for one request this step (what the scheduler consumes)."""

    token_id: int
    logprobs: TokenLogprobs | None = None

"""How one request wants its tokens chosen; shared by the router and the engine.

Torch-free: the router validates these before a request ever reaches a worker.
Stop strings are not here: text lives outside the engine, which only sees token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.structured_output.spec import StructuredOutputSpec


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    # None: no logprobs; k >= 0: the sampled token's logprob plus the k most likely.
    logprobs: int | None = None
    # The grammar the output must follow (JSON schema, regex, choice, ...); None: free text.
    structured_outputs: StructuredOutputSpec | None = None
    # The token that ends the model's reasoning (a reasoning parser's </think>): the grammar
    # applies only to the output after it. None: from the first output token.
    structured_outputs_after: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate(self, vocab_size: int, max_logprobs: int) -> None:
        """Raise ValueError naming the field and the allowed range."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disable), 0 (disable) or at least 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2 <= self.presence_penalty <= 2:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not 0 < self.repetition_penalty <= 2:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.logprobs is not None and not 0 <= self.logprobs <= max_logprobs:
            raise ValueError(f"logprobs must be in [0, {max_logprobs}] (--max-logprobs), got {self.logprobs}")
        after = self.structured_outputs_after
        if after is not None and not 0 <= after < vocab_size:
            raise ValueError(f"structured_outputs_after: {after} is outside the vocabulary [0, {vocab_size})")
        for token_id in self.stop_token_ids:
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"stop_token_ids: {token_id} is outside the vocabulary [0, {vocab_size})")
        for token_id, bias in (self.logit_bias or {}).items():
            if not 0 <= token_id < vocab_size:
                raise ValueError(
                    f"logit_bias: token id {token_id} is outside the vocabulary [0, {vocab_size})"
                )
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias: bias {bias} for token {token_id} must be in [-100, 100]")

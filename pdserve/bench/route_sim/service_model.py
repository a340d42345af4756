"""How long one engine step of a simulated worker takes.

A worker runs continuous batching with chunked prefill, as pdserve's engine does: each
step computes one token of every decoding sequence plus up to a token budget of prompt
chunks, and a step costs

    step_overhead                                   (weights read once per step)
  + (prefill tokens + decode tokens) / token_rate   (the dense layers, per token)
  + (query, key) pairs of the prefill chunks / (token_rate × attention_crossover_tokens)
  + context tokens of the decoding sequences × kv_read_s_per_ktoken / 1000
  + lora_load_s × LoRA adapters the step loads first               (adapter_cache.py)

so prefill time grows with the uncached prompt tokens (and, through attention, with the
context they attend to), and decode time with the batch and its context. Cached prompt
tokens cost nothing but the attention of the new tokens over them.

The defaults describe an 8B-parameter dense model with grouped-query attention on one
data-center GPU at a modest efficiency: ~10k tokens/s through the dense layers, attention
as costly as those at ~30k tokens of context (that model's ratio of attention to dense
FLOPs per token), 128 KiB of KV per token read at ~3 TB/s, and ~5 ms a step to read the
weights; loading a rank-16 adapter of that model on all seven projections (84 MB in
bf16) takes ~50 ms, a disk read at ~2 GB/s and the copy to the device. Routing quality
depends on the ratios (how much of a worker's time a cache miss costs against a long
queue), and the trace's load against `token_rate` sets how busy the
workers are: at the defaults, 8 workers replaying the Mooncake trace are comfortably busy
when routing finds the cache and overloaded when it does not.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceModel:
    token_rate: float = 10_000.0  # tokens/s through the dense layers
    step_overhead_s: float = 0.005
    # context length at which a token's attention costs as much as its dense layers; 0: free
    attention_crossover_tokens: float = 30_000.0
    kv_read_s_per_ktoken: float = 0.04e-3  # a decode token reading 1,000 context tokens' KV
    max_num_batched_tokens: int = 8192  # token budget of a step (prefill chunks + decodes)
    max_num_seqs: int = 256  # sequences running at once on a worker
    lora_load_s: float = 0.05  # loading a LoRA adapter the worker's host cache lacks

    def validate(self) -> None:
        """Raise ValueError naming the setting that is out of range."""
        if not self.token_rate > 0:
            raise ValueError(f"service model: the token rate must be positive, got {self.token_rate}")
        for name in ("step_overhead_s", "attention_crossover_tokens", "kv_read_s_per_ktoken", "lora_load_s"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"service model: {name} must be 0 or more, got {value}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError(
                "service model: max_num_batched_tokens and max_num_seqs must be at least 1, got "
                f"{self.max_num_batched_tokens} and {self.max_num_seqs}"
            )

    def step_seconds(self, num_tokens: int, attention_pairs: float, decode_context_tokens: int) -> float:
        """One step computing `num_tokens` tokens (prefill chunks and one per decoding
        sequence), whose prefill chunks attend over `attention_pairs` (query, key) pairs and
        whose decoding sequences read `decode_context_tokens` tokens of KV."""
        seconds = self.step_overhead_s + num_tokens / self.token_rate
        if self.attention_crossover_tokens:
            seconds += attention_pairs / (self.token_rate * self.attention_crossover_tokens)
        return seconds + decode_context_tokens / 1000 * self.kv_read_s_per_ktoken

    def to_json(self) -> dict[str, float]:
        return dict(vars(self))


def chunk_attention_pairs(context_before: int, chunk_tokens: int) -> float:
    """(query, key) pairs of a causal chunk of `chunk_tokens` tokens after `context_before`
    tokens already in the cache."""
    return chunk_tokens * context_before + chunk_tokens * (chunk_tokens + 1) / 2

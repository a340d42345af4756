"""Conditional disaggregation: when the part of the prompt that the chosen decode worker
lacks is short, sending it to a prefill worker and pulling the KV back costs more than
the decode worker computing it itself, so the decode worker prefills it locally."""

from __future__ import annotations

# Below this many uncached prompt tokens the decode worker prefills locally. A starting
# point (a few chunks of a decode step's token budget), to be replaced by a measured value.
DEFAULT_LOCAL_PREFILL_THRESHOLD = 512


def should_prefill_locally(
    prompt_len: int,
    overlap_tokens_on_decode: int,
    threshold: int = DEFAULT_LOCAL_PREFILL_THRESHOLD,
) -> bool:
    """True when fewer than `threshold` prompt tokens are missing from the decode worker's
    cache. A threshold of 0 always sends the prefill to a prefill worker."""
    if prompt_len < 0 or overlap_tokens_on_decode < 0:
        raise ValueError(
            f"prompt_len ({prompt_len}) and overlap_tokens_on_decode ({overlap_tokens_on_decode}) "
            "must be 0 or more"
        )
    if threshold < 0:
        raise ValueError(f"the local-prefill threshold must be 0 or more tokens, got {threshold}")
    return prompt_len - min(overlap_tokens_on_decode, prompt_len) < threshold

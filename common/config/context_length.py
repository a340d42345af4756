"""--max-model-len: resolving it against the model, and checking a request against it.

Torch-free, so the API layer refuses an over-long request with the same words as the
engine that would refuse it later. The first sentences are vLLM's, word for word:
OpenAI clients and scripts written against vLLM match on them.
"""

from __future__ import annotations


def resolve_max_model_len(requested: int | None, model_len: int) -> int:
    """--max-model-len, or the model's context length (max_position_embeddings) when unset;
    ValueError when it is below 1 or beyond what the model was trained for."""
    max_model_len = requested if requested is not None else model_len
    if max_model_len < 1:
        raise ValueError(f"--max-model-len must be at least 1, got {max_model_len}")
    if max_model_len > model_len:
        raise ValueError(
            f"--max-model-len {max_model_len} is larger than the model's context length {model_len} "
            "(max_position_embeddings); lower --max-model-len"
        )
    return max_model_len


def context_length_error(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> str | None:
    """Why a prompt of `num_prompt_tokens` asking for `max_tokens` more does not fit in
    `max_model_len` tokens, or None when it fits. max_tokens None means "the rest of the
    context", which needs room for at least one token."""
    if max_tokens is None:
        if num_prompt_tokens < max_model_len:
            return None
        message = (
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens} tokens in the messages, leaving no room for the completion. "
            "Please reduce the length of the messages."
        )
    elif num_prompt_tokens + max_tokens <= max_model_len:
        return None
    else:
        message = (
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the messages, {max_tokens} in "
            "the completion). Please reduce the length of the messages or completion."
        )
    if num_prompt_tokens > max_model_len:  # no max_tokens could help: say what would
        message += (
            f" The prompt has {num_prompt_tokens} tokens, more than --max-model-len {max_model_len}; "
            "shorten it or raise --max-model-len."
        )
    return message

"""The decode-step benchmark's baseline: transformers' greedy `generate` on a random-weight
model of the same config, dtype and device."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def hf_generate_tokens_per_s(
    config_path: Path,
    dtype: torch.dtype,
    device: torch.device,
    batch: int,
    context: int,
    new_tokens: int,
    seed: int,
) -> tuple[float, float]:
    """transformers' greedy `generate` on a random-weight model of the same config: (decode
    tokens/s with the prefill's time taken out, tokens/s including it)."""
    import transformers

    config = transformers.LlamaConfig(**json.loads(config_path.read_text()))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, context), generator=generator).to(device)
    mask = torch.ones_like(ids)

    def generate(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        assert out.shape[1] == context + n, out.shape
        return time.perf_counter() - start

    generate(2)  # warm-up
    with_prefill = generate(new_tokens)
    prefill = generate(1)
    decode_secs = with_prefill - prefill
    decode_tok_s = batch * (new_tokens - 1) / decode_secs if decode_secs > 0 else float("nan")
    return decode_tok_s, batch * new_tokens / with_prefill

"""Which attention backend a worker uses: the Triton kernels on CUDA, plain torch elsewhere."""

from __future__ import annotations

import torch

from common.attention.reference import TorchAttentionBackend

# --kv-cache-dtype values (vLLM's names) the backends can hold
SUPPORTED_KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32", "fp8", "fp8_e4m3")


def get_attention_backend(
    device: torch.device | str, kv_cache_dtype: str = "auto", max_model_len: int | None = None
):
    """TritonAttentionBackend on a CUDA device when triton imports, else TorchAttentionBackend.

    max_model_len, when given, fixes decode's split count per batch size (see
    TritonAttentionBackend), which CUDA-graph capture needs.
    """
    if kv_cache_dtype not in SUPPORTED_KV_CACHE_DTYPES:
        raise ValueError(
            f"--kv-cache-dtype {kv_cache_dtype!r} is not supported; use one of "
            f"{', '.join(SUPPORTED_KV_CACHE_DTYPES)} (fp8 means e4m3 with per-layer scales)"
        )
    device = torch.device(device)
    if device.type != "cuda":
        return TorchAttentionBackend()
    try:
        from common.attention.triton_backend import TritonAttentionBackend
    except ImportError as exc:
        if exc.name is None or exc.name.split(".")[0] != "triton":
            raise
        return TorchAttentionBackend()  # no triton on this machine: the plain-torch path still runs on CUDA
    return TritonAttentionBackend(max_model_len=max_model_len)

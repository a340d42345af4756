"""get_attention_backend: the Triton kernels on CUDA, the plain-torch reference elsewhere."""

from __future__ import annotations

import pytest
import torch

from common.attention.backend_select import get_attention_backend
from common.attention.reference import TorchAttentionBackend


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_cpu_gets_the_torch_backend(kv_cache_dtype):
    assert isinstance(get_attention_backend("cpu", kv_cache_dtype), TorchAttentionBackend)


def test_unsupported_kv_cache_dtype_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="fp8_e5m2.*not supported.*fp8_e4m3"):
        get_attention_backend("cpu", "fp8_e5m2")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gets_the_triton_backend_with_a_fixed_split_policy():
    from common.attention.triton_backend import TritonAttentionBackend

    backend = get_attention_backend(torch.device("cuda"), "fp8", max_model_len=4096)
    assert isinstance(backend, TritonAttentionBackend)
    assert backend.max_model_len == 4096

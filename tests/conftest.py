"""Session-wide fixtures: the embedded model and its transformers reference, loaded once."""

from __future__ import annotations

import pytest
import torch

from common.model_files import ModelSource, embedded_default_model

# CI has two cores; pin torch to them so parallel test processes do not oversubscribe.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def smollm2_source() -> ModelSource:
    return embedded_default_model()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_source):
    """transformers' LlamaForCausalLM on the same GGUF, fp32, CPU: the reference."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_source.path.parent), gguf_file=smollm2_source.path.name, dtype=torch.float32
    )
    model.eval()
    return model


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_source):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(smollm2_source.path.parent), gguf_file=smollm2_source.path.name
    )


@pytest.fixture(scope="session")
def smollm2_model(smollm2_source):
    """(model, ModelConfig) of the embedded model, fp32 on CPU, loaded once for every
    test directory; engines of different settings share it (LLMEngine.from_config(model=...))."""
    from common.attention.backend_select import get_attention_backend
    from common.models.loader import load_model

    return load_model(
        smollm2_source, load_format="auto", dtype="float32", device="cpu", attn_backend=get_attention_backend("cpu")
    )


@pytest.fixture(scope="session")
def tiny():
    """(model, ModelConfig) of a tiny random Llama (tests/tiny_llama.py), built once; a test
    module that needs another shape defines its own `tiny`."""
    from tests.tiny_llama import tiny_llama

    return tiny_llama()


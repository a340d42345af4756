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

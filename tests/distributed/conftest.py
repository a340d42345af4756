"""Fixtures for the tensor-parallel tests: a tiny checkpoint on disk, and a hang guard.

Every rank but 0 is a separate process that must find the model on disk, so the tiny
model is written as a Hugging Face folder (config.json + model.safetensors).
"""

from __future__ import annotations

import faulthandler
import json

import pytest
from safetensors.torch import save_file

from common.attention.reference import TorchAttentionBackend
from common.model_files import ModelSource
from common.models.config import ModelConfig
from common.models.llama import LlamaForCausalLM
from tests.tiny_llama import randomize, tiny_hf_config

# A vocabulary and MLP width that 4 ranks split unevenly, and biases on q/k/v and o_proj
# (o_proj's must be added once, after the all-reduce).
TINY_TP_CONFIG = tiny_hf_config(
    vocab_size=62, hidden_size=32, intermediate_size=50, tie_word_embeddings=False, attention_bias=True,
    torch_dtype="float32",
)
# Long enough for a slow shared CI machine to start 4 ranks; short enough that a
# deadlocked collective fails the run instead of hanging it.
HANG_LIMIT_S = 600


@pytest.fixture(scope="session")
def tiny_tp_folder(tmp_path_factory) -> ModelSource:
    folder = tmp_path_factory.mktemp("tiny-tp")
    (folder / "config.json").write_text(json.dumps(TINY_TP_CONFIG))
    model = randomize(LlamaForCausalLM(ModelConfig.from_hf_config(TINY_TP_CONFIG), TorchAttentionBackend()))
    tensors = {name: t.clone().contiguous() for name, t in model.weight_targets().items()}
    save_file(tensors, str(folder / "model.safetensors"))
    return ModelSource("hf_dir", folder, "tiny-tp")


@pytest.fixture
def hang_guard():
    """Abort the whole run, with every thread's traceback, if a test deadlocks."""
    faulthandler.dump_traceback_later(HANG_LIMIT_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()

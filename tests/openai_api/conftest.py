"""The embedded model's tokenizer, and a ServedModel around it with a small context."""

from __future__ import annotations

import pytest

from common.openai_api import ServedModel
from common.tokenizer import load_tokenizer

SERVED_NAMES = ["smollm2", "smollm2-alias"]
MAX_MODEL_LEN = 256
VOCAB_SIZE = 49152


@pytest.fixture(scope="session")
def tokenizer(smollm2_source):
    return load_tokenizer(smollm2_source)


@pytest.fixture
def served(tokenizer) -> ServedModel:
    return ServedModel(
        names=list(SERVED_NAMES), max_model_len=MAX_MODEL_LEN, tokenizer=tokenizer, vocab_size=VOCAB_SIZE
    )

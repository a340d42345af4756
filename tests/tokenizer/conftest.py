"""Tokenizers shared by the tokenizer tests: the embedded model's and a tiny SentencePiece GGUF's."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_gguf_files import write_tiny_spm_gguf

from common.tokenizer import Tokenizer, load_tokenizer
from common.tokenizer.gguf_vocab import tokenizer_from_gguf


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_source) -> Tokenizer:
    return load_tokenizer(smollm2_source)


@pytest.fixture(scope="session")
def tiny_spm_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_spm") / "tiny-spm.gguf"
    write_tiny_spm_gguf(path)
    return path


@pytest.fixture(scope="session")
def tiny_spm_tokenizer(tiny_spm_gguf) -> Tokenizer:
    return tokenizer_from_gguf(tiny_spm_gguf)

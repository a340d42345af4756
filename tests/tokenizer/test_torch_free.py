"""The router imports the text side of the model; it must not pull in torch."""

from __future__ import annotations

from tests.harness.torch_free import assert_imports_without_torch


def test_importing_the_tokenizer_modules_leaves_torch_out():
    assert_imports_without_torch(
        "common.tokenizer.tokenizer", "common.tokenizer.chat_template", "common.tokenizer.detokenizer",
        "common.tokenizer.stop_strings", "common.tokenizer.gguf_vocab", "common.tokenizer.hf_folder",
        then="""
            from common.model_files import embedded_default_model
            from common.tokenizer import load_tokenizer
            tokenizer = load_tokenizer(embedded_default_model())
            tokenizer.apply_chat_template([{'role': 'user', 'content': 'hi'}])
        """,
    )  # fmt: skip

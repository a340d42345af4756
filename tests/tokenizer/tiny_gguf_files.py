"""Tiny GGUF files for tokenizer tests: a byte-level BPE one and a SentencePiece one, with
vocabularies learned by `tokenizers`' BPE trainer on a small corpus, and no tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_SPM_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ bos_token }}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
)

_CORPUS = [
    "Hello world, this is a small test of the tokenizer. I'm sure it's FINE, they'll see.",
    "Numbers 12345 and 2024-01-31, 3.14159; symbols !? #include <stdio.h>\n\n\tint x = 42;",
    "def main():\n    return 42\n\n\nclass A:\n    pass  # comment   ",
    "The quick brown fox jumps over the lazy dog. hello hello world world the the the",
    "Café naïve 中文测试 日本語 😀 emoji ² ½",
]


def _write_gguf(path: Path, tokenizer_keys: dict[str, Any]) -> None:
    """A tensor-less llama GGUF with these tokenizer keys (a value of None leaves the key out)."""
    import gguf

    kinds = gguf.GGUFValueType
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    for key, value in tokenizer_keys.items():
        if value is None:
            continue
        if isinstance(value, bool):
            writer.add_key_value(key, value, kinds.BOOL)
        elif isinstance(value, int):
            writer.add_key_value(key, value, kinds.UINT32)
        elif isinstance(value, str):
            writer.add_key_value(key, value, kinds.STRING)
        else:
            item_kind = {str: kinds.STRING, int: kinds.INT32, float: kinds.FLOAT32}[type(value[0])]
            writer.add_key_value(key, value, kinds.ARRAY, sub_type=item_kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _train_bpe(pre_tokenizer: Any, vocab_size: int, **trainer_options: Any) -> dict[str, Any]:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, **trainer_options)
    backend.train_from_iterator(_CORPUS * 10, trainer)
    return json.loads(backend.to_str())["model"]


def write_byte_level_gguf(path: Path, **overrides: Any) -> None:
    """Byte-level BPE learned with the GPT-2 word split, ChatML control tokens at ids 0-2;
    overrides replace tokenizer keys by full name (None drops one)."""
    from tokenizers import pre_tokenizers

    trained = _train_bpe(
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        vocab_size=700,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokens = sorted(trained["vocab"], key=trained["vocab"].get)
    keys = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3),
        "tokenizer.ggml.merges": [" ".join(merge) for merge in trained["merges"]],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
    }
    _write_gguf(path, {**keys, **overrides})


def write_tiny_spm_gguf(path: Path) -> None:
    """SentencePiece BPE: <unk>, <s>, </s>, 256 byte tokens, then pieces scored by the
    order the trainer learned them (as SentencePiece scores its merges)."""
    from tokenizers import pre_tokenizers

    trained = _train_bpe(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"), vocab_size=300)
    rank = {"".join(merge): index for index, merge in enumerate(trained["merges"])}
    pieces = sorted(trained["vocab"], key=trained["vocab"].get)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    _write_gguf(
        path,
        {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
            "tokenizer.ggml.scores": [0.0] * 259
            + [float(-rank.get(p, 1000 + i)) for i, p in enumerate(pieces)],
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.add_bos_token": True,
            "tokenizer.chat_template": TINY_SPM_CHAT_TEMPLATE,
        },
    )

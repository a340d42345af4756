"""Rebuilding a model's tokenizer from a GGUF file's metadata.

A GGUF carries no tokenizer.json, only llama.cpp's description of one: the token
strings (`tokenizer.ggml.tokens`), their kinds (`token_type`), BPE merges or
SentencePiece scores, the special token ids, whether to add BOS/EOS, and the name of
the rule that splits text into words before BPE (`tokenizer.ggml.pre`). This module
turns that description back into a `tokenizers.Tokenizer`:

- "gpt2": byte-level BPE. The vocabulary and merges are used as stored; the word
  split comes from the table below, keyed by `tokenizer.ggml.pre`.
- "llama": SentencePiece BPE with byte fallback. The merges are recovered from the
  token scores (a SentencePiece merge joins the two pieces whose union scores best).

Reading goes through common/gguf_file.py, which needs numpy only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from common.gguf_file import open_gguf
from common.tokenizer.tokenizer import Tokenizer

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class WordSplit:
    """How a byte-level BPE vocabulary splits text into words before merging.

    Each regex is applied in turn, keeping both the matches and the text between
    them as pieces (llama.cpp's unicode_regex_split; `tokenizers` calls this an
    "isolated" Split). ignore_merges: a word that is itself a token is taken whole.
    add_bos: whether prompts start with BOS when the file does not say.
    """

    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_GPT2_SPLIT = WordSplit((_GPT2,))
_DIGITS_THEN_GPT2 = WordSplit((r"\p{N}", _GPT2))
_LLAMA3_SPLIT = WordSplit((_LLAMA3,), ignore_merges=True, add_bos=True)
_QWEN2_SPLIT = WordSplit((_QWEN2,))

# tokenizer.ggml.pre → word split, following llama.cpp's names for each family.
WORD_SPLITS: dict[str, WordSplit] = {
    **dict.fromkeys(
        ["gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "jina-es", "jina-de", "gigachat", "mellum"],
        _GPT2_SPLIT,
    ),
    **dict.fromkeys(
        ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"], _DIGITS_THEN_GPT2
    ),
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx", "smaug-bpe", "lfm2"],
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"], _QWEN2_SPLIT),
    "chatglm-bpe": WordSplit((_LLAMA3,)),
    "glm4": WordSplit((_LLAMA3,)),
    **dict.fromkeys(["gpt-4o", "llama4"], WordSplit((_GPT4O,))),
    "tekken": WordSplit((_TEKKEN,), ignore_merges=True, add_bos=True),
    "falcon": WordSplit(
        (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    ),
    "default": WordSplit(
        (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    ),
}


def tokenizer_from_gguf(path: Path) -> Tokenizer:
    try:
        file = open_gguf(path)
    except OSError as exc:  # open_gguf raises ValueError, naming the fault, for a foreign file
        raise ValueError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    metadata = _GGUFMetadata(file.metadata, path)
    kind = metadata.get("tokenizer.ggml.model")
    if kind == "gpt2":
        backend = _byte_level_bpe(metadata)
    elif kind == "llama":
        backend = _sentencepiece_bpe(metadata)
    elif kind is None:
        raise ValueError(f"{path} has no tokenizer (tokenizer.ggml.model is missing); pass --tokenizer")
    else:
        raise ValueError(
            f"{path}: tokenizer.ggml.model {kind!r} is not supported (supported: 'gpt2' byte-level BPE, "
            "'llama' SentencePiece BPE); pass --tokenizer with a Hugging Face tokenizer folder"
        )
    return _wrap(backend, metadata)


class _GGUFMetadata:
    def __init__(self, values: Mapping[str, Any], path: Path):
        self._values = values
        self.path = path

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(
                f"{self.path}: the tokenizer needs {key}, which the file lacks; pass --tokenizer"
            )
        return value

    def keys(self) -> list[str]:
        return list(self._values)


def _token_types(metadata: _GGUFMetadata, num_tokens: int) -> list[int]:
    types = metadata.get("tokenizer.ggml.token_type")
    if types is None:
        return [NORMAL] * num_tokens
    if len(types) != num_tokens:
        raise ValueError(
            f"{metadata.path}: tokenizer.ggml.token_type has {len(types)} entries for {num_tokens} tokens"
        )
    return list(types)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's spelling of bytes as printable characters: printable Latin-1 bytes stand
    for themselves, the other bytes take the characters from U+0100 upwards, in order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    spelling = {byte: chr(byte) for byte in printable}
    next_char = 256
    for byte in range(256):
        if byte not in spelling:
            spelling[byte] = chr(next_char)
            next_char += 1
    return spelling


def _vocab(tokens: Sequence[str], respell: Callable[[int, str], str] | None = None) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        # a duplicate spelling keeps its first id, as a tokenizer.json vocabulary would
        vocab.setdefault(respell(token_id, token) if respell else token, token_id)
    return vocab


def _byte_level_bpe(metadata: _GGUFMetadata) -> tokenizers.Tokenizer:
    tokens = metadata.require("tokenizer.ggml.tokens")
    types = _token_types(metadata, len(tokens))
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.require("tokenizer.ggml.merges")]
    pre = metadata.get("tokenizer.ggml.pre", "default")
    split = WORD_SPLITS.get(pre)
    if split is None:
        raise ValueError(
            f"{metadata.path}: tokenizer.ggml.pre {pre!r} is not a word split pdserve knows "
            f"(known: {', '.join(sorted(WORD_SPLITS))}); pass --tokenizer with the model's Hugging Face "
            "tokenizer folder"
        )

    spelling = _byte_alphabet()
    alphabet = set(spelling.values())

    def respell(token_id: int, token: str) -> str:
        # Added tokens are matched in raw text, so they keep their raw spelling; a plain
        # token written in raw text (some converters do) is put back in the byte alphabet.
        if types[token_id] in (CONTROL, USER_DEFINED) or set(token) <= alphabet:
            return token
        return "".join(spelling[byte] for byte in token.encode("utf-8"))

    backend = tokenizers.Tokenizer(
        models.BPE(vocab=_vocab(tokens, respell), merges=merges, ignore_merges=split.ignore_merges)
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in split.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    _add_special_tokens(backend, tokens, types)
    _set_bos_eos(backend, metadata, tokens, default_add_bos=split.add_bos)
    return backend


def _sentencepiece_merges(
    tokens: Sequence[str], types: Sequence[int], scores: Sequence[float]
) -> list[tuple[str, str]]:
    """The merges SentencePiece BPE implies: a piece is made of two shorter pieces, and
    pieces that score higher are made first."""
    normal = {token: token_id for token_id, token in enumerate(tokens) if types[token_id] == NORMAL}
    merges = []
    for token, token_id in normal.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                merges.append((-scores[token_id], token_id, normal[left], (left, right)))
    merges.sort()
    return [merge for *_, merge in merges]


def _sentencepiece_bpe(metadata: _GGUFMetadata) -> tokenizers.Tokenizer:
    tokens = metadata.require("tokenizer.ggml.tokens")
    types = _token_types(metadata, len(tokens))
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    if unk_id is None:
        unk_id = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))

    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab=_vocab(tokens),
            merges=_sentencepiece_merges(tokens, types, scores),
            unk_token=None if unk_id is None else tokens[unk_id],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    _add_special_tokens(backend, tokens, types)
    _set_bos_eos(backend, metadata, tokens, default_add_bos=True)
    return backend


def _add_special_tokens(backend: tokenizers.Tokenizer, tokens: Sequence[str], types: Sequence[int]) -> None:
    """Control tokens become special added tokens and user-defined ones plain added
    tokens: both are matched whole in the text instead of being cut into pieces."""
    backend.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == CONTROL]
    )
    backend.add_tokens(
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types)
            if t == USER_DEFINED
        ]
    )


def _set_bos_eos(
    backend: tokenizers.Tokenizer, metadata: _GGUFMetadata, tokens: Sequence[str], default_add_bos: bool
) -> None:
    """Put BOS before and EOS after every encoded text, as add_bos_token/add_eos_token say."""
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    eos_id = metadata.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", default_add_bos)) and bos_id is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos_id is not None

    def label(token_id: int) -> str:
        # the template syntax reserves ':' and whitespace; the label only names the id there
        text = tokens[token_id]
        return text if re.fullmatch(r"[^\s:]+", text) else f"special_{token_id}"

    def template(sequence: str, type_id: int) -> list[str]:
        return (
            ([f"{label(bos_id)}:{type_id}"] if add_bos else [])
            + [f"${sequence}:{type_id}"]
            + ([f"{label(eos_id)}:{type_id}"] if add_eos else [])
        )

    specials = [(label(i), i) for i, wanted in ((bos_id, add_bos), (eos_id, add_eos)) if wanted]
    backend.post_processor = processors.TemplateProcessing(
        single=template("A", 0),
        pair=template("A", 0) + template("B", 1),
        special_tokens=list(dict.fromkeys(specials)),
    )


_SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "sep_token": "tokenizer.ggml.seperator_token_id",  # sic: llama.cpp's key
    "pad_token": "tokenizer.ggml.padding_token_id",
    "cls_token": "tokenizer.ggml.cls_token_id",
    "mask_token": "tokenizer.ggml.mask_token_id",
}
_END_IDS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def _wrap(backend: tokenizers.Tokenizer, metadata: _GGUFMetadata) -> Tokenizer:
    tokens = metadata.require("tokenizer.ggml.tokens")

    def token_of(key: str) -> str | None:
        token_id = metadata.get(key)
        if token_id is None:
            return None
        if not 0 <= token_id < len(tokens):
            raise ValueError(
                f"{metadata.path}: {key} = {token_id} is outside the vocabulary [0, {len(tokens)})"
            )
        return tokens[token_id]

    special_tokens = {
        name: token for name, key in _SPECIAL_IDS.items() if (token := token_of(key)) is not None
    }
    end_token_ids = [metadata.get(key) for key in _END_IDS if metadata.get(key) is not None]

    templates = {}
    default = metadata.get("tokenizer.chat_template")
    if default is not None:
        templates["default"] = default
    prefix = "tokenizer.chat_template."
    for key in metadata.keys():
        if key.startswith(prefix):
            templates[key[len(prefix) :]] = metadata.get(key)
    return Tokenizer(backend, special_tokens, templates, end_token_ids)

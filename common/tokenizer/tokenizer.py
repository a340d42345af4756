"""The model's tokenizer: text to token ids and back, special tokens, chat templates.

One class for every source: a Hugging Face folder (tokenizer.json and its config
files, read by `hf_folder.py`) and a GGUF file (the vocabulary in its metadata,
rebuilt by `gguf_vocab.py`). Both end up as a `tokenizers.Tokenizer` plus the named
special tokens and the chat templates, which is all this class holds.

Torch-free: the router tokenizes and renders chat templates itself.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from common.model_files import ModelSource
from common.tokenizer.chat_template import render_chat_template

# The names transformers gives the named special tokens; templates see them as variables.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class Tokenizer:
    """A `tokenizers.Tokenizer` with its named special tokens and chat templates.

    `special_tokens` maps names from SPECIAL_TOKEN_NAMES to token strings; ids are
    looked up in the vocabulary. `chat_templates` maps template names to Jinja
    sources ("default" is the one used when none is named). `end_token_ids` are the
    ids besides EOS that end a generation (generation_config.json's eos_token_id
    list, or a GGUF's end-of-turn token).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: Mapping[str, str] | None = None,
        chat_templates: Mapping[str, str] | None = None,
        end_token_ids: Sequence[int] = (),
    ):
        self.backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        unknown = set(self.special_tokens) - set(SPECIAL_TOKEN_NAMES)
        if unknown:
            raise ValueError(f"unknown special token names {sorted(unknown)}; use {SPECIAL_TOKEN_NAMES}")
        self.chat_templates = dict(chat_templates or {})
        self._end_token_ids = tuple(end_token_ids)

    # -- text and ids ------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their ids.

        add_special_tokens adds what the model adds to every prompt (a BOS for most
        Llama models, nothing for SmolLM2).
        """
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; bytes that do not form complete UTF-8 characters come out as U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary's own spelling of each id (byte-level BPE writes a space as "Ġ")."""
        tokens = []
        for token_id in ids:
            token = self.backend.id_to_token(token_id)
            if token is None:
                raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
            tokens.append(token)
        return tokens

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # -- vocabulary and special tokens ---------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a generation: EOS first, then the model's other end tokens."""
        ids = [] if self.eos_token_id is None else [self.eos_token_id]
        ids += [i for i in self._end_token_ids if i not in ids]
        return tuple(ids)

    @property
    def all_special_ids(self) -> set[int]:
        """Ids of the named special tokens and of every added token marked special."""
        ids = set(self.skipped_special_ids)
        ids.update(i for name in self.special_tokens if (i := self._special_id(name)) is not None)
        return ids

    @functools.cached_property
    def skipped_special_ids(self) -> frozenset[int]:
        """The ids decode(skip_special_tokens=True) leaves out: added tokens marked special."""
        return frozenset(
            token_id for token_id, added in self.backend.get_added_tokens_decoder().items() if added.special
        )

    @functools.cached_property
    def byte_token_ids(self) -> frozenset[int]:
        """Ids that decode to one raw byte (SentencePiece byte fallback, "<0xE4>").

        A run of them is decoded as a whole, so a later byte can change the text of the
        earlier ones; byte-level BPE has none (its bytes are ordinary tokens).
        """
        model = self.backend.model
        if not getattr(model, "byte_fallback", False):
            return frozenset()
        return frozenset(
            token_id
            for token, token_id in self.backend.get_vocab(with_added_tokens=False).items()
            if _BYTE_TOKEN.fullmatch(token)
        )

    # -- chat templates -------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The default chat template's source, or None when the model has none."""
        return self.chat_templates.get("default")

    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The template source to render: a named template, the given source, or the model's own."""
        templates = self.chat_templates
        if chat_template is not None:
            return templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in templates:
            return templates["tool_use"]
        template = self.chat_template
        if template is not None:
            return template
        if templates:
            raise ValueError(
                f"the model has several chat templates ({sorted(templates)}) and none is named "
                "'default'; pass one of these names or a template as chat_template"
            )
        raise ValueError(
            "the model has no chat template (tokenizer_config.json, chat_template.jinja or the GGUF "
            "key tokenizer.chat_template); pass one with --chat-template or use /v1/completions"
        )

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list | None = None,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text for a conversation, rendered as transformers renders it.

        chat_template may be a template's name or its Jinja source; other keyword
        arguments become template variables (e.g. enable_thinking=False).
        """
        return render_chat_template(
            self.get_chat_template(chat_template, tools),
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            special_tokens=self.special_tokens,
            **template_kwargs,
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.special_tokens.get('bos_token')!r}, "
            f"eos={self.special_tokens.get('eos_token')!r}, chat_templates={sorted(self.chat_templates)})"
        )


def load_tokenizer(source: ModelSource, tokenizer_path: str | None = None) -> Tokenizer:
    """The tokenizer for a model: from --tokenizer when given, else from the model's own files.

    tokenizer_path may be a folder with tokenizer.json, a .gguf file, a folder holding
    one .gguf file, or a Hugging Face Hub id (fetched only where the network allows).
    """
    from common.tokenizer.gguf_vocab import tokenizer_from_gguf
    from common.tokenizer.hf_folder import tokenizer_from_hf_folder

    if tokenizer_path is None:
        if source.kind == "gguf":
            return tokenizer_from_gguf(source.path)
        return tokenizer_from_hf_folder(source.path)

    path = Path(tokenizer_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"--tokenizer {tokenizer_path}: a file must be a .gguf file; otherwise pass a folder"
            )
        return tokenizer_from_gguf(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return tokenizer_from_hf_folder(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return tokenizer_from_gguf(ggufs[0])
        raise ValueError(
            f"--tokenizer {tokenizer_path}: the folder has no tokenizer.json"
            + (f" and {len(ggufs)} .gguf files; name one of them" if ggufs else "")
        )
    if tokenizer_path.count("/") == 1 and not tokenizer_path.startswith((".", "/", "~")):
        return tokenizer_from_hf_folder(_fetch_from_hub(tokenizer_path))
    raise ValueError(f"--tokenizer {tokenizer_path}: no such file or folder, and not a Hub id (org/name)")


def _fetch_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(
            f"--tokenizer {repo_id} looks like a Hub id, but huggingface_hub is not installed; "
            "pip install huggingface_hub, or pass a local folder or .gguf file"
        ) from None
    try:
        local = snapshot_download(
            repo_id,
            allow_patterns=[
                "tokenizer*.json",
                "special_tokens_map.json",
                "generation_config.json",
                "*.jinja",
            ],
            local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1",
        )
    except Exception as exc:  # network errors, gated or missing repos
        raise ValueError(
            f"--tokenizer {repo_id}: could not fetch it from the Hugging Face Hub ({type(exc).__name__}: {exc}); "
            "check the network and HF_TOKEN, or pass a local folder or .gguf file"
        ) from None
    return Path(local)

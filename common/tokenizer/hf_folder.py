"""Reading a tokenizer from a Hugging Face folder.

tokenizer.json holds the `tokenizers` pipeline, including what encode adds around a
text (BOS, EOS): transformers 5 ignores add_bos_token/add_eos_token in the config when
tokenizer.json exists, and so do we. Around it, the folder says which tokens are
special and what they are for (tokenizer_config.json, or the older
special_tokens_map.json), the chat templates (in tokenizer_config.json as one string
or a list of named ones, or in chat_template.jinja and additional_chat_templates/),
and which tokens end a generation (generation_config.json). These are read the way
transformers reads them, so a prompt encodes to the same ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken

from common.tokenizer.tokenizer import SPECIAL_TOKEN_NAMES, Tokenizer


def tokenizer_from_hf_folder(folder: Path) -> Tokenizer:
    folder = Path(folder)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        hint = (
            " (it has tokenizer.model, a SentencePiece file; convert it once with transformers: "
            "AutoTokenizer.from_pretrained(folder).save_pretrained(folder))"
            if (folder / "tokenizer.model").is_file()
            else ""
        )
        raise ValueError(f"{folder} has no tokenizer.json{hint}; pass --tokenizer with a folder that has one")
    backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    config = _read_json(folder / "tokenizer_config.json")
    special_tokens_map = _read_json(folder / "special_tokens_map.json")

    special_tokens: dict[str, str] = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name, special_tokens_map.get(name))
        if value is not None:
            special_tokens[name] = _token_content(value)

    _add_missing_tokens(backend, config, special_tokens_map, special_tokens)
    generation_config = _read_json(folder / "generation_config.json")
    end_ids = generation_config.get("eos_token_id")
    end_token_ids = [end_ids] if isinstance(end_ids, int) else list(end_ids or [])
    return Tokenizer(backend, special_tokens, _chat_templates(folder, config), end_token_ids)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); fix or remove the file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str:
    """A special token as the config writes it: a string or a serialized AddedToken."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"a special token must be a string or an object with 'content', got {value!r}")


def _added_token(value: Any, special: bool) -> AddedToken:
    if isinstance(value, str):
        return AddedToken(value, special=special, normalized=False)
    return AddedToken(
        value["content"],
        single_word=value.get("single_word", False),
        lstrip=value.get("lstrip", False),
        rstrip=value.get("rstrip", False),
        normalized=value.get("normalized", not special),
        special=value.get("special", special),
    )


def _add_missing_tokens(
    backend: tokenizers.Tokenizer,
    config: dict[str, Any],
    special_tokens_map: dict[str, Any],
    special_tokens: dict[str, str],
) -> None:
    """Tokens the config declares but tokenizer.json lacks become added tokens, as transformers does."""
    wanted: list[AddedToken] = []
    for _, value in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda item: int(item[0])):
        wanted.append(_added_token(value, special=bool(value.get("special", False))))
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = config.get(key, special_tokens_map.get(key)) or []
        if isinstance(extra, dict):  # extra_special_tokens may name its tokens
            extra = list(extra.values())
        wanted.extend(_added_token(value, special=True) for value in extra)
    wanted.extend(AddedToken(token, special=True, normalized=False) for token in special_tokens.values())

    known = set(backend.get_vocab(with_added_tokens=True))
    for token in wanted:
        if token.content in known:
            continue
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        known.add(token.content)


def _chat_templates(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    """Named chat templates; a .jinja file wins over the config entry of the same name."""
    templates: dict[str, str] = {}
    in_config = config.get("chat_template")
    if isinstance(in_config, str):
        templates["default"] = in_config
    elif isinstance(in_config, list):
        for entry in in_config:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and "template" in entry):
                raise ValueError(
                    f"{folder / 'tokenizer_config.json'}: chat_template entries must be "
                    f'{{"name": ..., "template": ...}}, got {entry!r}'
                )
            templates[entry["name"]] = entry["template"]
    elif in_config is not None:
        raise ValueError(
            f"{folder / 'tokenizer_config.json'}: chat_template must be a string or a list of named "
            f"templates, got {type(in_config).__name__}"
        )

    legacy = _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(legacy, str):
        templates["default"] = legacy
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        templates["default"] = jinja.read_text(encoding="utf-8")
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        for path in sorted(extra.glob("*.jinja")):
            templates[path.stem] = path.read_text(encoding="utf-8")
    return templates

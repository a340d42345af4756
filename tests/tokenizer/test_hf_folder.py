"""A tokenizer read from a Hugging Face folder encodes and renders chats as transformers does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.model_files import ModelSource
from common.tokenizer import load_tokenizer

TEXTS = [
    "Hello, world!",
    "def f(x):\n    return x  *  2\n",
    "Emoji 😀 and 中文 and <|im_start|>special<|im_end|>",
    "",
]
MESSAGES = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]


@pytest.fixture(scope="module")
def saved_folder(hf_smollm2_tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    hf_smollm2_tokenizer.save_pretrained(folder)
    return folder


def _copy_folder(source: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file():
            (target / path.name).write_bytes(path.read_bytes())
    return target


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _hf_from(folder: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def _ours_from(folder: Path):
    return load_tokenizer(ModelSource("hf_dir", folder, folder.name))


def test_saved_folder_encodes_decodes_and_renders_like_transformers(saved_folder):
    hf, ours = _hf_from(saved_folder), _ours_from(saved_folder)
    for text in TEXTS:
        ids = hf.encode(text)
        assert ours.encode(text) == ids
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    for add_generation_prompt in (True, False):
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt) == (
            hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
        )
    assert ours.eos_token_id == hf.eos_token_id and ours.bos_token_id == hf.bos_token_id
    assert ours.vocab_size == len(hf)


def test_tokenizer_json_alone_decides_what_encode_adds_as_in_transformers(saved_folder, tmp_path):
    # transformers 5 ignores the config's add_bos_token when tokenizer.json exists
    folder = _copy_folder(saved_folder, tmp_path / "flags")
    _edit_config(folder, add_bos_token=True, add_eos_token=True)
    hf, ours = _hf_from(folder), _ours_from(folder)
    assert ours.encode("Hi") == hf.encode("Hi") == [26843]

    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    }
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    hf, ours = _hf_from(folder), _ours_from(folder)
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text)
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    assert ours.encode("Hi") == [1, 26843]


def test_named_templates_in_the_config_are_used_like_transformers(saved_folder, tmp_path):
    folder = _copy_folder(saved_folder, tmp_path / "named")
    (folder / "chat_template.jinja").unlink()
    templates = [
        {
            "name": "default",
            "template": "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}",
        },
        {"name": "tool_use", "template": "tools={{ tools | tojson }};{{ messages[-1]['content'] }}"},
    ]
    _edit_config(folder, chat_template=templates)
    hf, ours = _hf_from(folder), _ours_from(folder)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert ours.apply_chat_template(MESSAGES) == hf.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )
    assert ours.apply_chat_template(MESSAGES, tools=tools) == hf.apply_chat_template(
        MESSAGES, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert ours.apply_chat_template(MESSAGES, chat_template="tool_use") == hf.apply_chat_template(
        MESSAGES, chat_template="tool_use", tokenize=False, add_generation_prompt=True
    )


def test_a_chat_template_string_in_the_config_is_the_default(saved_folder, tmp_path):
    folder = _copy_folder(saved_folder, tmp_path / "string")
    (folder / "chat_template.jinja").unlink()
    _edit_config(folder, chat_template="{{ bos_token }}{{ messages[0]['content'] }}")
    assert _ours_from(folder).apply_chat_template(MESSAGES) == "<|im_start|>Hi there"


def test_a_chat_template_file_wins_over_the_config(saved_folder, tmp_path):
    folder = _copy_folder(saved_folder, tmp_path / "file")
    _edit_config(folder, chat_template="from the config")
    (folder / "chat_template.jinja").write_text("from the file")
    assert _ours_from(folder).apply_chat_template(MESSAGES) == "from the file"


def test_generation_config_end_tokens_join_eos(saved_folder, tmp_path):
    folder = _copy_folder(saved_folder, tmp_path / "gen")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert _ours_from(folder).eos_token_ids == (2, 0)


def test_special_tokens_map_fills_in_what_the_config_lacks(saved_folder, tmp_path):
    folder = _copy_folder(saved_folder, tmp_path / "map")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": {"content": "<|endoftext|>", "special": True}})
    )
    assert _ours_from(folder).eos_token_id == 0


def test_a_config_token_missing_from_the_vocabulary_is_added_as_special(saved_folder, tmp_path):
    folder = _copy_folder(saved_folder, tmp_path / "added")
    _edit_config(folder, additional_special_tokens=["<|tool_call|>"])
    hf, ours = _hf_from(folder), _ours_from(folder)
    assert ours.encode("a<|tool_call|>b") == hf.encode("a<|tool_call|>b")
    assert ours.vocab_size == len(hf) == 49153
    assert ours.token_to_id("<|tool_call|>") in ours.all_special_ids


def test_a_folder_with_a_broken_config_names_the_file(saved_folder, tmp_path):
    folder = _copy_folder(saved_folder, tmp_path / "broken")
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        _ours_from(folder)


def test_a_folder_with_only_a_sentencepiece_model_says_how_to_convert(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="tokenizer.model.*save_pretrained"):
        _ours_from(tmp_path)


def test_load_tokenizer_takes_a_tokenizer_folder_path(smollm2_source, saved_folder):
    tokenizer = load_tokenizer(smollm2_source, tokenizer_path=str(saved_folder))
    assert tokenizer.encode("Hello world") == [19556, 905]

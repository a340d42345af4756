"""A tokenizer rebuilt from GGUF metadata encodes and decodes exactly as transformers' does."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tiny_gguf_files import write_byte_level_gguf

from common.model_files import ModelSource
from common.tokenizer import load_tokenizer
from common.tokenizer.gguf_vocab import tokenizer_from_gguf

VARIED_TEXTS = [
    "Hello, world!",
    "The capital of France is Paris. It has 2,148,271 inhabitants (2020).",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    "   leading spaces, trailing spaces   ",
    "tabs\tand\t\ttabs, newlines\n\n\nand\r\nwindows line ends",
    "multiple     spaces     between words",
    "digits: 0 1 12 123 1234 12345 3.14159 1e-10 -42 0x1F",
    "I'm sure they'll say it's fine; we've done it, you'd agree. I'M LOUD, IT'S",
    "Unicode: café, naïve, Zürich, Ångström, façade, résumé",
    "Emoji: 😀🎉👍🏽 family: 👨‍👩‍👧‍👦 flags: 🇯🇵🇫🇷",
    "中文测试：你好，世界！日本語のテキスト。한국어 문장입니다.",
    "Русский текст и ελληνικά και العربية و עברית",
    "math ∑∫√∞ ≤ ≥ ≠ and arrows → ← ⇒",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>glued<|endoftext|>to<|im_start|>special tokens",
    "almost special: <|im_start> <im_end|> < |im_end| >",
    "",
    " ",
    "\n",
    "a",
    "URL: https://example.com/path?query=1&b=2#frag and email a.b@c.org",
    'JSON: {"key": [1, 2, {"nested": null}], "b": true}',
]


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_embedded_gguf_encodes_like_transformers(smollm2_tokenizer, hf_smollm2_tokenizer, text):
    for add_special_tokens in (True, False):
        assert smollm2_tokenizer.encode(
            text, add_special_tokens=add_special_tokens
        ) == hf_smollm2_tokenizer.encode(text, add_special_tokens=add_special_tokens)


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_embedded_gguf_decodes_like_transformers(smollm2_tokenizer, hf_smollm2_tokenizer, text):
    ids = hf_smollm2_tokenizer.encode(text, add_special_tokens=False)
    for skip in (True, False):
        assert smollm2_tokenizer.decode(ids, skip_special_tokens=skip) == hf_smollm2_tokenizer.decode(
            ids, skip_special_tokens=skip
        )


RANDOM_TEXT = st.lists(
    st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(
            [" ", "  ", "\n", "\t", "'s", "'LL", "<|im_start|>", "<|im_end|>", "123", "😀", "中", " ²"]
        ),
    ),
    max_size=40,
).map("".join)


def _references_differ_on(text: str) -> bool:
    """Where transformers' GGUF tokenizer and SmolLM2's own differ (see original_smollm2_pipeline):
    a numeral after two or more whitespace characters, or a numeral outside ASCII."""
    for at, ch in enumerate(text):
        if unicodedata.category(ch).startswith("N") and (
            not ch.isascii() or (at >= 2 and text[at - 1].isspace() and text[at - 2].isspace())
        ):
            return True
    return False


@pytest.fixture(scope="module")
def original_smollm2_pipeline(hf_smollm2_tokenizer):
    """SmolLM2's own tokenizer.json splits every numeral off before byte-level BPE
    (Digits(individual_digits) + ByteLevel), which llama.cpp records as pre "smollm".
    transformers' GGUF loader ignores that name and splits with the plain GPT-2 rule.
    The two differ only around numerals: "x  1" is "x", "ĠĠ", "1" here and "x", "Ġ",
    "Ġ", "1" there; " ²" is "Ġ", "Â²" here and "ĠÂ", "²" there. We follow the model's own."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    backend = Backend.from_str(hf_smollm2_tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return backend


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=RANDOM_TEXT)
def test_embedded_gguf_encodes_random_text_like_transformers(smollm2_tokenizer, hf_smollm2_tokenizer, text):
    assume(not _references_differ_on(text))  # see original_smollm2_pipeline; the next test covers these
    assert smollm2_tokenizer.encode(text) == hf_smollm2_tokenizer.encode(text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=RANDOM_TEXT)
def test_embedded_gguf_encodes_random_text_like_the_models_own_tokenizer(
    smollm2_tokenizer, original_smollm2_pipeline, text
):
    assert smollm2_tokenizer.encode(text) == original_smollm2_pipeline.encode(text).ids


def test_embedded_gguf_splits_every_numeral_off_as_its_pre_name_says(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("x ² and  1 ½")
    assert smollm2_tokenizer.convert_ids_to_tokens(ids) == ["x", "Ġ", "Â²", "Ġand", "ĠĠ", "1", "Ġ", "Â½"]
    assert smollm2_tokenizer.decode(ids) == "x ² and  1 ½"


def test_embedded_gguf_special_tokens_match_transformers(smollm2_tokenizer, hf_smollm2_tokenizer):
    hf = hf_smollm2_tokenizer
    assert smollm2_tokenizer.vocab_size == len(hf) == 49152
    assert smollm2_tokenizer.bos_token_id == hf.bos_token_id == 1
    assert smollm2_tokenizer.eos_token_id == hf.eos_token_id == 2
    assert smollm2_tokenizer.pad_token_id == hf.pad_token_id
    assert smollm2_tokenizer.eos_token_ids == (2,)
    assert set(hf.all_special_ids) <= smollm2_tokenizer.all_special_ids
    # every control token of the GGUF is special: decode(skip_special_tokens=True) drops it
    assert smollm2_tokenizer.all_special_ids == set(range(17))
    assert smollm2_tokenizer.special_tokens == hf.special_tokens_map
    assert smollm2_tokenizer.chat_template == hf.chat_template
    ids = list(range(0, 49152, 97))
    assert smollm2_tokenizer.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


def test_embedded_gguf_adds_no_bos_as_its_metadata_says(smollm2_tokenizer):
    assert smollm2_tokenizer.encode("Hi", add_special_tokens=True) == smollm2_tokenizer.encode(
        "Hi", add_special_tokens=False
    )


def test_convert_ids_to_tokens_rejects_ids_outside_the_vocabulary(smollm2_tokenizer):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smollm2_tokenizer.convert_ids_to_tokens([5, 49152])


SPM_TEXTS = [
    "Hello world",
    " Hello  world ",
    "the lazy fox 123",
    "héllo 中文 😀 unknown ✓ bytes",
    "<s>Hello</s> there",
    "def main():\n    return 42",
    "",
]


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_sentencepiece_gguf_encodes_and_decodes_like_transformers(tiny_spm_gguf, tiny_spm_tokenizer, text):
    transformers = pytest.importorskip("transformers")
    hf = _cached_hf_tokenizer(transformers, tiny_spm_gguf)
    ids = hf.encode(text)
    assert tiny_spm_tokenizer.encode(text) == ids
    assert ids[0] == tiny_spm_tokenizer.bos_token_id == 1  # llama GGUFs add BOS
    for skip in (True, False):
        assert tiny_spm_tokenizer.decode(ids, skip_special_tokens=skip) == hf.decode(
            ids, skip_special_tokens=skip
        )


_HF_CACHE: dict[Path, object] = {}


def _cached_hf_tokenizer(transformers, path: Path):
    if path not in _HF_CACHE:
        _HF_CACHE[path] = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return _HF_CACHE[path]


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2", "gpt-4o", "tekken"])
def test_byte_level_gguf_splits_words_by_its_pre_tokenizer_name(tmp_path, pre):
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers

    target = tmp_path / f"{pre}.gguf"
    write_byte_level_gguf(target, **{"tokenizer.ggml.pre": pre})
    ours = tokenizer_from_gguf(target)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=target.name).backend_tokenizer
    if pre == "smollm":  # transformers ignores this name; see original_smollm2_pipeline
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    for text in VARIED_TEXTS:
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False).ids, (
            text
        )


def test_word_splits_differ_where_their_regexes_do(tmp_path):
    """The table is not one rule under many names: digits and contractions split differently."""
    encodings = {}
    for pre in ("gpt-2", "smollm", "llama-bpe", "qwen2"):
        write_byte_level_gguf(tmp_path / f"{pre}.gguf", **{"tokenizer.ggml.pre": pre})
        tokenizer = tokenizer_from_gguf(tmp_path / f"{pre}.gguf")
        encodings[pre] = tokenizer.convert_ids_to_tokens(tokenizer.encode("12345 I'M  42"))
    assert len({tuple(tokens) for tokens in encodings.values()}) == 4


def test_gguf_with_an_unknown_pre_tokenizer_name_is_refused_clearly(tmp_path):
    write_byte_level_gguf(tmp_path / "odd.gguf", **{"tokenizer.ggml.pre": "no-such-split"})
    with pytest.raises(ValueError, match="'no-such-split' is not a word split.*--tokenizer"):
        tokenizer_from_gguf(tmp_path / "odd.gguf")


def test_gguf_with_an_unsupported_tokenizer_model_is_refused_clearly(tmp_path):
    write_byte_level_gguf(tmp_path / "bert.gguf", **{"tokenizer.ggml.model": "bert"})
    with pytest.raises(ValueError, match="'bert' is not supported"):
        tokenizer_from_gguf(tmp_path / "bert.gguf")


def test_gguf_without_a_tokenizer_is_refused_clearly(tmp_path):
    write_byte_level_gguf(tmp_path / "bare.gguf", **{"tokenizer.ggml.model": None})
    with pytest.raises(ValueError, match="has no tokenizer"):
        tokenizer_from_gguf(tmp_path / "bare.gguf")


def test_a_file_that_is_not_gguf_is_refused_clearly(tmp_path):
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        tokenizer_from_gguf(tmp_path / "fake.gguf")


def test_gguf_bos_and_eos_flags_decide_what_encode_adds(tmp_path):
    write_byte_level_gguf(
        tmp_path / "both.gguf", **{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True}
    )
    tokenizer = tokenizer_from_gguf(tmp_path / "both.gguf")
    plain = tokenizer.encode("Hello", add_special_tokens=False)
    assert tokenizer.encode("Hello") == [1, *plain, 2]


def test_load_tokenizer_takes_a_tokenizer_path_over_the_model(smollm2_source, tiny_spm_gguf):
    tokenizer = load_tokenizer(smollm2_source, tokenizer_path=str(tiny_spm_gguf))
    assert tokenizer.vocab_size == tokenizer_from_gguf(tiny_spm_gguf).vocab_size != 49152
    folder_with_one_gguf = load_tokenizer(smollm2_source, tokenizer_path=str(tiny_spm_gguf.parent))
    assert folder_with_one_gguf.encode("Hello world") == tokenizer.encode("Hello world")


def test_load_tokenizer_names_what_is_wrong_with_a_tokenizer_path(smollm2_source, tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        load_tokenizer(smollm2_source, tokenizer_path=str(tmp_path / "missing" / "here"))
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(ValueError, match="must be a .gguf file"):
        load_tokenizer(smollm2_source, tokenizer_path=str(tmp_path / "vocab.txt"))
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(smollm2_source, tokenizer_path=str(tmp_path))
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(ModelSource("hf_dir", tmp_path, "x"))

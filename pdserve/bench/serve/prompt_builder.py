"""Prompts of an exact token count, for the synthetic datasets.

A prompt is a run of whole-word tokens (" river", " blue", ...): byte-level BPE and
SentencePiece tokenizers both split text before each space, so such words never merge
with their neighbours and a prompt of N words is N tokens. That keeps the counts exact
and lets several prompts share a prefix token for token (prefix_repetition, trace
replay). Each prompt is still checked against the tokenizer and trimmed or extended
at its end until it has the asked count. Torch-free.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from pdserve.bench.serve.text_tokenizer import TextTokenizer

_WORD = re.compile(r" ?[A-Za-z]{2,}")
# vocabulary ids sampled for the word pool: enough for a varied pool, few enough that
# building it through the server's /detokenize takes a second or two
_CANDIDATE_IDS = 600
_MIN_POOL = 32
_FIT_ROUNDS = 8


class PromptBuilder:
    """Builds prompt texts of exact token counts with one tokenizer.

    `add_special_tokens` says how the server counts the prompt: True for /v1/completions
    (it adds what the model adds to every prompt, a BOS for most Llama models), False
    for a chat message's content.
    """

    def __init__(self, tokenizer: TextTokenizer, add_special_tokens: bool, seed: int) -> None:
        self.tokenizer = tokenizer
        self.add_special_tokens = add_special_tokens
        self.special_tokens = len(tokenizer.encode("", add_special_tokens))
        self.words = _word_pool(tokenizer, random.Random(seed))

    def count(self, text: str) -> int:
        """Tokens of `text` as the server counts them."""
        return len(self.tokenizer.encode(text, self.add_special_tokens))

    def sample_words(self, rng: random.Random, count: int) -> list[str]:
        return rng.choices(self.words, k=max(count, 0))

    def content_words(self, num_tokens: int) -> int:
        """Words a prompt of `num_tokens` tokens holds (the special tokens take the rest)."""
        return max(num_tokens - self.special_tokens, 0)

    def fit(self, words: list[str], num_tokens: int, rng: random.Random) -> tuple[str, int]:
        """The text of `words`, trimmed or extended at its end until it has `num_tokens`
        tokens; (text, its token count). The count may differ only for a tokenizer that
        merges across spaces, after every round failed."""
        words = list(words)
        text = "".join(words)
        count = self.count(text)
        for _ in range(_FIT_ROUNDS):
            if count == num_tokens:
                break
            if count < num_tokens:
                words += self.sample_words(rng, num_tokens - count)
            else:
                del words[max(len(words) - (count - num_tokens), 0) :]
            text = "".join(words)
            count = self.count(text)
        return text, count

    def prompt(self, rng: random.Random, num_tokens: int, prefix: Sequence[str] = ()) -> tuple[str, int]:
        """A random prompt of `num_tokens` tokens starting with the words `prefix`."""
        words = list(prefix)[: self.content_words(num_tokens)]
        words += self.sample_words(rng, self.content_words(num_tokens) - len(words))
        return self.fit(words, num_tokens, rng)


def _word_pool(tokenizer: TextTokenizer, rng: random.Random) -> list[str]:
    vocab = tokenizer.vocab_size()
    ids = sorted(rng.sample(range(vocab), min(_CANDIDATE_IDS, vocab)))
    pool: set[str] = set()
    for token_id in ids:
        piece = tokenizer.decode([token_id])
        if not _WORD.fullmatch(piece):
            continue
        word = " " + piece.strip()
        if word not in pool and len(tokenizer.encode(word, False)) == 1:
            pool.add(word)
    if len(pool) < _MIN_POOL:
        raise RuntimeError(
            f"the tokenizer {tokenizer.name} has only {len(pool)} whole-word tokens among {len(ids)} sampled ids, "
            f"too few to build random prompts from; pass --tokenizer with the model's tokenizer"
        )
    return sorted(pool)

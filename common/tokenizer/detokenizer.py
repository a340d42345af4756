"""Turning a stream of generated token ids into a stream of text, one step at a time.

A token is not always whole text: byte-level BPE cuts an emoji or a CJK character
into tokens of one or two bytes each, and SentencePiece turns "▁" into a space only
after something precedes it. So each step decodes a short window of recent ids and
hands out only the text that is final:

    ids:   ... | prefix (already shown) | new since then |
                 ^prefix_start           ^read_start

The window's text minus the prefix's text is the new text. While it ends in U+FFFD,
the last character may be a UTF-8 sequence that the next token completes, so that
character is held back; text from a trailing run of SentencePiece byte tokens
("<0xE4>") is held back too, since the decoder reads such a run as a whole. Once the
new text ends cleanly, the window moves up: the text that was new becomes the next
prefix. Each step therefore decodes a few tokens, never the whole output.

The window starts inside the prompt (its last few tokens), so the first generated
token is decoded in context, as it reads after the prompt (a SentencePiece "▁Hello"
gives " Hello", not "Hello"). For byte-level tokenizers the text of the output, with
the last step marked final, is exactly `tokenizer.decode(output_ids)`.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.tokenizer.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded before the first output token, for context.
_PROMPT_CONTEXT_TOKENS = 5


def _ends_in_byte_run(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool) -> bool:
    invisible = tokenizer.skipped_special_ids if skip_special_tokens else frozenset()
    for token_id in reversed(ids):
        if token_id not in invisible:
            return token_id in tokenizer.byte_token_ids
    return False


class IncrementalDetokenizer:
    """The text of one request's output, produced as its tokens arrive.

    spaces_between_special_tokens is accepted for vLLM's API; decoding goes through
    the `tokenizers` pipeline, which joins special tokens to their neighbours without
    spaces either way (as vLLM does with these tokenizers).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ):
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        context_text = self._decode(context)
        if context_text.endswith(_REPLACEMENT) or _ends_in_byte_run(tokenizer, context, skip_special_tokens):
            # The prompt ends inside a character, or in bytes the output could continue:
            # those bytes belong to the prompt's text, so the output is decoded on its own.
            context, context_text = [], ""
        self._ids = context  # the window: prefix ids, then ids not yet final
        self._read_start = len(context)  # window index where the unread ids start
        self._prefix_text = context_text  # decode of the window's ids before _read_start
        self._num_shown = 0  # chars of the new text already handed out
        self._text_parts: list[str] = []

    @property
    def text(self) -> str:
        """All output text handed out so far."""
        if len(self._text_parts) > 1:
            self._text_parts = ["".join(self._text_parts)]
        return self._text_parts[0] if self._text_parts else ""

    def step(self, new_token_ids: Sequence[int], *, final: bool = False) -> str:
        """Take the next generated ids; return the text they made final.

        final=True (the request finished) also hands out a trailing incomplete UTF-8
        sequence, as U+FFFD, exactly as decode() of the whole output shows it.
        """
        self._ids.extend(new_token_ids)
        byte_run = 0 if final else self._trailing_byte_run()
        # a later byte can change how a run of byte tokens decodes: show only the text before it
        new_text = self._decode(self._ids[: len(self._ids) - byte_run])[len(self._prefix_text) :]
        held = 1 if not final and new_text.endswith(_REPLACEMENT) else 0
        settled = len(new_text) - held
        delta = new_text[self._num_shown : settled]
        self._num_shown = max(self._num_shown, settled)

        if not held and not byte_run and len(self._ids) > self._read_start:
            # What was new is all shown: it becomes the prefix of the next window.
            self._ids = self._ids[self._read_start :]
            self._prefix_text = self._decode(self._ids)
            self._read_start = len(self._ids)
            self._num_shown = 0
        if delta:
            self._text_parts.append(delta)
        return delta

    def _trailing_byte_run(self) -> int:
        """How many ids at the end belong to a run of byte tokens that a next byte would extend."""
        byte_ids = self._tokenizer.byte_token_ids
        if not byte_ids:
            return 0
        # special tokens left out of the text do not end a run: the bytes around them meet
        invisible = self._tokenizer.skipped_special_ids if self.skip_special_tokens else frozenset()
        run, has_bytes = 0, False
        while run < len(self._ids) - self._read_start:
            token_id = self._ids[-1 - run]
            if token_id in byte_ids:
                has_bytes = True
            elif token_id not in invisible:
                break
            run += 1
        return run if has_bytes else 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

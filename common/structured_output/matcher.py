"""One grammar matcher per constrained sequence: where the sequence stands in its grammar,
which tokens may come next (a row of the batch's int32 bitmask), and going back.

A matcher is a copy of its compiled grammar's template (grammar_cache.py), so making one
costs microseconds. Tokens are accepted atomically: a list that the grammar refuses part
of leaves the matcher where it was, so a caller can reject a sampled token (or a draft)
and carry on. Rollback goes back over accepted tokens (preemption, speculative drafts).

Bitmask layout (vLLM's and both engines'): int32 words, bit j of word i allows token
32*i + j; a row of all ones (-1) leaves a sequence unconstrained.
"""

from __future__ import annotations

from collections.abc import Sequence

import llguidance
import torch

from common.structured_output.grammar_cache import CompiledGrammar

_executor: llguidance.LLExecutor | None = None


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(batch_size: int, vocab_size: int) -> torch.Tensor:
    """A [batch_size, ceil(vocab/32)] int32 bitmask on the CPU, every token allowed."""
    return torch.full((batch_size, bitmask_width(vocab_size)), -1, dtype=torch.int32)


class GrammarMatcher:
    def __init__(self, compiled: CompiledGrammar) -> None:
        self.spec = compiled.spec
        self.vocab_size = compiled.tokenizer.vocab_size
        self._engine = compiled.template.deep_copy()
        self._eos = frozenset(compiled.tokenizer.engine.eos_tokens)

    def accept_token(self, token_id: int) -> bool:
        """Advance by one token; False (and no change) when the grammar does not allow it."""
        return self.accept_tokens((token_id,))

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        """Advance by all of `token_ids`, or by none when the grammar refuses any of them."""
        ids = list(token_ids)
        consumed = self._engine.try_consume_tokens(ids)
        if consumed == len(ids):
            return True
        # A finished grammar still takes EOS, though try_consume_tokens reports it refused.
        if consumed == len(ids) - 1 and ids[-1] in self._eos and self._engine.is_stopped():
            return self._engine.consume_token(ids[-1])
        if consumed:
            self._engine.rollback(consumed)
        return False

    def rollback(self, num_tokens: int) -> None:
        """Go back over the last `num_tokens` accepted tokens."""
        if num_tokens < 0:
            raise ValueError(f"rollback needs a count of tokens >= 0, got {num_tokens}")
        if num_tokens and not self._engine.rollback(num_tokens):
            raise ValueError(
                f"cannot roll back {num_tokens} tokens: {self._engine.get_error() or 'too many'}"
            )

    def reset(self) -> None:
        """Back to the start of the grammar, as if no token had been accepted."""
        self._engine.reset()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Write the tokens allowed next into `bitmask[row]` (int32, CPU, contiguous rows)."""
        target = _check_bitmask(bitmask, self.vocab_size)[row]
        self._engine.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)

    def is_terminated(self) -> bool:
        """True when no token but EOS can follow: the grammar is complete and the sequence
        should end (or it has already taken EOS)."""
        return self._engine.is_stopped()

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The end tokens a complete grammar takes."""
        return self._eos

    def is_accepting(self) -> bool:
        """True when the text so far is a complete match (EOS is allowed now)."""
        return self._engine.is_accepting()

    @property
    def error(self) -> str:
        """The engine's error after misuse (e.g. rollback past the start); empty when none."""
        return self._engine.get_error()


def fill_bitmasks(rows: Sequence[tuple[GrammarMatcher, int]], bitmask: torch.Tensor) -> None:
    """Fill the rows of several matchers at once, on the engine's own thread pool (the GIL
    released), so a batch's masks cost about one sequence's time per core."""
    global _executor
    if not rows:
        return
    vocab_size = rows[0][0].vocab_size
    _check_bitmask(bitmask, vocab_size)
    for matcher, row in rows:
        if matcher.vocab_size != vocab_size or not 0 <= row < bitmask.shape[0]:
            raise ValueError(
                f"row {row} of a {tuple(bitmask.shape)} bitmask does not fit a {matcher.vocab_size} vocabulary"
            )
    if _executor is None:
        _executor = llguidance.LLExecutor()
    width = bitmask.shape[1]
    _executor.unsafe_compute_mask_ptr(
        [(matcher._engine, row) for matcher, row in rows], bitmask.data_ptr(), width * 4, bitmask.shape[0]
    )


def _check_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    # The engine writes through a raw pointer: a wrong shape or dtype would corrupt memory.
    if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or bitmask.dim() != 2:
        raise ValueError(
            f"bitmask must be a 2-D int32 CPU tensor, got {bitmask.dim()}-D {bitmask.dtype} on {bitmask.device}; "
            "use allocate_bitmask"
        )
    if bitmask.shape[1] != bitmask_width(vocab_size) or not bitmask.is_contiguous():
        raise ValueError(
            f"bitmask rows must be contiguous and {bitmask_width(vocab_size)} words wide for {vocab_size} tokens, "
            f"got shape {tuple(bitmask.shape)}"
        )
    return bitmask

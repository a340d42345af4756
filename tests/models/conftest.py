"""Helpers for model tests: run a model step by step through a paged KV cache, like the engine.

Without a CUDA device, the Triton layer kernels (test_triton_layers.py) run in Triton's
interpreter, which must be switched on before triton is first imported (transformers
imports it too), so it is switched on here, as tests/attention/conftest.py does.
"""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

from common.attention.metadata import AttentionMetadata


def _enter_interpreter_mode() -> None:
    already_imported = "triton" in sys.modules
    if already_imported:
        import triton

        if not triton.knobs.runtime.interpret:  # read before the variable is set below
            raise pytest.UsageError(
                "triton was imported before tests/models/conftest.py could switch on its "
                "interpreter; run `pytest tests/models` in a process of its own, or set TRITON_INTERPRET=1"
            )
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton

        triton.knobs.runtime.interpret = True
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


if not torch.cuda.is_available():
    _enter_interpreter_mode()


class PagedRunner:
    """Feeds chunks of several requests to a model, keeping their KV in a paged cache.

    Blocks are handed out in a shuffled order so block tables are not the identity.
    """

    def __init__(self, model, block_size: int = 4, num_blocks: int = 96, seed: int = 0) -> None:
        cfg = model.config
        self.model = model
        self.block_size = block_size
        param = next(model.parameters())
        self.kv_cache = torch.zeros(
            num_blocks, cfg.num_hidden_layers, 2, cfg.num_key_value_heads, block_size, cfg.head_dim,
            dtype=param.dtype, device=param.device,
        )  # fmt: skip
        self.free = list(range(1, num_blocks))  # block 0 is the block tables' padding
        random.Random(seed).shuffle(self.free)
        self.blocks: dict[str, list[int]] = {}
        self.lengths: dict[str, int] = {}

    def step(self, chunks: list[tuple[str, list[int]]]) -> dict[str, torch.Tensor]:
        """One forward over the packed chunks; logits [len(chunk), vocab] for each request."""
        ids, positions, slots, query_lens, seq_lens = [], [], [], [], []
        for req, tokens in chunks:
            start = self.lengths.get(req, 0)
            end = start + len(tokens)
            blocks = self.blocks.setdefault(req, [])
            while len(blocks) * self.block_size < end:
                blocks.append(self.free.pop())
            for pos in range(start, end):
                slots.append(blocks[pos // self.block_size] * self.block_size + pos % self.block_size)
            ids += tokens
            positions += range(start, end)
            query_lens.append(len(tokens))
            seq_lens.append(end)
            self.lengths[req] = end
        width = max(len(self.blocks[req]) for req, _ in chunks)
        tables = torch.zeros(len(chunks), width, dtype=torch.int32)
        for i, (req, _) in enumerate(chunks):
            tables[i, : len(self.blocks[req])] = torch.tensor(self.blocks[req], dtype=torch.int32)
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=tables,
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
        with torch.inference_mode():
            hidden = self.model(torch.tensor(ids), torch.tensor(positions), self.kv_cache, meta)
            logits = self.model.compute_logits(hidden)
        return {req: logits[starts[i] : starts[i + 1]] for i, (req, _) in enumerate(chunks)}


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to fp32 reordering noise: |diff| <= rel * the largest reference logit."""
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape
    scale = float(ref.abs().max())
    diff = float((ours - ref).abs().max())
    assert diff <= rel * max(scale, 1.0), f"max |diff| {diff:.3g} at logit scale {scale:.3g}"


@pytest.fixture
def paged_runner():
    return PagedRunner


@pytest.fixture
def logits_close():
    return assert_logits_close

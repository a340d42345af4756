"""The per-step description of a packed batch that attention needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    # [B + 1] int32: request i's new tokens are rows query_start_loc[i]:query_start_loc[i+1]
    query_start_loc: torch.Tensor
    # [B] int32: context length of request i including its new tokens; its new tokens sit
    # at positions seq_len - query_len .. seq_len - 1 and attend causally.
    seq_lens: torch.Tensor
    # [B, max_blocks] int32: block ids, padded with 0 beyond a request's blocks
    block_tables: torch.Tensor
    # [T] int64: cache slot (block_id * block_size + offset) of each new token; -1 = skip
    slot_mapping: torch.Tensor
    max_query_len: int
    max_seq_len: int
    # host copies, so the CPU path never reads device tensors back
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1

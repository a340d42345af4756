"""The attention backend of CUDA devices: the Triton kernels behind the reference's interface.

A pure-decode step (one new token per sequence) goes to the split-KV decode kernel;
any step with a longer query (chunked prefill, or prefill mixed with decodes) goes to
the chunked-prefill kernel, which serves one-token queries too. `docs/benchmarks.md`
("Kernels") has the measurement behind keeping two kernels rather than one.
"""

from __future__ import annotations

import torch

from common.attention.metadata import AttentionMetadata
from common.attention.triton_decode import NewTokenKV, choose_num_splits, decode_attention
from common.attention.triton_paged_tiles import num_sms
from common.attention.triton_prefill import prefill_attention
from common.attention.triton_write_kv import write_kv


def paged_attention(
    query: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,
    layer: int,
    metadata: AttentionMetadata,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Same contract as common.attention.reference.paged_attention."""
    if metadata.is_pure_decode:
        return decode_attention(query, kv_cache, layer, metadata, scale, k_scale, v_scale)
    return prefill_attention(query, kv_cache, layer, metadata, scale, k_scale, v_scale)


class TritonAttentionBackend:
    """write_kv / attention through the Triton kernels; same methods as TorchAttentionBackend."""

    name = "triton"

    def __init__(self, max_model_len: int | None = None) -> None:
        # With max_model_len set, decode's split count depends on the batch size alone
        # (not on this step's max_seq_len), so a step captured in a CUDA graph at a batch
        # size launches the same grid at every replay.
        self.max_model_len = max_model_len

    def write_kv(self, key, value, kv_cache, layer, slot_mapping, k_scale=1.0, v_scale=1.0) -> None:
        write_kv(key, value, kv_cache, layer, slot_mapping, k_scale, v_scale)

    def attention(self, query, kv_cache, layer, metadata, scale, k_scale=1.0, v_scale=1.0) -> torch.Tensor:
        if metadata.is_pure_decode:
            return self._decode(query, kv_cache, layer, metadata, scale, k_scale, v_scale)
        return prefill_attention(query, kv_cache, layer, metadata, scale, k_scale, v_scale)

    def decode_with_new_token(
        self,
        query,
        key,
        value,
        positions,
        cos,
        sin,
        kv_cache,
        layer,
        metadata,
        scale,
        k_scale=1.0,
        v_scale=1.0,
    ) -> torch.Tensor:
        """A pure-decode step's attention with the new token's RoPE (on q and k) and K/V write
        folded into the decode kernel: query and key before RoPE, rotary_write_kv's arguments."""
        if not metadata.is_pure_decode:
            raise ValueError("decode_with_new_token serves a pure-decode step: one new token a sequence")
        new_kv = NewTokenKV(key, value, positions, cos, sin, metadata.slot_mapping, k_scale, v_scale)
        return self._decode(query, kv_cache, layer, metadata, scale, k_scale, v_scale, new_kv)

    def _decode(self, query, kv_cache, layer, metadata, scale, k_scale, v_scale, new_kv=None) -> torch.Tensor:
        splits = self.decode_splits(query.shape[0], kv_cache.shape[3], query.device)
        return decode_attention(
            query, kv_cache, layer, metadata, scale, k_scale, v_scale, num_splits=splits, new_kv=new_kv
        )

    def decode_splits(self, batch_size: int, num_kv_heads: int, device: torch.device) -> int | None:
        """The split count a decode step of this batch size uses; None: chosen per step."""
        if self.max_model_len is None:
            return None
        return choose_num_splits(batch_size, self.max_model_len, num_kv_heads, num_sms(device))

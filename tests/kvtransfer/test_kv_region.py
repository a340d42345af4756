"""The KV cache as byte regions, one per block."""

from __future__ import annotations

import pytest
import torch

from kvtransfer.kv_cache_spec import KVCacheSpec
from kvtransfer.kv_region import KVRegion

SPEC = KVCacheSpec("m", "bfloat16", num_kv_heads=2, head_size=8, num_layers=3, block_size=4)


def test_blocks_are_contiguous_regions_at_fixed_strides():
    cache = torch.randn(SPEC.kv_cache_shape(5)).to(torch.bfloat16)
    region = KVRegion(cache, SPEC)
    assert region.block_len == 3 * 2 * 2 * 4 * 8 * 2
    rows = region.block_addresses()
    assert rows.shape == (5, 3)
    assert [int(a) for a in rows[:, 0]] == [cache[b].data_ptr() for b in range(5)]
    assert set(rows[:, 1].tolist()) == {region.block_len}


def test_blocks_read_and_written_as_bytes_keep_every_bit():
    source = KVRegion(torch.randn(SPEC.kv_cache_shape(6)).to(torch.bfloat16), SPEC)
    target = KVRegion(torch.zeros(SPEC.kv_cache_shape(6), dtype=torch.bfloat16), SPEC)
    target.write_blocks([1, 2], [bytes(b) for b in source.read_blocks([4, 3])])
    assert torch.equal(target.tensor[1], source.tensor[4])
    assert torch.equal(target.tensor[2], source.tensor[3])
    assert not target.tensor[[0, 3, 4, 5]].any()


def test_a_cache_of_another_shape_is_refused_with_the_expected_layout():
    with pytest.raises(ValueError, match=r"\[num_blocks, 3, 2, 2, 4, 8\]"):
        KVRegion(torch.zeros(5, 3, 2, 2, 8, 8), SPEC)
    with pytest.raises(ValueError, match="contiguous"):
        KVRegion(torch.zeros(SPEC.kv_cache_shape(5)).transpose(0, 1).contiguous().transpose(0, 1), SPEC)

"""The Triton kernels equal the plain-torch reference (tiny shapes: the interpreter runs them on CPU).

fp16 and fp32 only here: the interpreter's tl.dot is wrong on bf16 (bf16 is checked on the
GPU, tests/attention/test_triton_gpu.py). References are computed in fp32 from the same cache.
"""

from __future__ import annotations

import pytest
import torch

from common.attention import reference
from common.attention.paged_batch import make_paged_batch, relative_error
from common.attention.triton_backend import TritonAttentionBackend
from common.attention.triton_backend import paged_attention as triton_paged_attention
from common.attention.triton_decode import (
    MAX_SPLITS,
    MIN_TOKENS_PER_SPLIT,
    NewTokenKV,
    choose_num_splits,
    decode_attention,
)
from common.attention.triton_prefill import prefill_attention
from common.attention.triton_write_kv import write_kv

FP8 = torch.float8_e4m3fn
TOL = 5e-3


def _reference(batch):
    return reference.paged_attention(
        batch.query.float(),
        batch.kv_cache,
        batch.layer,
        batch.metadata,
        batch.scale,
        batch.k_scale,
        batch.v_scale,
    )


def _batch(
    query_lens,
    seq_lens,
    device,
    *,
    group=2,
    kv_heads=2,
    head_dim=32,
    block_size=8,
    dtype=torch.float16,
    cache_dtype=None,
    seed=0,
):
    return make_paged_batch(
        query_lens,
        seq_lens,
        num_q_heads=group * kv_heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        cache_dtype=cache_dtype,
        device=device,
        seed=seed,
    )


# ---------------------------------------------------------------- write_kv


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.float32])
def test_write_kv_stores_rows_at_their_slots_and_skips_minus_one(device, cache_dtype):
    batch = _batch([3, 6, 1], [11, 6, 20], device, block_size=4, cache_dtype=cache_dtype)
    skipped_slot = int(batch.metadata.slot_mapping[0])
    batch.metadata.slot_mapping[[0, 4]] = -1
    expected = batch.kv_cache.clone()
    reference.write_kv(batch.key, batch.value, expected, batch.layer, batch.metadata.slot_mapping)
    got = batch.kv_cache.clone()
    write_kv(batch.key, batch.value, got, batch.layer, batch.metadata.slot_mapping)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())
    # the skipped token's slot kept its old contents
    block, offset = divmod(skipped_slot, 4)
    assert torch.equal(
        got[block, batch.layer, :, :, offset], batch.kv_cache[block, batch.layer, :, :, offset]
    )


def test_write_kv_reads_strided_key_and_value_views(device):
    batch = _batch([5], [9], device, head_dim=16)
    packed = torch.cat([batch.key, batch.value], dim=1)  # [T, 2 * Hkv, D], as a fused projection gives
    key, value = packed[:, :2], packed[:, 2:]
    expected = batch.kv_cache.clone()
    reference.write_kv(key, value, expected, batch.layer, batch.metadata.slot_mapping)
    got = batch.kv_cache.clone()
    write_kv(key, value, got, batch.layer, batch.metadata.slot_mapping)
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())


def test_write_kv_fp8_divides_by_the_scale_and_saturates(device):
    # values on the e4m3 grid times a power-of-two scale quantize exactly, so the stored
    # bits must equal the reference's; 1000 and -900 exceed the range and saturate to ±448.
    batch = _batch([4, 2], [7, 13], device, cache_dtype=FP8)
    gen = torch.Generator().manual_seed(3)
    grid = torch.randn((2, *batch.key.shape), generator=gen).mul(8).to(FP8).float()
    grid[grid.abs() < 2**-6] = 0.0  # the interpreter flushes e4m3 subnormals
    scale = 0.125
    key, value = (grid[0] * scale).to(device, torch.float16), (grid[1] * scale).to(device, torch.float16)
    key[0, 0, 0], value[1, 1, 3] = 1000 * scale, -900 * scale
    expected = batch.kv_cache.clone()
    reference.write_kv(key, value, expected, batch.layer, batch.metadata.slot_mapping, scale, scale)
    got = batch.kv_cache.clone()
    write_kv(key, value, got, batch.layer, batch.metadata.slot_mapping, scale, scale)
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    slot = int(batch.metadata.slot_mapping[0])
    assert got[slot // 8, batch.layer, 0, 0, slot % 8, 0].float() == 448.0


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize(
    ("group", "block_size", "head_dim", "num_splits"),
    [(1, 8, 32, 1), (4, 8, 32, 3), (8, 16, 16, 2), (3, 4, 24, 4)],
)
@pytest.mark.parametrize("fused_merge", [True, False])
def test_decode_matches_reference(device, group, block_size, head_dim, num_splits, fused_merge):
    seq_lens = [1, 13, 40, 7]  # 13 and 7 end inside a block; 1 is a fresh sequence
    batch = _batch(
        [1] * 4, seq_lens, device, group=group, head_dim=head_dim, block_size=block_size, seed=group
    )
    expected = _reference(batch)
    for _ in range(2):  # a fused merge leaves its split counts at 0 for the next launch
        out = decode_attention(
            batch.query, batch.kv_cache, batch.layer, batch.metadata, batch.scale,
            num_splits=num_splits, fused_merge=fused_merge,
        )  # fmt: skip
        assert relative_error(out, expected) < TOL
    from common.attention import triton_decode

    assert all(int(c.abs().sum()) == 0 for c in triton_decode._counters.values())


def _rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The model's torch RoPE (common.models.layers), cos/sin fp32 rounded to x's dtype as
    RotaryEmbedding rounds them."""
    from common.models.layers import _rotate

    return _rotate(x, cos.to(x.dtype), sin.to(x.dtype))


@pytest.mark.parametrize(
    ("group", "block_size", "head_dim", "num_splits", "dtype", "cache_dtype"),
    [
        (4, 8, 32, 3, torch.float16, None),
        (1, 16, 32, 1, torch.float16, None),
        (8, 16, 16, 2, torch.float16, None),
        (3, 4, 24, 4, torch.float16, None),
        (4, 8, 32, 3, torch.float16, FP8),
        (2, 8, 32, 2, torch.float32, None),
    ],
)
def test_decode_with_the_new_tokens_kv_applies_rope_and_writes_it_then_attends(
    device, group, block_size, head_dim, num_splits, dtype, cache_dtype
):
    """The new token's RoPE (q and k) and K/V write done inside the decode kernel, by the split
    that attends to it: the cache gets the rotated K and V at each slot (the bits of torch's
    ops), nothing else changes (a padding row: length 0, slot -1), and the output is the
    reference attention of the rotated query; close to rotary_write_kv then decode_attention."""
    from common.models.layers import RotaryEmbedding
    from common.models.triton_layers import rotary_write_kv

    seq_lens = [1, 13, 40, 7, 1]  # 13 and 7 end inside a block; 1 is a fresh sequence
    batch = _batch(
        [1] * 5, seq_lens, device, group=group, head_dim=head_dim, block_size=block_size,
        dtype=dtype, cache_dtype=cache_dtype, seed=group,
    )  # fmt: skip
    meta = batch.metadata
    meta.seq_lens[4] = 0  # a padding row of a CUDA-graph batch
    meta.slot_mapping[4] = -1
    kv_heads = batch.kv_cache.shape[3]
    gen = torch.Generator().manual_seed(17)
    k = torch.randn(5, kv_heads, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(5, kv_heads, head_dim, generator=gen).to(device, dtype)
    positions = torch.tensor([s - 1 for s in seq_lens[:4]] + [0], dtype=torch.int64, device=device)
    with torch.device(device):
        rope = RotaryEmbedding(head_dim, 64, 10000.0, None)
    scales = (batch.k_scale, batch.v_scale)

    cos, sin = rope.cos[positions][:, None], rope.sin[positions][:, None]
    expected_cache = batch.kv_cache.clone()
    for i, slot in enumerate(meta.slot_mapping.tolist()):
        if slot < 0:
            continue
        for kv, row, scale in ((0, _rope_ref(k[i], cos[i], sin[i]), scales[0]), (1, v[i], scales[1])):
            if cache_dtype == FP8:
                row = (row.float() / scale).clamp(-448.0, 448.0)
            expected_cache[slot // block_size, batch.layer, kv, :, slot % block_size] = row.to(
                expected_cache.dtype
            )
    q, cache = batch.query.clone(), batch.kv_cache.clone()
    new_kv = NewTokenKV(k, v, positions, rope.cos, rope.sin, meta.slot_mapping, *scales)
    fused = decode_attention(
        q, cache, batch.layer, meta, batch.scale, *scales, num_splits=num_splits, new_kv=new_kv
    )
    assert torch.equal(q, batch.query)  # the query is rotated in registers, not in place
    q_unfused, cache_unfused = batch.query.clone(), batch.kv_cache.clone()
    rotary_write_kv(
        positions, q_unfused, k, v, rope.cos, rope.sin, cache_unfused, batch.layer, meta.slot_mapping, *scales
    )
    unfused = decode_attention(
        q_unfused, cache_unfused, batch.layer, meta, batch.scale, *scales, num_splits=num_splits
    )
    written = torch.zeros(cache.shape[:5], dtype=torch.bool, device=device)
    for slot in meta.slot_mapping[:4].tolist():
        written[slot // block_size, batch.layer, :, :, slot % block_size] = True
    bits, expected_bits = cache.view(torch.uint8), expected_cache.view(torch.uint8)
    assert torch.equal(bits[~written], expected_bits[~written])  # nothing else touched
    got_rows, expected_rows = cache[written].float(), expected_cache[written].float()
    if dtype == torch.float32 and device.type == "cuda":  # compiled fp32 may fuse a product and sum
        assert relative_error(got_rows, expected_rows) < 1e-6
    elif cache_dtype == FP8:  # the interpreter rounds e4m3 ties away from zero, torch to even
        assert relative_error(got_rows, cache_unfused[written].float()) < 1e-2
    else:
        assert torch.equal(bits[written], expected_bits[written])
    # the attention: the reference's, of the rotated query over the cache as the kernel left it
    q_rot = _rope_ref(batch.query, cos, sin)
    expected = reference.paged_attention(q_rot.float(), cache, batch.layer, meta, batch.scale, *scales)
    assert relative_error(fused[:4], expected[:4]) < TOL
    assert torch.equal(fused[4], torch.zeros_like(fused[4]))

    assert relative_error(fused, unfused) < TOL
    with pytest.raises(ValueError, match="new-token key/value"):
        decode_attention(
            q, cache, batch.layer, meta, batch.scale,
            new_kv=NewTokenKV(k[:4], v[:4], positions, rope.cos, rope.sin, meta.slot_mapping),
        )  # fmt: skip


@pytest.mark.parametrize("min_split_tokens", [128, 192])  # past the 64-token tile: fewer splits work
def test_decode_with_a_minimum_split_length_still_matches_reference(device, monkeypatch, min_split_tokens):
    from common.attention import triton_decode

    monkeypatch.setattr(triton_decode, "MIN_SPLIT_TOKENS", min_split_tokens)
    batch = _batch([1] * 3, [5, 40, 200], device, group=4, seed=11)  # 200: two splits work
    for fused_merge in (False, True):  # later splits find nothing to do and must weigh nothing
        out = decode_attention(
            batch.query, batch.kv_cache, batch.layer, batch.metadata, batch.scale,
            num_splits=8, fused_merge=fused_merge,
        )  # fmt: skip
        assert relative_error(out, _reference(batch)) < TOL


def test_decode_fp8_cache_matches_reference(device):
    batch = _batch([1] * 3, [29, 3, 50], device, group=4, cache_dtype=FP8, seed=5)
    for splits in (1, 3):
        out = decode_attention(
            batch.query,
            batch.kv_cache,
            batch.layer,
            batch.metadata,
            batch.scale,
            batch.k_scale,
            batch.v_scale,
            num_splits=splits,
        )
        assert relative_error(out, _reference(batch)) < TOL


def test_decode_fp32_matches_reference(device):
    batch = _batch([1] * 2, [17, 33], device, dtype=torch.float32, seed=6)
    out = decode_attention(
        batch.query, batch.kv_cache, batch.layer, batch.metadata, batch.scale, num_splits=2
    )
    assert relative_error(out, _reference(batch)) < TOL


def test_decode_more_splits_than_blocks_leaves_empty_splits_harmless(device):
    batch = _batch([1, 1], [3, 20], device, seed=7)
    out = decode_attention(
        batch.query, batch.kv_cache, batch.layer, batch.metadata, batch.scale, num_splits=8
    )
    assert relative_error(out, _reference(batch)) < TOL


def test_decode_zero_length_padding_sequence_outputs_zeros_and_spares_the_others(device):
    # a CUDA-graph batch padded to a captured size carries sequences of length 0
    batch = _batch([1, 1, 1], [21, 1, 9], device, seed=8)
    batch.metadata.seq_lens[1] = 0
    for splits in (1, 2):
        out = decode_attention(
            batch.query, batch.kv_cache, batch.layer, batch.metadata, batch.scale, num_splits=splits
        )
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        keep = [0, 2]
        real = _batch([1, 1, 1], [21, 1, 9], device, seed=8)
        assert relative_error(out[keep], _reference(real)[keep]) < TOL


def test_choose_num_splits_fills_the_gpu_but_not_beyond_the_context():
    sms = 132
    for batch_size in (1, 2, 8, 64, 256):
        for max_seq_len in (0, 1, 100, 300, 2048, 8192, 32768):
            splits = choose_num_splits(batch_size, max_seq_len, 8, sms)
            assert 1 <= splits <= MAX_SPLITS
            # never more splits than the context has MIN_TOKENS_PER_SPLIT-token pieces
            assert splits <= max(1, -(-max_seq_len // MIN_TOKENS_PER_SPLIT))
            # more splits only while the programs do not yet fill the GPU twice
            if splits > 1:
                assert batch_size * 8 * (splits - 1) < 2 * sms
    # a short batch at long context is split; a full batch is not
    assert choose_num_splits(1, 8192, 8, sms) > 8
    assert choose_num_splits(256, 8192, 8, sms) == 1


# ---------------------------------------------------------------- chunked prefill


@pytest.mark.parametrize(
    ("query_lens", "seq_lens"),
    [
        ([5, 17, 1, 33], [5, 30, 9, 33]),  # no prefix, prefix, a decode row, exactly two tiles
        ([7, 2], [47, 2]),
    ],
    ids=["mixed", "long-prefix"],
)
@pytest.mark.parametrize(("group", "block_size"), [(1, 8), (4, 16), (3, 4)])
def test_prefill_matches_reference(device, query_lens, seq_lens, group, block_size):
    batch = _batch(
        query_lens, seq_lens, device, group=group, block_size=block_size, seed=len(query_lens) + group
    )
    out = prefill_attention(batch.query, batch.kv_cache, batch.layer, batch.metadata, batch.scale)
    assert relative_error(out, _reference(batch)) < TOL


def test_prefill_fp8_cache_and_odd_head_dim_match_reference(device):
    batch = _batch([6, 19], [21, 19], device, group=2, head_dim=24, cache_dtype=FP8, seed=11)
    out = prefill_attention(
        batch.query, batch.kv_cache, batch.layer, batch.metadata, batch.scale, batch.k_scale, batch.v_scale
    )
    assert relative_error(out, _reference(batch)) < TOL


def test_prefill_fp32_matches_reference(device):
    batch = _batch([9, 4], [9, 25], device, dtype=torch.float32, seed=12)
    out = prefill_attention(batch.query, batch.kv_cache, batch.layer, batch.metadata, batch.scale)
    assert relative_error(out, _reference(batch)) < TOL


# ---------------------------------------------------------------- backend


def test_backend_writes_new_kv_then_attends_like_the_reference(device):
    # the cache holds only the prefixes; the backend writes the chunk's K/V and attends to them
    batch = _batch([4, 1, 11], [10, 6, 11], device, group=2, seed=13)
    batch.metadata.slot_mapping[0] = -1  # this token's K/V is dropped, by both paths alike
    expected_cache = batch.kv_cache.clone()
    torch_backend = reference.TorchAttentionBackend()
    torch_backend.write_kv(batch.key, batch.value, expected_cache, batch.layer, batch.metadata.slot_mapping)
    expected = torch_backend.attention(
        batch.query.float(), expected_cache, batch.layer, batch.metadata, batch.scale
    )

    backend = TritonAttentionBackend()
    backend.write_kv(batch.key, batch.value, batch.kv_cache, batch.layer, batch.metadata.slot_mapping)
    out = backend.attention(batch.query, batch.kv_cache, batch.layer, batch.metadata, batch.scale)
    assert relative_error(out, expected) < TOL


@pytest.mark.parametrize("max_model_len", [None, 64])
def test_backend_routes_pure_decode_to_the_decode_kernel(device, max_model_len):
    batch = _batch([1, 1], [26, 5], device, group=4, seed=14)
    backend = TritonAttentionBackend(max_model_len=max_model_len)
    out = backend.attention(batch.query, batch.kv_cache, batch.layer, batch.metadata, batch.scale)
    assert relative_error(out, _reference(batch)) < TOL
    assert (
        relative_error(
            triton_paged_attention(batch.query, batch.kv_cache, batch.layer, batch.metadata, batch.scale),
            _reference(batch),
        )
        < TOL
    )


def test_backend_fixed_split_count_depends_on_batch_size_only(device):
    backend = TritonAttentionBackend(max_model_len=8192)
    assert backend.decode_splits(1, 8, device) == backend.decode_splits(1, 8, device)
    assert backend.decode_splits(1, 8, device) >= backend.decode_splits(64, 8, device)
    assert TritonAttentionBackend().decode_splits(1, 8, device) is None


def test_kernels_reject_a_cache_of_the_wrong_layout(device):
    batch = _batch([1], [4], device)
    with pytest.raises(ValueError, match="num_blocks, num_layers"):
        decode_attention(batch.query, batch.kv_cache[:, 0], 0, batch.metadata, batch.scale)
    with pytest.raises(ValueError, match="not a multiple"):
        prefill_attention(batch.query[:, :3], batch.kv_cache, batch.layer, batch.metadata, batch.scale)

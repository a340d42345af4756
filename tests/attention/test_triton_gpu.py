"""The Triton kernels at real shapes on a CUDA device, against the fp32 reference.

Randomized over: bf16 and fp16, bf16 and fp8 caches, block size 16 and 32, GQA ratios 1,
4 and 8, head dim 64 and 128, odd query lengths, contexts from 1 to 32k. Relative error
(‖out − ref‖ / ‖ref‖) must stay under 1e-2. Each case draws its own seed.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from common.attention import reference
from common.attention.paged_batch import make_paged_batch, reference_error, relative_error
from common.attention.triton_decode import choose_num_splits, decode_attention
from common.attention.triton_paged_tiles import num_sms
from common.attention.triton_prefill import prefill_attention
from common.attention.triton_write_kv import write_kv

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FP8 = torch.float8_e4m3fn
TOL = 1e-2


def _case(seed: int) -> dict:
    rng = random.Random(seed)
    group = rng.choice([1, 4, 8])
    kv_heads = rng.choice([1, 2, 8]) if group < 8 else rng.choice([1, 4])
    return dict(
        num_q_heads=group * kv_heads,
        num_kv_heads=kv_heads,
        head_dim=rng.choice([64, 128]),
        block_size=rng.choice([16, 32]),
        dtype=rng.choice([torch.bfloat16, torch.bfloat16, torch.float16]),
        cache_dtype=rng.choice([None, FP8]),
    )


def _check(batch, out, sub):
    err = reference_error(batch, out, max_requests=sub)
    assert err < TOL, f"relative error {err:.2e}"


@pytest.mark.parametrize("seed", range(12))
def test_decode_matches_reference_on_random_real_shapes(seed):
    rng = random.Random(1000 + seed)
    case = _case(seed)
    batch_size = rng.choice([1, 3, 17, 64])
    longest = rng.choice([600, 4099, 32768 if batch_size <= 3 else 8191])
    seq_lens = [rng.randint(1, longest) for _ in range(batch_size)]
    seq_lens[0] = longest
    if batch_size > 1:
        seq_lens[1] = 1
    batch = make_paged_batch(
        [1] * batch_size, seq_lens, device="cuda", num_layers=2, layer=1, seed=seed, **case
    )
    splits = choose_num_splits(batch_size, longest, case["num_kv_heads"], num_sms(torch.device("cuda")))
    for num_splits in sorted({1, splits}):
        out = decode_attention(
            batch.query,
            batch.kv_cache,
            batch.layer,
            batch.metadata,
            batch.scale,
            batch.k_scale,
            batch.v_scale,
            num_splits=num_splits,
        )
        _check(batch, out, sub=8)


@pytest.mark.parametrize("seed", range(10))
def test_prefill_matches_reference_on_random_real_shapes(seed):
    rng = random.Random(2000 + seed)
    case = _case(100 + seed)
    num_reqs = rng.choice([1, 2, 5])
    query_lens = [rng.choice([1, 17, 129, 511, 1000, 2048]) for _ in range(num_reqs)]
    prefixes = [rng.choice([0, 0, 15, 700, 6144]) for _ in range(num_reqs)]
    if seed == 0:  # one request at the long end: 32k of context
        query_lens, prefixes = [333], [32768 - 333]
    seq_lens = [q + p for q, p in zip(query_lens, prefixes, strict=True)]
    batch = make_paged_batch(query_lens, seq_lens, device="cuda", num_layers=2, layer=1, seed=seed, **case)
    out = prefill_attention(
        batch.query, batch.kv_cache, batch.layer, batch.metadata, batch.scale, batch.k_scale, batch.v_scale
    )
    _check(batch, out, sub=3)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16, FP8])
def test_write_kv_equals_reference_bit_for_bit(cache_dtype):
    dtype = torch.float16 if cache_dtype == torch.float16 else torch.bfloat16
    batch = make_paged_batch(
        [300, 1, 77],
        [300, 1000, 80],
        num_q_heads=32,
        num_kv_heads=8,
        head_dim=128,
        block_size=16,
        dtype=dtype,
        cache_dtype=cache_dtype,
        device="cuda",
        num_layers=3,
        layer=2,
        skip_slots=5,
    )
    key, value = batch.key * 30, batch.value * 30  # about half saturate in fp8
    expected = batch.kv_cache.clone()
    reference.write_kv(
        key, value, expected, batch.layer, batch.metadata.slot_mapping, batch.k_scale, batch.v_scale
    )
    got = batch.kv_cache.clone()
    write_kv(key, value, got, batch.layer, batch.metadata.slot_mapping, batch.k_scale, batch.v_scale)
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))


def test_decode_captured_in_a_cuda_graph_replays_at_other_context_lengths():
    case = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16)
    batches = [
        make_paged_batch([1] * 8, [100, 2000, 37, 4096, 1, 999, 3000, 64], device="cuda", seed=1, **case),
        make_paged_batch([1] * 8, [4096, 1, 2222, 17, 3900, 4000, 12, 1500], device="cuda", seed=2, **case),
    ]
    # static buffers the graph reads, large enough for either batch
    num_blocks = max(b.kv_cache.shape[0] for b in batches)
    width = max(b.metadata.block_tables.shape[1] for b in batches)
    kv_cache = torch.zeros((num_blocks, *batches[0].kv_cache.shape[1:]), dtype=torch.bfloat16, device="cuda")
    static = dataclasses.replace(
        batches[0].metadata,
        seq_lens=batches[0].metadata.seq_lens.clone(),
        block_tables=torch.zeros((8, width), dtype=torch.int32, device="cuda"),
    )
    query = torch.zeros_like(batches[0].query)
    out = torch.empty_like(query)
    splits = choose_num_splits(8, 4096, 8, num_sms(torch.device("cuda")))
    layer, scale = batches[0].layer, batches[0].scale

    def step():
        decode_attention(query, kv_cache, layer, static, scale, num_splits=splits, out=out)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for batch in batches:
        query.copy_(batch.query)
        kv_cache[: batch.kv_cache.shape[0]].copy_(batch.kv_cache)
        static.seq_lens.copy_(batch.metadata.seq_lens)
        static.block_tables.zero_()
        static.block_tables[:, : batch.metadata.block_tables.shape[1]].copy_(batch.metadata.block_tables)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        expected = reference.paged_attention(
            batch.query.float(), batch.kv_cache, layer, batch.metadata, scale
        )
        assert relative_error(out, expected) < TOL

"""How a model splits over tensor-parallel ranks: heads by KV group, MLP columns, vocabulary."""

from __future__ import annotations

import pytest

from common.distributed.shard_plan import plan_shards, rank_model_config
from common.models.config import ModelConfig
from tests.tiny_llama import tiny_config


def config(q_heads: int, kv_heads: int, vocab: int = 49152, intermediate: int = 1536) -> ModelConfig:
    return tiny_config(
        vocab_size=vocab, hidden_size=q_heads * 64, intermediate_size=intermediate, num_attention_heads=q_heads,
        num_key_value_heads=kv_heads, head_dim=64, rope_theta=1e5, max_position_embeddings=8192,
        tie_word_embeddings=True,
    )  # fmt: skip


def covers(ranges: list[tuple[int, int]], n: int) -> bool:
    """The ranges tile [0, n) in order, without gaps or overlaps."""
    joined = all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    return ranges[0][0] == 0 and ranges[-1][1] == n and joined


def test_smollm2_heads_split_unevenly_over_two_ranks_by_kv_group():
    shards = plan_shards(config(9, 3), 2)
    assert [s.kv_heads for s in shards] == [(0, 1), (1, 3)]
    assert [s.q_heads for s in shards] == [(0, 3), (3, 9)]


def test_three_ranks_take_one_kv_group_each():
    shards = plan_shards(config(9, 3), 3)
    assert [s.kv_heads for s in shards] == [(0, 1), (1, 2), (2, 3)]
    assert [s.q_heads for s in shards] == [(0, 3), (3, 6), (6, 9)]


def test_more_ranks_than_kv_heads_replicate_each_kv_head_and_spread_its_query_heads():
    shards = plan_shards(config(9, 3), 6)
    assert [s.kv_heads for s in shards] == [(0, 1), (0, 1), (1, 2), (1, 2), (2, 3), (2, 3)]
    assert covers([s.q_heads for s in shards], 9)
    for s in shards:  # every query head sits with the KV head of its group
        assert all(h // 3 == s.kv_heads[0] for h in range(*s.q_heads))


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "tp", "message"),
    [
        (9, 3, 4, "a multiple of 3"),
        (9, 3, 12, "at most 9 ranks"),
        (4, 2, 8, "at most 4 ranks"),
    ],
)
def test_sizes_that_do_not_split_the_heads_are_refused_with_the_sizes_that_would(
    q_heads, kv_heads, tp, message
):
    with pytest.raises(ValueError, match=f"--tensor-parallel-size {tp}.*{message}"):
        plan_shards(config(q_heads, kv_heads), tp)


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 8])
def test_mlp_columns_and_vocabulary_rows_are_each_held_by_exactly_one_rank(tp):
    shards = plan_shards(config(8, 8, vocab=62, intermediate=50), tp)
    assert covers([s.intermediate for s in shards], 50)
    assert covers([s.vocab for s in shards], 62)
    assert {s.vocab_shard_size for s in shards} == {-(-62 // tp)}  # equal shards: one gather
    assert all(s.num_vocab_rows <= s.vocab_shard_size for s in shards)


def test_a_ranks_config_has_its_own_heads_width_and_vocabulary_shard():
    shard = plan_shards(config(9, 3), 2)[1]
    local = rank_model_config(config(9, 3), shard)
    assert (local.num_attention_heads, local.num_key_value_heads) == (6, 2)
    assert local.intermediate_size == 768 and local.vocab_size == 24576
    assert local.head_dim == 64 and local.hidden_size == 576

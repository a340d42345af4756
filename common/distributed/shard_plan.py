"""Which part of a model each tensor-parallel rank holds: heads, MLP columns, vocabulary rows.

Torch-free, so --tensor-parallel-size is checked against a model before anything loads.

Attention is split by KV head, each rank taking its KV heads' whole groups of query
heads, so no query head ever needs a KV head held elsewhere. When the KV heads do not
divide evenly (SmolLM2's 3 KV heads over 2 ranks) the split is uneven (1 and 2 KV heads,
3 and 6 query heads): attention is computed per head, so an uneven split changes no
result, only the balance between ranks. With more ranks than KV heads, each KV head is
replicated on tp / num_kv_heads ranks (vLLM's rule; tp must then be a multiple of the
KV heads) and its query heads are spread over those ranks.

The MLP's intermediate columns are split as evenly as possible. The vocabulary is split
into equal shards of ceil(vocab / tp) rows, the last one padded with rows that never
match a token id, so every rank's logits have one shape and gather into one tensor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from common.models.config import ModelConfig


@dataclass(frozen=True)
class RankShard:
    """The slices rank `rank` of `size` holds; ranges are [start, stop) of the full model's."""

    rank: int
    size: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    intermediate: tuple[int, int]
    vocab: tuple[int, int]  # real rows; the shard is vocab_shard_size rows, padded past stop
    vocab_shard_size: int

    @property
    def num_q_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def intermediate_size(self) -> int:
        return self.intermediate[1] - self.intermediate[0]

    @property
    def num_vocab_rows(self) -> int:
        return self.vocab[1] - self.vocab[0]


def even_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """Part `index` of [0, n) cut into `parts` contiguous ranges whose sizes differ by at most 1."""
    return index * n // parts, (index + 1) * n // parts


def kv_head_range(num_kv_heads: int, tp_size: int, rank: int) -> tuple[int, int]:
    """The KV heads [start, stop) rank `rank` of `tp_size` holds (a size plan_shards accepts)."""
    if tp_size <= num_kv_heads:
        return even_range(num_kv_heads, tp_size, rank)
    head = rank // (tp_size // num_kv_heads)
    return head, head + 1


def plan_shards(config: ModelConfig, tp_size: int) -> list[RankShard]:
    """One RankShard per rank, or ValueError saying which sizes would work."""
    if tp_size < 1:
        raise ValueError(f"--tensor-parallel-size must be at least 1, got {tp_size}")
    num_q, num_kv = config.num_attention_heads, config.num_key_value_heads
    group = num_q // num_kv
    if tp_size > num_kv and tp_size % num_kv:
        raise ValueError(
            f"--tensor-parallel-size {tp_size} does not fit {config.architecture} with {num_kv} KV heads: "
            f"use at most {num_kv} ranks, or a multiple of {num_kv} (each KV head then replicated)"
        )
    if tp_size > num_kv and tp_size // num_kv > group:
        raise ValueError(
            f"--tensor-parallel-size {tp_size} leaves ranks without a query head ({num_q} query heads); "
            f"use at most {num_q} ranks"
        )
    if tp_size > config.mlp_width:
        raise ValueError(f"--tensor-parallel-size {tp_size} is larger than the MLP width {config.mlp_width}")
    vocab_shard = -(-config.vocab_size // tp_size)
    shards = []
    for rank in range(tp_size):
        kv = kv_head_range(num_kv, tp_size, rank)
        if tp_size <= num_kv:
            q = (kv[0] * group, kv[1] * group)
        else:
            replicas = tp_size // num_kv
            head = kv[0]
            first, stop = even_range(group, replicas, rank % replicas)
            q = (head * group + first, head * group + stop)
        start = min(rank * vocab_shard, config.vocab_size)
        shards.append(
            RankShard(
                rank=rank,
                size=tp_size,
                q_heads=q,
                kv_heads=kv,
                intermediate=even_range(config.mlp_width, tp_size, rank),
                vocab=(start, min(start + vocab_shard, config.vocab_size)),
                vocab_shard_size=vocab_shard,
            )
        )
    return shards


def rank_model_config(config: ModelConfig, shard: RankShard) -> ModelConfig:
    """The config a rank builds its modules from: its heads, its MLP columns (each expert's,
    for a mixture of experts), its vocabulary shard."""
    width = {"moe_intermediate_size" if config.num_experts else "intermediate_size": shard.intermediate_size}
    return dataclasses.replace(
        config,
        num_attention_heads=shard.num_q_heads,
        num_key_value_heads=shard.num_kv_heads,
        vocab_size=shard.vocab_shard_size,
        **width,
    )

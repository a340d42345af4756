"""A rank reads only its slice of each checkpoint tensor, and it is the full tensor's slice."""

from __future__ import annotations

import torch

from common.gguf_file import open_gguf
from common.models.config import ModelConfig
from common.models.weights_gguf import iter_gguf_weights
from common.models.weights_safetensors import iter_safetensors_weights
from common.models.weights_shard import Shard

# SmolLM2: heads of 64 rows; q rows of heads 3..9 (a rank of TP=2), k rows of heads 1..3,
# down_proj columns 768..1536, embedding rows of the second vocabulary half.
GGUF_SHARDS = {
    "model.layers.0.self_attn.q_proj.weight": Shard(0, 3 * 64, 9 * 64),
    "model.layers.0.self_attn.k_proj.weight": Shard(0, 64, 3 * 64),
    "model.layers.0.self_attn.o_proj.weight": Shard(1, 3 * 64, 9 * 64),
    "model.layers.0.mlp.down_proj.weight": Shard(1, 768, 1536),
    "model.embed_tokens.weight": Shard(0, 24576, 49152),
}


def test_gguf_slices_equal_the_slices_of_the_dequantized_unpermuted_tensors(smollm2_source):
    reader = open_gguf(smollm2_source.path)
    config = ModelConfig.from_gguf(reader)
    wanted = set(GGUF_SHARDS)
    full = {n: t for n, t in iter_gguf_weights(reader, config) if n in wanted}
    sliced = {n: t for n, t in iter_gguf_weights(reader, config, GGUF_SHARDS) if n in wanted}
    for name, shard in GGUF_SHARDS.items():
        expected = full[name].narrow(shard.dim, shard.start, shard.stop - shard.start)
        assert torch.equal(sliced[name], expected), name


def test_safetensors_slices_equal_the_slices_of_the_full_tensors(tiny_tp_folder):
    shards = {
        "model.layers.1.self_attn.v_proj.weight": Shard(0, 8, 16),
        "model.layers.1.self_attn.v_proj.bias": Shard(0, 8, 16),
        "model.layers.1.mlp.down_proj.weight": Shard(1, 12, 25),
    }
    full = dict(iter_safetensors_weights(tiny_tp_folder.path))
    sliced = dict(iter_safetensors_weights(tiny_tp_folder.path, shards))
    assert set(sliced) == set(full)
    for name, tensor in full.items():
        shard = shards.get(name)
        expected = (
            tensor if shard is None else tensor.narrow(shard.dim, shard.start, shard.stop - shard.start)
        )
        assert torch.equal(sliced[name], expected), name

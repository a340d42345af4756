"""Tensor-parallel pieces of the Llama-family decoder, and the sharded model built from them.

One rank's model is the ordinary LlamaForCausalLM built from its RankShard's config
(common/distributed/shard_plan.py): q/k/v and gate/up are column-parallel simply by
holding fewer output rows, attention runs on the rank's own heads and KV cache. What
differs is where the ranks' partial results meet:
  - o_proj and down_proj are row-parallel: each rank multiplies its slice of the input
    features and the partial sums are all-reduced (the bias, if any, added once after);
  - a mixture-of-experts layer holds every expert's slice of the intermediate columns
    (vLLM's split; the router whole on every rank, so all ranks pick the same experts) and
    all-reduces the sum of its experts' partial outputs;
  - the embedding is vocabulary-parallel: a rank looks up only the ids in its shard,
    zeros the rest, and an all-reduce sums the one non-zero row per token;
  - the LM head is vocabulary-parallel: each rank computes its shard's logits and rank 0
    gathers them, the only rank that samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.distributed.group import TensorParallelGroup
from common.distributed.shard_plan import RankShard, rank_model_config
from common.models.config import ModelConfig
from common.models.layers import Linear, linear
from common.models.llama import LlamaForCausalLM
from common.models.moe import SparseMoeBlock, expert_tensor_names
from common.models.weights_shard import Shard


class RowParallelLinear(Linear):
    """y = all_reduce(x_r W_r^T) + b, where rank r holds the columns W_r of W its input x_r feeds."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: TensorParallelGroup) -> None:
        super().__init__(in_features, out_features, bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = linear(x, self.weight)
        if self.lora is not None:  # x_r A_r^T B^T: the ranks' LoRA parts sum in the same all-reduce
            partial = self.lora(x, partial)
        y = self.group.all_reduce(partial)
        return y if self.bias is None else y + self.bias


class TensorParallelLlamaForCausalLM(LlamaForCausalLM):
    """The part of a Llama-family model one rank holds; every rank runs the same forward.

    `config` stays the whole model's; `rank_config` is what this rank's modules are
    built from (its heads, MLP columns and vocabulary shard).
    """

    def __init__(
        self, config: ModelConfig, attn_backend, group: TensorParallelGroup, shard: RankShard
    ) -> None:
        rank_config = rank_model_config(config, shard)
        super().__init__(rank_config, attn_backend)
        self.config = config
        self.rank_config = rank_config
        self.group = group
        self.shard = shard
        for layer in self.layers:
            attn = layer.self_attn
            attn.o_proj = RowParallelLinear(attn.q_size, config.hidden_size, config.attention_out_bias, group)
            mlp = layer.mlp
            if isinstance(mlp, SparseMoeBlock):
                mlp.group = group
            else:
                mlp.down_proj = RowParallelLinear(mlp.intermediate_size, config.hidden_size, False, group)
        with torch.no_grad():  # rows past the vocabulary pad the last shard: never looked up, logits cut off
            self.embed_tokens[shard.num_vocab_rows :].zero_()
            self.lm_head[shard.num_vocab_rows :].zero_()

    def _small_batch_kernels(self, x: torch.Tensor):
        # The fused decode path adds o_proj's and down_proj's products into the residual
        # stream inside the matmul, leaving no place for the all-reduce: ranks take the
        # general path, whose row-parallel modules reduce.
        return None

    def weight_targets(self) -> dict[str, torch.Tensor]:
        targets = super().weight_targets()
        rows = self.shard.num_vocab_rows
        targets["model.embed_tokens.weight"] = self.embed_tokens[:rows]
        if not self.config.tie_word_embeddings:
            targets["lm_head.weight"] = self.lm_head[:rows]
        return targets

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        start, stop = self.shard.vocab
        local = input_ids - start
        outside = (local < 0) | (local >= stop - start)
        x = F.embedding(local.masked_fill(outside, 0), self.embed_tokens)
        return self.group.all_reduce(x.masked_fill(outside.unsqueeze(-1), 0.0))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits [n, vocab] in float32 on rank 0; None on the other ranks."""
        shards = self.group.gather_to_first(linear(hidden, self.lm_head).float())
        if shards is None:
            return None
        return torch.cat(shards, dim=-1)[:, : self.config.vocab_size]

    def weight_shards(self) -> dict[str, Shard]:
        """Hugging Face tensor name -> the slice of the full tensor this rank loads; the
        tensors not named (norms, o_proj's bias) are loaded whole on every rank."""
        s, d = self.shard, self.config.head_dim
        vocab = Shard(0, *s.vocab)
        shards = {"model.embed_tokens.weight": vocab}
        if not self.config.tie_word_embeddings:
            shards["lm_head.weight"] = vocab
        q_rows = Shard(0, s.q_heads[0] * d, s.q_heads[1] * d)
        kv_rows = Shard(0, s.kv_heads[0] * d, s.kv_heads[1] * d)
        mlp_rows = Shard(0, *s.intermediate)
        suffixes = ("weight", "bias") if self.config.attention_bias else ("weight",)
        for i in range(self.config.num_hidden_layers):
            p = f"model.layers.{i}."
            for suffix in suffixes:
                shards[p + f"self_attn.q_proj.{suffix}"] = q_rows
                shards[p + f"self_attn.k_proj.{suffix}"] = kv_rows
                shards[p + f"self_attn.v_proj.{suffix}"] = kv_rows
            shards[p + "self_attn.o_proj.weight"] = Shard(1, q_rows.start, q_rows.stop)
            mlps = [(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", p + "mlp.down_proj.weight")]
            if self.config.num_experts:
                mlps = expert_tensor_names(self.config.architecture, p, self.config.num_experts)
            for gate, up, down in mlps:
                shards[gate] = shards[up] = mlp_rows
                shards[down] = Shard(1, mlp_rows.start, mlp_rows.stop)
        return shards

    def replicated_parameters(self) -> list[torch.Tensor]:
        """The parameters every rank holds whole (norms, o_proj's bias, the experts' router):
        they must be equal on all ranks, since each rank applies them to the same
        all-reduced activations."""
        whole = ("norm.weight", "o_proj.bias", "router_weight")
        return [p for name, p in self.named_parameters() if name.endswith(whole)]

    def broadcast_replicated(self) -> None:
        """Make every rank's replicated parameters rank 0's (after random dummy weights)."""
        with torch.no_grad():
            for param in self.replicated_parameters():
                self.group.broadcast_from_first(param.data)

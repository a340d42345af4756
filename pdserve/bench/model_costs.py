"""What a model's work costs, counted from its config alone: parameters by kind, the FLOPs
of a prefill, the bytes a decode step reads. The floors of `pdserve bench prefill`,
`pdserve bench roofline` and `pdserve bench decode-step` all come from here, so they agree.

Torch-free: a ModelConfig (common/models/config.py) in, plain numbers out.

FLOPs count multiply-adds as 2, and only the work of matrix products: the projections
(2 × parameters × tokens), attention's QKᵀ and PV (4 × head_dim per query head per visible
(query, key) pair) and the LM head on the rows that sample. Norms, RoPE, SiLU-and-mul,
biases and the embedding lookup are left out: a few FLOPs a parameter at most, run at
memory speed, not on the tensor cores the floor is measured on.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.models.config import ModelConfig


@dataclass(frozen=True)
class ModelCosts:
    """Parameter counts of a Llama-family decoder (common/models/llama.py's layout)."""

    num_layers: int
    hidden_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    layer_matmul_params: int  # every layer's qkv, o, gate_up and down weights
    embedding_params: int
    lm_head_params: int  # 0 when tied: the embedding table is the LM head
    norm_params: int  # RMSNorm weights (q/k norms included)
    bias_params: int

    @classmethod
    def from_config(cls, config: ModelConfig) -> ModelCosts:
        h, d, layers = config.hidden_size, config.head_dim, config.num_hidden_layers
        q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * config.intermediate_size  # qkv, o, gate_up, down
        norms = 2 * h + (2 * d if config.qk_norm else 0)
        biases = (q + 2 * kv if config.attention_bias else 0) + (h if config.attention_out_bias else 0)
        embedding = config.vocab_size * h
        return cls(
            num_layers=layers,
            hidden_size=h,
            num_q_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=d,
            vocab_size=config.vocab_size,
            layer_matmul_params=layers * per_layer,
            embedding_params=embedding,
            lm_head_params=0 if config.tie_word_embeddings else embedding,
            norm_params=layers * norms + h,  # + the final norm
            bias_params=layers * biases,
        )

    @property
    def total_params(self) -> int:
        return (
            self.layer_matmul_params
            + self.embedding_params
            + self.lm_head_params
            + self.norm_params
            + self.bias_params
        )

    @property
    def lm_head_matmul_params(self) -> int:
        """The LM head's weight as a matmul sees it (the embedding table when tied)."""
        return self.vocab_size * self.hidden_size

    def kv_bytes_per_token(self, kv_bytes_per_element: float) -> float:
        """K and V of one token in every layer."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * kv_bytes_per_element

    def attention_flops(self, new_tokens: int, prefix: int = 0) -> int:
        """QKᵀ and PV of `new_tokens` queries after `prefix` cached tokens, causal: query i
        (0-based among the new) sees prefix + i + 1 keys, so the visible pairs are
        new × prefix + new × (new + 1) / 2, each 2 × head_dim FLOPs for QKᵀ and as many for
        PV, per query head per layer. Chunking a prompt does not change the sum."""
        pairs = new_tokens * prefix + new_tokens * (new_tokens + 1) // 2
        return 4 * self.num_layers * self.num_q_heads * self.head_dim * pairs

    def prefill_flops(self, prompt_len: int, num_prompts: int = 1) -> int:
        """FLOPs of prefilling `num_prompts` prompts of `prompt_len` tokens up to each one's
        first token:

            num_prompts × (2 × layer_matmul_params × prompt_len
                           + 4 × layers × q_heads × head_dim × prompt_len (prompt_len + 1) / 2
                           + 2 × hidden × vocab)

        the last term the LM head on the one row per prompt that samples (the engine
        computes logits only there)."""
        per_prompt = (
            2 * self.layer_matmul_params * prompt_len
            + self.attention_flops(prompt_len)
            + 2 * self.lm_head_matmul_params
        )
        return num_prompts * per_prompt

    def decode_step_flops(self, batch: int, context_total: int) -> int:
        """FLOPs of one decode step of `batch` sequences whose contexts (the new token
        included) add up to `context_total` tokens."""
        matmuls = 2 * (self.layer_matmul_params + self.lm_head_matmul_params) * batch
        return matmuls + 4 * self.num_layers * self.num_q_heads * self.head_dim * context_total

    def decode_weight_bytes(self, batch: int, bytes_per_param: float) -> float:
        """Bytes of weights one decode step reads: every parameter once, except an
        embedding table that is not also the LM head, of which only the batch's rows."""
        params = self.total_params
        if self.lm_head_params:  # untied: the table is only gathered from
            params += batch * self.hidden_size - self.embedding_params
        return params * bytes_per_param

"""What a model's work costs, counted from its config alone: parameters by kind, the FLOPs
of a prefill, the bytes a decode step reads. The floors of `pdserve bench prefill`,
`pdserve bench roofline` and `pdserve bench decode-step` all come from here, so they agree.

Torch-free: a ModelConfig (common/models/config.py) in, plain numbers out.

FLOPs count multiply-adds as 2, and only the work of matrix products: the projections
(2 × parameters × tokens), attention's QKᵀ and PV (4 × head_dim per query head per visible
(query, key) pair) and the LM head on the rows that sample. Norms, RoPE, SiLU-and-mul,
biases and the embedding lookup are left out: a few FLOPs a parameter at most, run at
memory speed, not on the tensor cores the floor is measured on.

Mixture-of-experts (Qwen3-MoE, Mixtral): every layer holds E experts and a router, and each
token runs k of them, so a token's FLOPs count the router and k experts, never all E. What
a decode step of B tokens reads depends on how many distinct experts they pick: exactly k a
layer at B = 1; under uniform routing (each token k distinct experts of E, tokens
independent) an expert is missed by all B with probability (1 − k/E)^B, so

    experts touched a layer = E · (1 − (1 − k/E)^B)

in expectation, which tends to E (every expert read) as B grows.

fp8 weights (`--quantization fp8`, common/models/weights_fp8.py): the linear layers the
model lists in `linear_sources()` (each layer's q/k/v, o, and a dense model's gate/up and
down) hold 1 byte a weight plus one fp32 scale per output row; everything else (embedding,
LM head, norms, biases, the experts' router) stays in the model dtype, as the loader leaves
it. The stacked experts are quantized too (one scale per expert's output row) and stay fp8
on a GPU whose fused MoE kernels read fp8; on a CPU they are dequantized back, so the
floors take `fp8_experts` apart from `fp8_linears`.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.models.config import ModelConfig

FP8_SCALE_BYTES = 4  # one float32 scale per output row of an fp8 weight


@dataclass(frozen=True)
class ModelCosts:
    """Parameter counts of a Llama-family decoder (common/models/llama.py's layout)."""

    num_layers: int
    hidden_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    attention_params: int  # every layer's qkv and o weights
    mlp_params: int  # every layer's dense gate_up and down weights (0 with experts)
    router_params: int  # every layer's expert router (0 without experts)
    expert_params: int  # every expert's gate, up and down weights in every layer (0 without)
    num_experts: int  # E a layer (0: dense)
    experts_per_token: int  # k
    linear_rows: int  # output rows of the linears fp8 quantizes (attention, dense MLP): a scale each
    embedding_params: int
    lm_head_params: int  # 0 when tied: the embedding table is the LM head
    norm_params: int  # RMSNorm weights (q/k norms included)
    bias_params: int

    @classmethod
    def from_config(cls, config: ModelConfig) -> ModelCosts:
        h, d, layers = config.hidden_size, config.head_dim, config.num_hidden_layers
        q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
        experts = config.num_experts
        attention = h * (q + 2 * kv) + q * h  # qkv, o
        mlp = 0 if experts else 3 * h * config.intermediate_size  # gate_up, down
        expert = 3 * h * config.moe_intermediate_size if experts else 0  # one expert's w13 and w2
        rows = (q + 2 * kv) + h + (0 if experts else 2 * config.intermediate_size + h)
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
            attention_params=layers * attention,
            mlp_params=layers * mlp,
            router_params=layers * experts * h,
            expert_params=layers * experts * expert,
            num_experts=experts,
            experts_per_token=config.num_experts_per_tok if experts else 0,
            linear_rows=layers * rows,
            embedding_params=embedding,
            lm_head_params=0 if config.tie_word_embeddings else embedding,
            norm_params=layers * norms + h,  # + the final norm
            bias_params=layers * biases,
        )

    @property
    def layer_matmul_params(self) -> int:
        """Every layer's matmul weights: attention, the dense MLP or the router and all experts."""
        return self.attention_params + self.mlp_params + self.router_params + self.expert_params

    @property
    def active_layer_matmul_params(self) -> int:
        """The layers' matmul weights one token multiplies by: its k experts, not all E."""
        return self.attention_params + self.mlp_params + self.router_params + self.active_expert_params

    @property
    def active_expert_params(self) -> int:
        """The weights of k experts in every layer (0 for a dense model)."""
        if not self.num_experts:
            return 0
        return self.expert_params // self.num_experts * self.experts_per_token

    @property
    def dense_params(self) -> int:
        """Everything but the experts: what every token reads whichever experts it picks."""
        return self.total_params - self.expert_params

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
    def active_params(self) -> int:
        """Parameters a token uses (the embedding table whole, as model cards count them)."""
        return self.total_params - self.expert_params + self.active_expert_params

    @property
    def fp8_params(self) -> int:
        """The weights `--quantization fp8` stores in 1 byte: the linears of linear_sources()."""
        return self.attention_params + self.mlp_params

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

            num_prompts × (2 × active_layer_matmul_params × prompt_len
                           + 4 × layers × q_heads × head_dim × prompt_len (prompt_len + 1) / 2
                           + 2 × hidden × vocab)

        the last term the LM head on the one row per prompt that samples (the engine
        computes logits only there); with experts, each token's router and k experts."""
        per_prompt = (
            2 * self.active_layer_matmul_params * prompt_len
            + self.attention_flops(prompt_len)
            + 2 * self.lm_head_matmul_params
        )
        return num_prompts * per_prompt

    def prefill_fp8_flops(self, prompt_len: int, num_prompts: int = 1) -> int:
        """The part of prefill_flops that fp8 linears run (`--quantization fp8`): their
        2 × fp8_params × tokens; attention, the router, experts and LM head stay 16-bit."""
        return 2 * self.fp8_params * prompt_len * num_prompts

    def decode_step_flops(self, batch: int, context_total: int) -> int:
        """FLOPs of one decode step of `batch` sequences whose contexts (the new token
        included) add up to `context_total` tokens."""
        matmuls = 2 * (self.active_layer_matmul_params + self.lm_head_matmul_params) * batch
        return matmuls + 4 * self.num_layers * self.num_q_heads * self.head_dim * context_total

    def experts_touched(self, batch: int) -> float:
        """Distinct experts a layer that `batch` tokens pick under uniform routing, in
        expectation: E (1 − (1 − k/E)^B); exactly k at B = 1, 0 for a dense model."""
        if not self.num_experts:
            return 0.0
        e, k = self.num_experts, self.experts_per_token
        return e * (1 - (1 - k / e) ** batch)

    def decode_weight_bytes(
        self,
        batch: int,
        bytes_per_param: float,
        *,
        fp8_linears: bool = False,
        fp8_experts: bool = False,
        experts_read: float | None = None,
    ) -> float:
        """Bytes of weights one decode step of `batch` sequences reads: every weight once,
        except an embedding table that is not also the LM head, of which only the batch's
        rows, and of each layer's experts only `experts_read` (default: experts_touched(batch);
        pass num_experts for the all-experts floor). `fp8_linears`: the linears fp8 keeps
        (fp8_params) at 1 byte plus a 4-byte scale per row, the rest at `bytes_per_param`;
        `fp8_experts`: the experts read likewise (fp8 on a GPU whose fused MoE kernels read
        fp8, common/models/moe.py; dequantized elsewhere)."""
        params = self.total_params - self.expert_params
        if self.lm_head_params:  # untied: the table is only gathered from
            params += batch * self.hidden_size - self.embedding_params
        experts = 0.0  # expert weights read, in parameters
        if self.num_experts:
            read = self.experts_touched(batch) if experts_read is None else experts_read
            experts = self.expert_params / self.num_experts * read
            params += experts
        nbytes = params * bytes_per_param
        if fp8_linears:
            nbytes -= self.fp8_params * (bytes_per_param - 1)
            nbytes += self.linear_rows * FP8_SCALE_BYTES
        if fp8_experts and self.num_experts:
            # one expert of one layer: 3 × hidden × I weights in 2I (gate, up) + hidden (down)
            # rows, a scale each
            per_expert = self.expert_params / (self.num_layers * self.num_experts)
            rows = 2 * per_expert / (3 * self.hidden_size) + self.hidden_size
            nbytes -= experts * (bytes_per_param - 1)
            nbytes += experts / per_expert * rows * FP8_SCALE_BYTES
        return nbytes

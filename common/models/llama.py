"""One decoder for the Llama family: Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2, and the
mixture-of-experts Qwen3-MoE and Mixtral.

The model runs a packed batch: the new tokens of many requests, one after another, with
no batch dimension. Attention goes through a backend (plain torch on CPU, Triton on
GPU) that writes this step's K/V into the paged cache and attends over it, as
AttentionMetadata describes.

Differences between the family members are flags of ModelConfig: q/k/v bias (Qwen2),
per-head q/k RMSNorm before RoPE (Qwen3), explicit head_dim, RoPE scaling, tied LM head,
and a sparse mixture-of-experts MLP in every layer (num_experts > 0, common/models/moe.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.attention.metadata import AttentionMetadata
from common.models import layers, moe
from common.models.config import ModelConfig
from common.models.layers import (
    GatedMLP,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    cuda_layer_kernels,
    linear,
    small_batch_kernels,
)
from common.models.moe import SparseMoeBlock


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, backend) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, config.attention_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, config.attention_out_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.rotary = rotary  # one table shared by every layer
        self.backend = backend

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        kernels = cuda_layer_kernels(q)
        r = self.rotary
        if kernels is not None:
            fused = None
            if layers.FUSE_ROPE_INTO_DECODE and meta.is_pure_decode:
                fused = getattr(self.backend, "decode_with_new_token", None)
            if fused is not None:  # RoPE and the K/V write inside the decode attention kernel
                out = fused(q, k, v, positions, r.cos, r.sin, kv_cache, self.layer_idx, meta, self.scale)
                return self.o_proj(out.reshape(tokens, self.q_size))
            # RoPE and the K/V write in one launch
            kernels.rotary_write_kv(
                positions, q, k, v, r.cos, r.sin, kv_cache, self.layer_idx, meta.slot_mapping
            )
        else:
            q, k = self.rotary(positions, q, k)
            self.backend.write_kv(k, v, kv_cache, self.layer_idx, meta.slot_mapping)
        out = self.backend.attention(q, kv_cache, self.layer_idx, meta, self.scale)
        return self.o_proj(out.reshape(tokens, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, backend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, rotary, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: GatedMLP | SparseMoeBlock
        if config.num_experts:
            self.mlp = SparseMoeBlock(config)
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it). The stream is
        residual + x; each sum happens inside the norm that follows it (one kernel on CUDA)."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        h = self.self_attn(positions, h, kv_cache, meta)
        h, residual = self.post_attention_layernorm.add_and_norm(h, residual)
        return self.mlp(h), residual

    def forward_small_batch(
        self,
        positions: torch.Tensor,
        stream: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        kernels,
    ) -> None:
        """The layer for a decode-sized batch on CUDA, adding into the residual stream in place.

        The residual add folded into the matmul before it, RoPE (and Qwen3's q/k norm) into the
        K/V write, and (per common.models.layers' switches) each RMSNorm into the matmul after it
        and SiLU-and-mul into the gate_up matmul's epilogue or else the down projection's
        operand: five launches and the attention when all are on. A mixture-of-experts MLP
        takes six: RMSNorm, router, fused_moe_small_batch's three, the add into the stream."""
        attn, mlp = self.self_attn, self.mlp
        qkv = self._normed_matmul(kernels, stream, self.input_layernorm, attn.qkv_proj)
        tokens = stream.shape[0]
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q = q.view(tokens, attn.num_heads, attn.head_dim)
        k = k.view(tokens, attn.num_kv_heads, attn.head_dim)
        v = v.view(tokens, attn.num_kv_heads, attn.head_dim)
        rotary = attn.rotary
        q_norm = k_norm = None  # Qwen3's per-head norms, applied in the same launch
        eps = 0.0
        if attn.q_norm is not None:
            q_norm, k_norm, eps = attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps
        kernels.rotary_write_kv(
            positions, q, k, v, rotary.cos, rotary.sin, kv_cache, attn.layer_idx, meta.slot_mapping,
            q_norm_weight=q_norm, k_norm_weight=k_norm, eps=eps,
        )  # fmt: skip
        out = attn.backend.attention(q, kv_cache, attn.layer_idx, meta, attn.scale)
        _small_m(kernels, out.reshape(tokens, attn.q_size), attn.o_proj, out=stream)
        if isinstance(mlp, SparseMoeBlock):
            self._experts_small_batch(kernels, stream)
            return
        if layers.FUSE_SILU_INTO_GATE_UP:  # SiLU-and-mul in the gate_up matmul's epilogue
            act = self._normed_matmul(
                kernels, stream, self.post_attention_layernorm, mlp.gate_up_proj, gate_up_silu=True
            )
            _small_m(kernels, act, mlp.down_proj, out=stream)
            return
        gate_up = self._normed_matmul(kernels, stream, self.post_attention_layernorm, mlp.gate_up_proj)
        if layers.FUSE_SILU_INTO_MATMUL:
            _small_m(kernels, gate_up, mlp.down_proj, silu_mul=True, out=stream)
        else:
            _small_m(kernels, kernels.silu_and_mul(gate_up), mlp.down_proj, out=stream)

    def _experts_small_batch(self, kernels, stream: torch.Tensor) -> None:
        """The mixture-of-experts MLP of a small batch added into the stream: the norm apart
        (its output feeds the router and the experts both), then SparseMoeBlock.forward, which
        takes fused_moe_small_batch for such a batch (_experts_fuse)."""
        norm = self.post_attention_layernorm
        stream.add_(
            self.mlp(kernels.rms_norm(stream, norm.weight, norm.eps))
        )  # rounded as add_and_norm rounds

    @staticmethod
    def _normed_matmul(
        kernels, x: torch.Tensor, norm: RMSNorm, module: Linear, gate_up_silu: bool = False
    ) -> torch.Tensor:
        if layers.FUSE_NORM_INTO_MATMUL:
            return _small_m(
                kernels, x, module, norm_weight=norm.weight, eps=norm.eps, gate_up_silu=gate_up_silu
            )
        return _small_m(
            kernels, kernels.rms_norm(x, norm.weight, norm.eps), module, gate_up_silu=gate_up_silu
        )


def _packed_fp8_operands(packed):
    operands = getattr(packed, "small_m_operands", None)
    return None if operands is None else operands()


def _small_m(kernels, x: torch.Tensor, module: Linear, **fused) -> torch.Tensor:
    """The Triton small-M matmul x W^T of a Linear, W its 16-bit weight or its packed fp8
    values with their row scales (Fp8Weight.small_m_operands)."""
    if module.packed is None:
        return kernels.small_m_matmul(x, module.weight, **fused)
    weight, scale = module.packed.small_m_operands()
    return kernels.small_m_matmul(x, weight, weight_scale=scale, **fused)


def _experts_fuse(mlp: SparseMoeBlock, x: torch.Tensor) -> bool:
    """Whether a mixture-of-experts layer can run x through fused_moe_small_batch inside the
    fused layer: the switch on, the Triton MoE kernels serving x's device, and the whole
    layer's experts on this rank (a rank's partial sums need the all-reduce of the general path)."""
    if not moe.USE_SMALL_BATCH_MOE or mlp.group is not None:
        return False
    kernels = moe.fused_moe_kernels(x)
    return kernels is not None and x.shape[0] <= kernels.SMALL_BATCH_MAX_TOKENS


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, attn_backend) -> None:
        super().__init__()
        self.config = config
        self.attn_backend = attn_backend
        self.embed_tokens = nn.Parameter(
            torch.empty(config.vocab_size, config.hidden_size), requires_grad=False
        )
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, self.rotary_emb, attn_backend) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # the LM head kept quantized (common/models/gguf_int4.py), else None
        self.lm_head_packed = None
        if config.tie_word_embeddings:
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = nn.Parameter(
                torch.empty(config.vocab_size, config.hidden_size), requires_grad=False
            )

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, Hkv, block_size, D]
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Final-norm hidden states [T, hidden] of every packed token."""
        x = self.embed(input_ids)
        kernels = self._small_batch_kernels(x)
        if kernels is not None:
            for layer in self.layers:
                layer.forward_small_batch(positions, x, kv_cache, attn_metadata, kernels)
            return self.norm(x)
        residual = None
        with self.rotary_emb.step_tables(positions, x.dtype):
            for layer in self.layers:
                x, residual = layer(positions, x, residual, kv_cache, attn_metadata)
        if residual is None:
            return self.norm(x)
        return self.norm.add_and_norm(x, residual)[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [T, hidden] (vocabulary-parallel in parallel_layers.py)."""
        return F.embedding(input_ids, self.embed_tokens)

    def _small_batch_kernels(self, x: torch.Tensor):
        """The fused small-batch kernels when this batch and this model can use them: no
        biases, no LoRA, q/k norm and experts only under layers.FUSE_SMALL_BATCH_QWEN3 (experts
        also need _experts_fuse), and no packed weights other than fp8 ones the Triton small-M
        matmul takes (Fp8Weight.small_m_operands), those only under USE_FUSED_SMALL_BATCH (GGUF
        blocks and fp8 weights on _scaled_mm keep the general path)."""
        c = self.config
        layer = self.layers[0]
        if c.attention_bias or c.attention_out_bias or layer.self_attn.qkv_proj.lora is not None:
            return None  # LoRA adds its products after each layer's own matmul: the general path
        if (c.qk_norm or c.num_experts) and not layers.FUSE_SMALL_BATCH_QWEN3:
            return None
        if isinstance(layer.mlp, SparseMoeBlock) and not _experts_fuse(layer.mlp, x):
            return None
        kernels = small_batch_kernels(x, qwen3_or_experts=bool(c.qk_norm or c.num_experts))
        if kernels is None:
            return None
        packed = [m.packed for m in self.modules() if isinstance(m, Linear) and m.packed is not None]
        if packed:
            # a packed Linear's `.weight` is a zero-strided stand-in; fp8 Linears on the fused
            # layer were timed only as USE_FUSED_SMALL_BATCH's Llama choice (slower there than
            # layer by layer, docs/benchmarks.md), so FUSE_SMALL_BATCH_QWEN3 alone leaves them out
            if not layers.USE_FUSED_SMALL_BATCH or any(_packed_fp8_operands(p) is None for p in packed):
                return None
        return kernels

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [n, vocab] in float32 for the hidden states of the tokens that sample."""
        if self.lm_head_packed is not None:
            return self.lm_head_packed.matmul(hidden).float()
        return linear(hidden, self.lm_head).float()

    def linear_sources(self) -> list[tuple[str, Linear | None, list[str]]]:
        """(role, module, the Hugging Face tensors it stacks by rows) of every matmul weight;
        module None is the LM head (its source is the embedding when they are tied). A
        mixture-of-experts layer's experts are stacked tensors, not Linear modules: not listed."""
        head = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        sources: list[tuple[str, Linear | None, list[str]]] = [("lm_head", None, [head])]
        for i, layer in enumerate(self.layers):
            attn, mlp, p = layer.self_attn, layer.mlp, f"model.layers.{i}."
            sources += [
                ("qkv", attn.qkv_proj, [p + f"self_attn.{x}_proj.weight" for x in "qkv"]),
                ("o", attn.o_proj, [p + "self_attn.o_proj.weight"]),
            ]
            if isinstance(mlp, GatedMLP):
                sources += [
                    ("gate_up", mlp.gate_up_proj, [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
                    ("down", mlp.down_proj, [p + "mlp.down_proj.weight"]),
                ]
        return sources

    def weight_targets(self) -> dict[str, torch.Tensor]:
        """Hugging Face tensor name -> the tensor (or slice of a fused one) it loads into."""
        targets = {"model.embed_tokens.weight": self.embed_tokens, "model.norm.weight": self.norm.weight}
        if not self.config.tie_word_embeddings:
            targets["lm_head.weight"] = self.lm_head
        for i, layer in enumerate(self.layers):
            attn, p = layer.self_attn, f"model.layers.{i}."
            q, kv = attn.q_size, attn.kv_size
            for suffix in ("weight", "bias") if self.config.attention_bias else ("weight",):
                fused = getattr(attn.qkv_proj, suffix)
                targets[p + f"self_attn.q_proj.{suffix}"] = fused[:q]
                targets[p + f"self_attn.k_proj.{suffix}"] = fused[q : q + kv]
                targets[p + f"self_attn.v_proj.{suffix}"] = fused[q + kv :]
            targets[p + "self_attn.o_proj.weight"] = attn.o_proj.weight
            if self.config.attention_out_bias:
                targets[p + "self_attn.o_proj.bias"] = attn.o_proj.bias
            if self.config.qk_norm:
                targets[p + "self_attn.q_norm.weight"] = attn.q_norm.weight
                targets[p + "self_attn.k_norm.weight"] = attn.k_norm.weight
            if isinstance(layer.mlp, SparseMoeBlock):
                targets.update(layer.mlp.weight_targets(self.config.architecture, p))
            else:
                gate_up, n = layer.mlp.gate_up_proj.weight, layer.mlp.intermediate_size
                targets[p + "mlp.gate_proj.weight"] = gate_up[:n]
                targets[p + "mlp.up_proj.weight"] = gate_up[n:]
                targets[p + "mlp.down_proj.weight"] = layer.mlp.down_proj.weight
            targets[p + "input_layernorm.weight"] = layer.input_layernorm.weight
            targets[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        return targets
